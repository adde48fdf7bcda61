"""`python tune.py` on the tiny model: workers sharing a study (SQLite, PostgreSQL), kill -9 and Ctrl-C, pruning,
the best trial served, bad input. Each trial trains 2 epochs of 6 steps."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import optuna
import pytest
import torch

import checkpoints
import train
import tune
from benchmarks import serve_load
from callbacks import AtomicCheckpointIO
from conftest import REPO, run_script, tiny_train_args

pytestmark = pytest.mark.slow  # whole sweeps, two workers, a PostgreSQL server: the fast tier leaves them to CI

FAULTY = REPO / "tests" / "faulty_train.py"


def tune_args(model_dir: Path, data_dir: Path, *args: str) -> list[str]:
    return [*tiny_train_args(model_dir, data_dir), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", *args]


def start(workdir: Path, name: str, args: list[str], fault: str = "") -> subprocess.Popen:
    """`python tune.py ARGS` in the background (tests/faulty_train.py with $FAULT), output in workdir/name.{out,err}."""
    env = {**os.environ, "FAULT": fault, "FAULT_SCRIPT": "tune.py", "FAULT_MARKER": str(workdir / f"{name}.paused")}
    script = FAULTY if fault else REPO / "tune.py"
    with open(workdir / f"{name}.out", "w") as out, open(workdir / f"{name}.err", "w") as err:
        return subprocess.Popen([sys.executable, str(script), *args], cwd=workdir, stdout=out, stderr=err, env=env)


def finish(workdir: Path, name: str, process: subprocess.Popen) -> tuple[int, str, str]:
    code = process.wait(timeout=900)
    return code, (workdir / f"{name}.out").read_text(), (workdir / f"{name}.err").read_text()


def wait_for_pause(workdir: Path, name: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while not (workdir / f"{name}.paused").exists():
        assert process.poll() is None, (workdir / f"{name}.err").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def finished_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="cola", storage=storage)
    return [t for t in study.trials if t.state in tune.FINISHED]


def two_workers(workdir: Path, args: list[str]) -> list[str]:
    """Two `python tune.py ARGS` at once on one study; both must succeed. Their stdouts."""
    workers = [start(workdir, f"worker{i}", args) for i in (1, 2)]
    results = [finish(workdir, f"worker{i}", p) for i, p in zip((1, 2), workers)]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return [out for _, out, _ in results]


def check_every_trial_ran_once(workdir: Path, storage: str, n_trials: int) -> optuna.trial.FrozenTrial:
    trials = finished_trials(storage)
    assert len(trials) == n_trials
    assert sorted(t.user_attrs["seed"] for t in trials) == list(range(1, n_trials + 1))  # each seed once
    run_dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(run_dirs) == n_trials
    assert len(list((workdir / "logs" / "cola").glob("version_*"))) == n_trials  # no folder of a trial that never ran
    for t in trials:
        mark = json.loads((Path(t.user_attrs["run_dir"]) / checkpoints.SWEEP_FILE).read_text())
        assert mark == {"study": "cola", "trial": t.number, "state": t.state.name.lower()}
    best = tune.best_trial(trials)
    assert best.value == optuna.load_study(study_name="cola", storage=storage).best_value
    assert (workdir / checkpoints.find_best_checkpoint(workdir / "logs" / "cola")) == workdir / best.user_attrs["checkpoint"]
    return best


@pytest.fixture(scope="module")
# One of the 15 slowest (~30 s, in its first test's setup): two tune.py worker processes (real ones: each its own
# environment), 3 trials, shared by the tests below.
def sweep(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """Two workers that ran one 3-trial study in the default SQLite storage: their working directory."""
    workdir = tmp_path_factory.mktemp("sweep")
    outputs = two_workers(workdir, ["--n_trials", "3", *tune_args(tiny_model_dir, tiny_data_dir)])
    assert all("| trial | seed | best val_mcc | epochs | state |" in out for out in outputs)
    return workdir


def test_two_workers_share_an_sqlite_study_each_trial_runs_once(sweep):
    best = check_every_trial_ran_once(sweep, f"sqlite:///{sweep}/logs/tune.db", 3)
    assert "inference.py and serve.py pick it" in (sweep / "worker1.out").read_text()
    assert (Path(best.user_attrs["run_dir"]) / "metrics.json").is_file()


def test_the_best_trial_is_served_without_checkpoint(sweep, tmp_path):
    best = tune.best_trial(finished_trials(f"sqlite:///{sweep}/logs/tune.db"))
    process, url = serve_load.start_server(None, [], tmp_path / "serve.log", cwd=sweep)
    try:
        health = httpx.get(f"{url}/health").json()
    finally:
        process.terminate()
        process.wait()
    assert Path(best.user_attrs["checkpoint"]).name in json.dumps(health)


def test_pruned_trials_say_so_and_are_never_picked(sweep, tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    """More trials of the same study, with a pruner that stops every trial after its first epoch (the tiny
    model's val MCC is always 0): their folders are newer, marked pruned, and the best stays the best."""
    storage = f"sqlite:///{sweep}/logs/tune.db"
    best_before = checkpoints.find_best_checkpoint(sweep / "logs" / "cola")
    monkeypatch.chdir(sweep)
    monkeypatch.setenv(train.RUN_VERSION_ENV, "")  # removed again at the end: the trials set it
    monkeypatch.setattr(tune, "PRUNER", optuna.pruners.ThresholdPruner(lower=0.5))
    monkeypatch.setattr(sys, "argv", ["tune.py", "--n_trials", "5", *tune_args(tiny_model_dir, tiny_data_dir)])
    tune.run()
    pruned = [t for t in finished_trials(storage) if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == 2 and all(len(t.intermediate_values) == 1 for t in pruned)  # stopped after 1 epoch
    for t in pruned:
        run_dir = Path(t.user_attrs["run_dir"])
        assert json.loads((run_dir / checkpoints.SWEEP_FILE).read_text())["state"] == "pruned"
        assert not (run_dir / "metrics.json").exists()
    assert checkpoints.find_best_checkpoint(sweep / "logs" / "cola") == best_before
    table = capsys.readouterr().out
    assert table.count("| pruned |") == 2 and "5 trials, 2 pruned" in table


# One of the 15 slowest (~27 s): a real PostgreSQL server, two tune.py worker processes, 3 trials.
def test_two_workers_share_a_postgresql_study(postgres_url, tmp_path, tiny_model_dir, tiny_data_dir):
    two_workers(tmp_path, ["--storage", postgres_url, "--n_trials", "3", *tune_args(tiny_model_dir, tiny_data_dir)])
    check_every_trial_ran_once(tmp_path, postgres_url.replace("postgresql://", "postgresql+psycopg://"), 3)


# One of the 15 slowest (~35 s): three tune.py processes (Ctrl-C, kill -9, the finish), real ones (signals), each paying
# ~6 s of imports.
def test_a_ctrl_c_and_a_kill_9_continue_with_the_same_command(tmp_path, tiny_model_dir, tiny_data_dir):
    """Ctrl-C in trial 0 (epoch 2): exit 130. The same command: the retried trial resumes in its folder, and its
    worker is killed (kill -9) there. The same command again: it finishes the sweep, trial 0's seed in its folder."""
    args = ["--n_trials", "2", "--heartbeat_seconds", "1", *tune_args(tiny_model_dir, tiny_data_dir)]
    storage = f"sqlite:///{tmp_path}/logs/tune.db"
    stopped = start(tmp_path, "stopped", args, fault="pause_before_step:8")  # 6 steps an epoch: epoch 2
    wait_for_pause(tmp_path, "stopped", stopped)
    stopped.send_signal(signal.SIGINT)
    time.sleep(0.5)
    (tmp_path / "stopped.paused").unlink()
    code, _, err = finish(tmp_path, "stopped", stopped)
    assert code == 130, err[-3000:]
    assert "the same command continues the sweep" in err
    killed = start(tmp_path, "killed", args, fault="pause_before_step:10")
    wait_for_pause(tmp_path, "killed", killed)
    assert "Resuming in the checkpoint's run folder, logs/cola/version_0" in (tmp_path / "killed.err").read_text()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    code, out, err = finish(tmp_path, "last", start(tmp_path, "last", args))
    assert code == 0, err[-3000:]
    trials = finished_trials(storage)
    assert len(trials) == 2 and sorted(t.user_attrs["seed"] for t in trials) == [1, 4]  # trials 1 and 2: trial 0 retried
    first = next(t for t in trials if t.user_attrs["seed"] == 1)
    assert Path(first.user_attrs["run_dir"]) == tmp_path / "logs" / "cola" / "version_0"
    assert sorted(first.intermediate_values) == [1, 2]
    assert "stopped, retried" in out


# One of the 15 slowest (~25 s): a worker killed mid-trial, the heartbeat's grace period, then the retried trial.
def test_a_sweep_whose_only_trial_lost_its_worker_finishes_with_the_same_command(tmp_path, tiny_model_dir, tiny_data_dir):
    """kill -9 in the last trial still needed: that trial counted as running forever, and every later run of the
    command said "still running" and trained nothing. Now it is failed once its heartbeat is stale, and retried."""
    args = ["--n_trials", "1", "--heartbeat_seconds", "1", *tune_args(tiny_model_dir, tiny_data_dir)]
    killed = start(tmp_path, "killed", args, fault="pause_before_step:8")  # 6 steps an epoch: in epoch 2
    wait_for_pause(tmp_path, "killed", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    time.sleep(3)  # stale after 2 heartbeats without a beat
    code, out, err = finish(tmp_path, "again", start(tmp_path, "again", args))
    assert code == 0 and "still running" not in err, err[-3000:]
    trials = finished_trials(f"sqlite:///{tmp_path}/logs/tune.db")
    assert [t.user_attrs["seed"] for t in trials] == [1] and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert Path(trials[0].user_attrs["run_dir"]) == tmp_path / "logs" / "cola" / "version_0"  # resumed in its folder
    assert sorted(trials[0].intermediate_values) == [1, 2]


def run_tune_here(workdir: Path, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["tune.py", *args])
    with pytest.raises(SystemExit) as exit:
        tune.run()
    return exit.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_and_leaves_no_trial(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    args = tune_args(tiny_model_dir, tiny_data_dir)
    code, err = run_tune_here(tmp_path, [*args, "--trainer.max_epochz", "2"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error:") and "--trainer.max_epochz" in err
    (tmp_path / "space.yaml").write_text("model.lerning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}\n")
    code, err = run_tune_here(tmp_path, [*args, "--search_space", "space.yaml"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: space.yaml:") and "lerning_rate" in err
    (tmp_path / "space.yaml").write_text("model.learning_rate: {low: 1.0e-3, high: 1.0e-5, log: true}\n")  # reversed
    code, err = run_tune_here(tmp_path, [*args, "--search_space", "space.yaml"], monkeypatch, capsys)
    assert code == 1 and err == "error: space.yaml: model.learning_rate: low (0.001) is above high (1e-05): swap them\n"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        storage = f"postgresql://user:secret@127.0.0.1:{s.getsockname()[1]}/db"
    code, err = run_tune_here(tmp_path, [*args, "--storage", storage], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: --storage") and "secret" not in err
    code, err = run_tune_here(tmp_path, [*args, "--soup"], monkeypatch, capsys)  # heads from each trial's seed
    assert code == 1 and err == "error: --soup averages runs that start from one head: give every trial the same --model.head_seed (e.g. 0)\n"
    assert not (tmp_path / "logs" / "cola").exists() and not (tmp_path / "logs" / "tune.db").exists()


def test_a_search_space_varies_the_options_it_names(tmp_path):
    (tmp_path / "space.yaml").write_text("model.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}\nmodel.pooling: [cls, mean]\n")
    space = tune.read_space(str(tmp_path / "space.yaml"))
    study = optuna.create_study()
    trial = study.ask()
    values = {name: tune.sample(trial, name, spec) for name, spec in space.items()}
    assert 1e-5 <= values["model.learning_rate"] <= 1e-3 and values["model.pooling"] in ("cls", "mean")
    for bad, message in (
        ("seed_everything: [1, 2]", "seed_everything: tune.py sets it"),
        ("model.pooling: cls", "model.pooling: give a list of choices"),
        ("model.pooling: []", "model.pooling: give a list of choices"),
        ("model.learning_rate: {low: 1}", "model.learning_rate: give a list of choices"),
        ("model.learning_rate: {low: 1.0e-3, high: 1.0e-5}", r"model.learning_rate: low \(0.001\) is above high \(1e-05\): swap them"),
        # Issue 44: on e28d847 "low (nan) is above high: swap them"
        ("model.warmup_ratio: {low: .nan, high: 0.2}", "model.warmup_ratio: nan is not a number a trial can take"),
        ("model.learning_rate: {low: 0.0, high: 1.0e-3, log: true}", "model.learning_rate: log: true needs a low above 0, not 0.0"),
        ("model.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: yes please}", "model.learning_rate: log is true or false"),
    ):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(tune.SweepError, match=f"^{re.escape(str(tmp_path / 'bad.yaml'))}: {message}"):
            tune.read_space(str(tmp_path / "bad.yaml"))
    # Issue 44: a YAML syntax error named no line or column on e28d847
    (tmp_path / "bad.yaml").write_text("model.pooling: [cls, mean]\nmodel.learning_rate: {low: 1.0e-5, high: 1.0e-3\n")
    with pytest.raises(tune.SweepError, match=f"^--search_space {re.escape(str(tmp_path / 'bad.yaml'))}:3:1: expected ',' or '}}'"):
        tune.read_space(str(tmp_path / "bad.yaml"))


def test_after_a_sweep_its_best_trial_is_picked_and_a_later_plain_run_wins(tmp_path):
    """checkpoints.find_best_checkpoint on run folders as train.py and tune.py leave them (no training needed)."""
    log_dir = tmp_path / "logs" / "cola"

    def run(number: int, mcc: float, sweep: dict | None = None) -> Path:
        checkpoint = log_dir / f"version_{number}" / "checkpoints" / f"best-{number}.ckpt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"")
        (checkpoint.parent.parent / "metrics.json").write_text(json.dumps({"best_val_mcc": mcc, "best_model_path": str(checkpoint)}))
        if sweep:
            (checkpoint.parent.parent / checkpoints.SWEEP_FILE).write_text(json.dumps(sweep))
        return checkpoint

    run(0, 0.9)  # an older plain run
    run(1, 0.35, {"study": "cola", "trial": 0, "state": "complete"})
    best = run(2, 0.38, {"study": "cola", "trial": 1, "state": "complete"})
    run(3, 0.38, {"study": "cola", "trial": 2, "state": "complete"})  # as good, but later: the first one wins
    run(4, 0.50, {"study": "other", "trial": 0, "state": "complete"})  # another study's
    run(5, 0.60, {"study": "cola", "trial": 3, "state": "pruned"})  # the newest: pruned, never picked
    assert checkpoints.find_best_checkpoint(log_dir) == best
    later = run(6, 0.10)  # a plain run after the sweep is the latest run again
    assert checkpoints.find_best_checkpoint(log_dir) == later


# One of the 15 slowest (~25 s): two trials, their soup, its ONNX export and a server on it: the feature end to end.
def test_a_soup_of_two_trials_is_their_average_and_is_served(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    """tune.py --soup after 2 trials that share --model.head_seed. The tiny model's val MCC is 0 for every run (one
    class predicted), so the greedy rule (a trial joins unless the soup's val MCC drops) takes both."""
    args = ["--n_trials", "2", "--soup", *tune_args(tiny_model_dir, tiny_data_dir, "--model.head_seed", "0")]
    result = run_script("tune.py", args, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Soup of trials 0, 1 (2 of 2)" in result.stdout
    run_dir = tmp_path / "logs" / "cola" / "version_2"  # after the trials' version_0 and version_1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(t["trial"], t["seed"], t["in_soup"]) for t in metrics["soup"]["trials"]] == [(0, 1, True), (1, 2, True)]
    soup = checkpoints.load_checkpoint(Path(metrics["best_model_path"]))
    assert "optimizer_states" not in soup and soup["hyper_parameters"]["head_seed"] == 0
    runs = [checkpoints.load_checkpoint(Path(t["checkpoint"]))["state_dict"] for t in metrics["soup"]["trials"]]
    assert not torch.equal(runs[0]["model.classifier.weight"], runs[1]["model.classifier.weight"])  # two runs, one start
    assert soup["state_dict"].keys() == runs[0].keys()
    for name, weight in soup["state_dict"].items():
        average = (runs[0][name] + runs[1][name]) / 2 if weight.is_floating_point() else runs[0][name]
        torch.testing.assert_close(weight, average, rtol=0, atol=1e-7)
    assert checkpoints.find_best_checkpoint(tmp_path / "logs" / "cola") == run_dir / "checkpoints" / Path(metrics["best_model_path"]).name
    assert list(run_dir.glob("checkpoints/soup-*.onnx"))  # exported: inference.py and serve.py start fast
    process, url = serve_load.start_server(None, [], tmp_path / "serve.log", cwd=tmp_path)
    try:
        health = httpx.get(f"{url}/health").json()
        answer = httpx.post(f"{url}/predict", json={"sentences": ["The dog sat on the mat."]})
    finally:
        process.terminate()
        process.wait()
    assert "soup-val_mcc" in json.dumps(health) and answer.status_code == 200
    assert answer.json()[0]["label"] in ("acceptable", "unacceptable")
    # Issue 44: on e28d847 the same --soup again made a second soup, and a trial whose checkpoint is gone was left out
    # without a word ("2 of 2").
    again = run_script("tune.py", args, tmp_path, timeout=900)
    assert again.returncode == 0 and f"The soup of these trials is already made: {metrics['best_model_path']}" in again.stdout
    assert not (tmp_path / "logs" / "cola" / "version_3").exists()
    monkeypatch.chdir(tmp_path)  # where the trials' run folders are
    study = optuna.load_study(study_name="cola", storage="sqlite:///logs/tune.db")
    kept = Path(metrics["soup"]["trials"][1]["checkpoint"]).read_bytes()
    Path(metrics["soup"]["trials"][1]["checkpoint"]).unlink()
    with pytest.raises(tune.SweepError, match=r"^--soup: 1 trial\(s\) with a saved checkpoint"):
        tune.make_soup(study)
    assert re.search(r"^note: --soup leaves trial 1 out: its best checkpoint, .*, is missing", capsys.readouterr().out, re.M)
    Path(metrics["soup"]["trials"][1]["checkpoint"]).write_bytes(kept)
    # Issue 44: on e28d847 a --soup killed while writing left a run folder that every later inference.py noted.
    shutil.rmtree(run_dir)

    def killed(*args):
        raise KeyboardInterrupt  # as if killed after the checkpoint was written

    monkeypatch.setattr(tune.shutil, "copy", killed)
    with pytest.raises(KeyboardInterrupt):
        tune.make_soup(study)
    assert not list((tmp_path / "logs" / "cola").glob("version_[2-9]")) and list((tmp_path / "logs" / "cola").glob(".soup.*.tmp"))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # Trials that read their weights otherwise (here: another pooling) are refused, not averaged.
    other = checkpoints.load_checkpoint(Path(metrics["soup"]["trials"][1]["checkpoint"]))
    other["hyper_parameters"]["pooling"] = "mean" if other["hyper_parameters"]["pooling"] == "cls" else "cls"
    AtomicCheckpointIO().save_checkpoint(other, metrics["soup"]["trials"][1]["checkpoint"])
    with pytest.raises(tune.SweepError, match=r"^--soup: trials 0 and 1 differ in --model.pooling: only runs of one model"):
        tune.make_soup(study)
