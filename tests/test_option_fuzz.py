"""Issue 44: every option of the four scripts, from their own parsers, at the extremes of its type (0, -1, 2**64,
NaN, inf, an empty string, a path outside the working folder): one `error:` line or a clean run, never a
traceback or a hang, and a refused command leaves no file behind. tests/option_fuzz.py runs the cases."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_train, tiny_train_args

SHARDS = 2  # one process per core: the cases are independent


def verdict(case: dict) -> str:
    """What is wrong with one case's outcome, or '' for nothing."""
    where = f"{case['option']} {case['value']!r}"
    if case["exception"]:
        return f"{where}: a traceback: {case['exception'].strip().splitlines()[-1]}"
    if case["rc"] == 0:
        return ""
    errors = [line for line in case["stderr"].splitlines() if line.startswith("error:")]
    if len(errors) != 1:
        return f"{where}: exit {case['rc']} with {len(errors)} error: lines: {case['stderr'][-500:]}"
    # A run that trained and then stopped keeps its last checkpoint, and its error line names it.
    kept = [path for path in case.get("left", []) if Path(path).name not in errors[0] and "last checkpoint: " not in errors[0]]
    return f"{where}: refused, but left {kept}" if kept else ""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    workdir = tmp_path_factory.mktemp("fuzz-run")
    result = run_train(workdir, *tiny_train_args(tiny_model_dir, tiny_data_dir), "--trainer.max_epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return next(workdir.glob("logs/cola/version_0/checkpoints/best-*.ckpt"))


@pytest.mark.slow  # two of the 15 slowest (train.py's 390 cases ~75 s, tune.py's ~25 s, two shards side by side)
@pytest.mark.parametrize("script", ["train", "tune", "inference", "serve"])
def test_every_option_at_its_extremes_is_one_error_line_or_a_clean_run(script, tmp_path, tiny_model_dir, tiny_data_dir, checkpoint):
    command = [sys.executable, str(REPO / "tests" / "option_fuzz.py"), script, str(tiny_model_dir), str(tiny_data_dir), str(checkpoint)]
    shards = [subprocess.Popen([*command, str(tmp_path / f"shard-{i}"), str(i), str(SHARDS)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(SHARDS)]
    try:
        outputs = [shard.communicate(timeout=900) for shard in shards]
    finally:
        for shard in shards:
            shard.kill()  # SIGTERM would not do: train.py's handler turns it into one case's exit, and the next case runs
    for shard, (_, stderr) in zip(shards, outputs):
        assert shard.returncode == 0, stderr[-3000:]
    cases = [json.loads(line) for stdout, _ in outputs for line in stdout.splitlines()]
    options = {case["option"] for case in cases}
    assert len(options) >= 6, f"too few cases: the parser was not read ({sorted(options)})"
    problems = [problem for problem in map(verdict, cases) if problem]
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems)
