"""Faults: `python train.py` killed while saving and mid-epoch, stopped with Ctrl-C, hit by a NaN loss,
started twice at once; the Hub unreachable; a bad --ckpt_path. On the tiny model, as a user runs it."""

import contextlib
import errno
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import callbacks
import checkpoints
import train
from conftest import REPO, flip_bytes, tiny_train_args
from data import TextDataModule
from hub import HubError
from model import TextClassifier


class Run:
    """`python train.py ARGS` (or tests/faulty_train.py with $FAULT) in the background, output to files."""

    def __init__(self, workdir: Path, name: str, args: list[str], fault: str | None = None) -> None:
        self.workdir, self.marker = workdir, workdir / f"{name}.paused"
        script = REPO / ("tests/faulty_train.py" if fault else "train.py")
        env = {**os.environ, "FAULT": fault or "", "FAULT_MARKER": str(self.marker)}
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            command = [sys.executable, str(script), "--trainer.enable_progress_bar", "false", *args]
            self.process = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=err, env=env)

    def wait_for_pause(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            assert self.process.poll() is None, f"ended before its fault point:\n{self.err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "never reached its fault point"
            time.sleep(0.05)
        return self.marker.read_text()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self) -> SimpleNamespace:
        returncode = self.process.wait(timeout=600)
        return SimpleNamespace(returncode=returncode, stdout=self.out.read_text(), stderr=self.err.read_text())


def global_step(path: Path):
    """The training step a checkpoint was saved at; None if it does not load (as Lightning would load it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except Exception:
        return None


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def train_in_process(
    workdir: Path, args: list[str], sigint_before_step: int | None = None, signals: dict[int, int] | None = None
) -> SimpleNamespace:
    """`python train.py ARGS` run in this process (saving the ~10 s a new one takes to import everything), as
    a command: the same sys.argv and exit status. Optionally this process gets a SIGINT (Ctrl-C) when training
    step sigint_before_step + 1 starts, or each signal of signals {steps done: signal} then."""
    signals = {**(signals or {}), **({sigint_before_step: signal.SIGINT} if sigint_before_step is not None else {})}
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    saved = os.getcwd(), sys.argv, {s: signal.getsignal(s) for s in handled}, TextClassifier.on_train_batch_start
    out, err = io.StringIO(), io.StringIO()

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step in signals:
            os.kill(os.getpid(), signals[self.global_step])

    try:
        os.chdir(workdir)
        sys.argv = [str(REPO / "train.py"), "--trainer.enable_progress_bar", "false", *args]
        TextClassifier.on_train_batch_start = on_train_batch_start
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.run()
                returncode = 0
            except SystemExit as exit:
                returncode = exit.code
    finally:
        # Lightning ignores SIGINT once it has handled one; the run may have published its folder.
        os.chdir(saved[0])
        sys.argv, TextClassifier.on_train_batch_start = saved[1], saved[3]
        for signum, handler in saved[2].items():
            signal.signal(signum, handler)
        os.environ.pop(train.RUN_VERSION_ENV, None)
    return SimpleNamespace(returncode=returncode, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> SimpleNamespace:
    """Two `python train.py` runs started at the same moment in the same folder, 2 epochs of 6 steps each:

    - one whose weights turn NaN before step 9, in its second epoch;
    - one killed (SIGKILL) half-way through saving its first best checkpoint, after step 6; resumed and stopped
      with Ctrl-C during step 9; resumed with the command it printed, and finished. It saves last.ckpt after
      every step (but an epoch's last), so it resumes mid-epoch each time.
    """
    workdir = tmp_path_factory.mktemp("faults")
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "2"]
    args_every_step = args + ["--save_last_every_minutes", "0"]
    seen = SimpleNamespace()

    nan = Run(workdir, "nan", args, fault="nan_before_step:8")
    killed = Run(workdir, "killed-saving", args_every_step, fault="pause_in_save:best-")
    seen.paused_in = killed.wait_for_pause()
    killed.kill()
    seen.run_dir = workdir / Path(seen.paused_in.split()[-1]).parent.parent
    seen.after_killed_save = {p.name: global_step(p) for p in (seen.run_dir / "checkpoints").iterdir()}
    last = seen.run_dir / "checkpoints" / "last.ckpt"

    seen.ctrl_c = train_in_process(workdir, [*args_every_step, "--ckpt_path", str(last)], sigint_before_step=8)
    seen.after_ctrl_c = global_step(last)
    command = shlex.split(seen.ctrl_c.stdout.split("Resume with:\n")[1].splitlines()[0])
    assert command[:2] == ["python", str(REPO / "train.py")]
    seen.final = train_in_process(workdir, command[2:])

    seen.nan = nan.finish()
    seen.nan_dir = workdir / "logs/cola" / ({"version_0", "version_1"} - {seen.run_dir.name}).pop()
    return seen


def test_runs_started_at_the_same_moment_get_their_own_folders(faults):
    assert sorted(d.name for d in faults.run_dir.parent.iterdir()) == ["version_0", "version_1"]
    assert faults.final.returncode == 0 and faults.nan.returncode == 1
    assert metrics(faults.run_dir)["best_model_path"].startswith(f"logs/cola/{faults.run_dir.name}/")
    assert sorted(p.name.split("-")[0] for p in (faults.nan_dir / "checkpoints").iterdir()) == ["best", "last.ckpt"]


def val_scalars(run_dir: Path) -> dict:
    values = {}
    for event_file in run_dir.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(event_file))
        events.Reload()
        for tag in ("val_mcc", "val_loss", "val_accuracy"):
            values.update({(tag, e.step): e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {})
    return values


def test_same_seed_same_data_gives_identical_val_mcc(faults, trained):
    # The NaN run's first epoch (run beside another) against the `trained` run's (run alone), bit for bit.
    workdir, _ = trained
    ours, reference = val_scalars(faults.nan_dir), val_scalars(workdir / "logs/cola/version_0")
    assert ours and set(ours) < set(reference)  # epoch 0's validation; the NaN run has no second one
    assert {key: reference[key] for key in ours} == ours


def test_ctrl_c_saves_last_checkpoint_and_prints_how_to_resume(faults):
    result = faults.ctrl_c
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Ctrl-C: stopping after this training step" in result.stderr
    last = (faults.run_dir / "checkpoints/last.ckpt").relative_to(faults.run_dir.parents[2])  # as the run saw it
    assert f"Stopped at step 9, saved {last}. Resume with:" in result.stdout
    assert faults.after_ctrl_c == 9  # the step during which Ctrl-C came was finished, then saved


def test_a_run_killed_while_saving_leaves_every_checkpoint_whole(faults):
    assert "best-epoch=0" in faults.paused_in and faults.paused_in.endswith(".tmp") and ".ckpt." in faults.paused_in
    # The best checkpoint being written exists only as its temporary file; last.ckpt is whole, from step 5
    # (none is saved after an epoch's last step, where the epoch's validation has yet to run).
    assert faults.after_killed_save == {faults.paused_in.split("/")[-1]: None, "last.ckpt": 5}


def test_interrupted_and_killed_run_finishes_like_an_undisturbed_one(faults, trained):
    assert faults.final.returncode == 0, faults.final.stderr[-3000:]
    # The killed run's half-written checkpoint (test above) was removed by the resumed run's first save.
    assert not list((faults.run_dir / "checkpoints").glob(".*.tmp"))
    workdir, _ = trained
    resumed, undisturbed = metrics(faults.run_dir), metrics(workdir / "logs/cola/version_0")
    assert (resumed["global_step"], resumed["epochs"]) == (undisturbed["global_step"], undisturbed["epochs"]) == (12, 2)
    assert resumed["best_val_mcc"] == undisturbed["best_val_mcc"]
    assert Path(resumed["best_model_path"]).name == Path(undisturbed["best_model_path"]).name
    for name, value in undisturbed["last_epoch_metrics"].items():
        assert resumed["last_epoch_metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_non_finite_loss_stops_with_one_line_and_keeps_the_best_checkpoint(faults):
    result = faults.nan
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the loss became NaN or infinite at epoch 1, step 9;"), error
    checkpoints = faults.nan_dir / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    assert best.name.startswith("best-epoch=0-") and str(best.relative_to(faults.nan_dir.parents[2])) in error
    for path in (best, checkpoints / "last.ckpt"):  # both from before the NaN, whole and finite
        weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert not (faults.nan_dir / "metrics.json").exists()


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "best.ckpt"
    io_plugin = callbacks.AtomicCheckpointIO()
    io_plugin.save_checkpoint({"step": 1}, path)

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as good as a kill for what is on disk: no rename happens

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io_plugin.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert checkpoints.temporary_path(path).read_bytes() == b"half a checkpoint"
    io_plugin.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.ckpt"]  # the next save reuses the temporary file


def test_run_folders_are_claimed_atomically(tmp_path):
    # Many claims at once (threads stand in for processes: os.mkdir is what decides), none shared.
    barrier, claimed = threading.Barrier(8), []

    def claim():
        barrier.wait()
        claimed.append(checkpoints.claim_run_version(tmp_path / "cola"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed, key=lambda v: int(v[8:])) == [f"version_{i}" for i in range(8)]


def one_line_error(result: SimpleNamespace) -> str:
    """The line with which a run failed: the last on stderr, with no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "checkpoint not found"),
        ("truncated", "not a checkpoint: not the zip archive that torch.save writes"),
        ("damaged-in-its-middle", "damaged: the bytes of archive/data/"),
        ("pickled-code", "refused: it holds a pickled "),
        ("foreign", "not a checkpoint of this project"),
        ("weights-only", "holds model weights only, no training state to resume from"),
    ],
)
def test_resuming_from_a_bad_checkpoint_is_refused_in_one_line(trained, tmp_path, tiny_model_dir, tiny_data_dir, kind, message):
    workdir, _ = trained
    good = torch.load(workdir / "logs/cola/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    path = tmp_path / "bad.ckpt"
    if kind == "truncated":
        data = (workdir / "logs/cola/version_0/checkpoints/last.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "damaged-in-its-middle":  # resumed and ran, exit 0, or 60 lines of traceback, before
        shutil.copy(workdir / "logs/cola/version_0/checkpoints/last.ckpt", path)
        # In the middle of the word vectors' bytes: the file's middle byte may fall between two records.
        flip_bytes(path, inside=good["state_dict"]["model.bert.embeddings.word_embeddings.weight"].numpy().tobytes())
    elif kind == "pickled-code":
        torch.save({**good, "hf_config": Exploit()}, path)
    elif kind == "foreign":
        torch.save({"state_dict": good["state_dict"], "loops": good["loops"]}, path)
    elif kind == "weights-only":
        torch.save({k: v for k, v in good.items() if k not in ("loops", "optimizer_states")}, path)
    result = train_in_process(tmp_path, [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--ckpt_path", str(path)])
    line = one_line_error(result)
    assert line.startswith(f"error: {path}: {message}"), line
    assert "pwned" not in result.stdout
    assert not (tmp_path / "logs").exists()  # refused before anything started


def test_model_not_in_cache_while_offline_is_one_line_that_says_how_to_run_offline(tmp_path, tiny_data_dir):
    args = ["--model.model_name_or_path", "no-such-org/no-such-model", "--data.data_dir", str(tiny_data_dir)]
    line = one_line_error(train_in_process(tmp_path, args))
    assert line.startswith("error: model 'no-such-org/no-such-model' is not in the local cache, and HF_HUB_OFFLINE is set")
    assert "--model.model_name_or_path DIR" in line and "--data.data_dir DIR" in line
    # The run had claimed its folder up front, before loading anything (the logger picks one much later),
    # and removed it when it stopped before training: no empty run to hide the last real one.
    assert list((tmp_path / "logs/cola").iterdir()) == []


def test_hub_errors_name_what_failed(tmp_path, tiny_model_dir):
    with pytest.raises(HubError, match=r"^dataset 'nyu-mll/glue' is not in the local cache, and HF_HUB_OFFLINE is set"):
        TextDataModule(model_name_or_path=str(tiny_model_dir)).prepare_data()  # no data_dir: CoLA from the Hub
    with pytest.raises(HubError, match=r"^model './no/such/folder' is neither a local folder nor a valid Hub id"):
        TextClassifier("./no/such/folder")
    with pytest.raises(HubError, match=rf"^model '{tmp_path}' is a folder without a usable model or tokenizer"):
        TextClassifier(str(tmp_path))


# Run in a fresh process because the Hub's address is read at import. Imports what model.py and data.py use.
HUB_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import datasets
from transformers import AutoModelForSequenceClassification
from hub import HubError, explain_hub_errors
for kind, name, load in [
    ("model", "no-such-org/no-such-model", AutoModelForSequenceClassification.from_pretrained),
    ("dataset", "nyu-mll/glue", lambda name: datasets.load_dataset(name, "cola", split="train")),
]:
    try:
        with explain_hub_errors(kind, name):
            load(name)
    except HubError as e:
        print(e)
"""


class NotFoundHub(BaseHTTPRequestHandler):
    def do_HEAD(self):  # what the Hub answers for a repository that does not exist (or is private)
        self.send_response(401)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


def test_unreachable_hub_and_wrong_ids_are_told_apart():
    not_found = ThreadingHTTPServer(("127.0.0.1", 0), NotFoundHub)
    threading.Thread(target=not_found.serve_forever, daemon=True).start()
    with socket.socket() as unused:  # a port nothing listens on: connections are refused, as with no network
        unused.bind(("127.0.0.1", 0))
        refused_port = unused.getsockname()[1]
    probes = {}
    for hub, port in (("unreachable", refused_port), ("not-found", not_found.server_port)):
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
        command = [sys.executable, "-c", HUB_PROBE, str(REPO)]
        probes[hub] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outputs = {hub: probe.communicate(timeout=300) for hub, probe in probes.items()}
    finally:
        not_found.shutdown()
    unreachable = f"could not be downloaded: the Hub at http://127.0.0.1:{refused_port} is unreachable (no network?)"
    not_found_hub = f"the Hub at http://127.0.0.1:{not_found.server_port}: check the id"
    expected = {
        "unreachable": (f"model 'no-such-org/no-such-model' {unreachable}", f"dataset 'nyu-mll/glue' {unreachable}"),
        "not-found": (
            f"model 'no-such-org/no-such-model' is neither a local folder nor on {not_found_hub}",
            f"dataset 'nyu-mll/glue' is not on {not_found_hub}",
        ),
    }
    for hub, (out, err) in outputs.items():
        lines = out.splitlines()
        assert len(lines) == 2, out + err[-3000:]
        assert "Retrying" not in err, err  # an unreachable Hub fails at once, not after ten retries
        assert lines[0].startswith(expected[hub][0]) and lines[1].startswith(expected[hub][1]), lines
        assert all("--data.data_dir DIR" in line for line in lines)


def test_train_with_the_hub_unreachable_fails_at_once_in_one_line(tmp_path, tiny_data_dir):
    with socket.socket() as unused:  # a port nothing listens on: connections are refused, as with no network
        unused.bind(("127.0.0.1", 0))
        refused_port = unused.getsockname()[1]
    env = {
        **os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{refused_port}",
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--data.data_dir", str(tiny_data_dir)],  # the default model: the Hub's
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "Seed set to 42",
        f"error: model 'google-bert/bert-base-uncased' could not be downloaded: the Hub at http://127.0.0.1:{refused_port}"
        " is unreachable (no network?), and it is not cached. To train offline, pass a local model folder (--model.model_name_or_path"
        " DIR, saved with save_pretrained) and local data files (--data.data_dir DIR with GLUE's train.tsv and dev.tsv).",
    ], result.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_exits_143_and_the_resumed_run_ends_like_an_undisturbed_one(
    trained, tmp_path, tiny_model_dir, tiny_data_dir
):
    # SLURM, Kubernetes and `docker stop` send SIGTERM, then SIGKILL: it must be handled like Ctrl-C.
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "2"]
    run = Run(tmp_path, "sigterm", args, fault="pause_before_step:8")
    run.wait_for_pause()
    run.process.send_signal(signal.SIGTERM)
    run.marker.unlink()  # go on: step 9 finishes, then the run stops
    result = run.finish()
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "SIGTERM: stopping after this training step" in result.stderr
    assert "Stopped at step 9, saved logs/cola/version_0/checkpoints/last.ckpt. Resume with:" in result.stdout
    assert global_step(tmp_path / "logs/cola/version_0/checkpoints/last.ckpt") == 9
    command = shlex.split(result.stdout.split("Resume with:\n")[1].splitlines()[0])
    final = train_in_process(tmp_path, command[2:])
    assert final.returncode == 0, final.stderr[-3000:]
    resumed, undisturbed = metrics(tmp_path / "logs/cola/version_0"), metrics(trained[0] / "logs/cola/version_0")
    assert (resumed["global_step"], resumed["best_val_mcc"]) == (undisturbed["global_step"], undisturbed["best_val_mcc"])
    assert resumed["last_epoch_metrics"]["val_loss"] == pytest.approx(undisturbed["last_epoch_metrics"]["val_loss"], rel=1e-6)


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "cola", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def test_a_requeued_slurm_job_resumes_its_run_in_the_same_folder(trained, tmp_path, monkeypatch, tiny_model_dir, tiny_data_dir):
    # As SLURM runs it: SIGUSR1 before the time limit (Lightning saves hpc_ckpt_1.ckpt and requeues the job;
    # scontrol is missing here, which it reports), then SIGTERM; the same command again, same job id.
    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "2"]
    (tmp_path / "logs/cola/version_0").mkdir(parents=True)  # an earlier, unrelated run
    first = train_in_process(tmp_path, args, signals={3: signal.SIGUSR1, 4: signal.SIGTERM})
    assert first.returncode == 143, first.stderr[-3000:]
    run_dir = tmp_path / "logs/cola/version_1"
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file() and not list(tmp_path.glob("hpc_ckpt_*"))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = train_in_process(tmp_path, args)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "Resuming in the checkpoint's run folder, logs/cola/version_1" in requeued.stderr
    assert sorted(d.name for d in (tmp_path / "logs/cola").iterdir()) == ["version_0", "version_1"]
    resumed, undisturbed = metrics(run_dir), metrics(trained[0] / "logs/cola/version_0")
    assert (resumed["global_step"], resumed["best_val_mcc"]) == (undisturbed["global_step"], undisturbed["best_val_mcc"])


def test_a_resume_continues_in_the_checkpoints_own_run_folder_never_in_this_folders(trained, tmp_path, tiny_model_dir, tiny_data_dir):
    here, other = tmp_path / "here", tmp_path / "other"
    for folder in (here, other):
        shutil.copytree(trained[0] / "logs", folder / "logs")
    here_before = {p: p.read_bytes() for p in (here / "logs").rglob("*") if p.is_file()}
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "3"]
    result = train_in_process(here, [*args, "--ckpt_path", "../other/logs/cola/version_0/checkpoints/last.ckpt"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: p.read_bytes() for p in (here / "logs").rglob("*") if p.is_file()} == here_before  # untouched
    resumed = metrics(other / "logs/cola/version_0")
    assert resumed["epochs"] == 3
    # The best so far is remembered across the move: its path names a file of that run, as seen from here.
    best = here / resumed["best_model_path"]
    assert best.is_file() and best.resolve().parent == (other / "logs/cola/version_0/checkpoints").resolve()
    assert resumed["best_val_mcc"] >= metrics(trained[0] / "logs/cola/version_0")["best_val_mcc"]

    # A checkpoint kept outside any run folder resumes in a new one, which says so.
    shutil.copy(trained[0] / "logs/cola/version_0/checkpoints/last.ckpt", tmp_path / "kept.ckpt")
    result = train_in_process(here, [*args, "--ckpt_path", str(tmp_path / "kept.ckpt")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{tmp_path / 'kept.ckpt'} is not in a run folder's checkpoints/ folder: resuming in a new run folder, logs/cola/version_1" in result.stderr
    assert metrics(here / "logs/cola/version_1")["best_model_path"].startswith("logs/cola/version_1/checkpoints/best-")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--data.batch_size", "0", "--data.batch_size must be at least 1, not 0"),
        ("--data.max_length", "1", "--data.max_length must be at least 3 ([CLS], one token, [SEP]), not 1"),
        ("--data.num_workers", "-1", "--data.num_workers must be 0 to 64"),
        ("--model.learning_rate", "-1", "--model.learning_rate must be a positive number"),
        ("--model.learning_rate", "0", "--model.learning_rate must be a positive number"),
        ("--model.warmup_ratio", "2", "--model.warmup_ratio must be at least 0 and below 1"),
        ("--model.layer_decay", "0", "--model.layer_decay must be above 0 and at most 1"),
        ("--trainer.max_epochs", "0", "--trainer.max_epochs must be at least 1, or -1 for no limit; not 0"),
        ("--trainer.max_epochs", "-2", "--trainer.max_epochs must be at least 1, or -1 for no limit; not -2"),
        ("--trainer.max_steps", "0", "--trainer.max_steps must be at least 1"),
        ("--save_last_every_minutes", "-1", "--save_last_every_minutes must be 0 or more"),
        ("--trainer.limit_val_batches", "0", "--trainer.limit_val_batches 0 skips validation"),
        ("--trainer.enable_checkpointing", "false", "--trainer.fast_dev_run and --trainer.enable_checkpointing false save no checkpoint"),
    ],
)
def test_a_bad_option_is_one_line_and_leaves_no_run_folder(tmp_path, tiny_model_dir, tiny_data_dir, option, value, message):
    result = train_in_process(tmp_path, [*tiny_train_args(tiny_model_dir, tiny_data_dir), option, value])
    line = one_line_error(result)
    assert line.startswith(f"error: {message}"), line
    assert not list(tmp_path.glob("logs/cola/*"))


def test_a_mistyped_option_is_one_line(tmp_path):
    result = train_in_process(tmp_path, ["--data.batch_size", "abc"])
    assert result.returncode == 2 and result.stdout == "", result.stderr[-3000:]
    assert result.stderr == "error: --data.batch_size: Expected a <class 'int'>. Got value: abc (python train.py --help lists the options)\n"


def test_training_that_never_validates_is_one_line_not_a_crash_in_the_report(tmp_path, tiny_model_dir, tiny_data_dir):
    result = train_in_process(tmp_path, [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--trainer.max_steps", "2"])
    line = one_line_error(result)
    assert line.startswith("error: no validation ran, so there is no best checkpoint (--trainer.max_steps ended"), line
    assert line.endswith("stopped at step 2, last checkpoint: logs/cola/version_0/checkpoints/last.ckpt")


def test_a_wrong_data_folder_leaves_no_run_folder(tmp_path, tiny_model_dir):
    result = train_in_process(tmp_path, tiny_train_args(tiny_model_dir, tmp_path / "no-such-folder"))
    assert one_line_error(result).startswith(f"error: {tmp_path / 'no-such-folder' / 'train.tsv'}: file not found")
    assert not list(tmp_path.glob("logs/cola/*"))


def test_resuming_with_a_model_of_another_size_or_a_damaged_random_state_is_one_line(trained, tmp_path, tiny_model_dir, tiny_data_dir):
    from transformers import BertConfig, BertForSequenceClassification

    run_dir = tmp_path / "logs/cola/version_0"
    shutil.copytree(trained[0] / "logs/cola/version_0", run_dir)
    files_before = sorted(p.name for p in run_dir.rglob("*"))
    wider = tmp_path / "wider-bert"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wider / name).parent.mkdir(exist_ok=True)
        shutil.copy(tiny_model_dir / name, wider / name)
    config = BertConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 64, 128
    BertForSequenceClassification(config).save_pretrained(wider)
    last = run_dir / "checkpoints/last.ckpt"
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "3", "--ckpt_path", str(last)]
    result = train_in_process(tmp_path, [*args, "--model.model_name_or_path", str(wider)])
    line = one_line_error(result)
    assert line.startswith(f"error: {last}: a checkpoint of a model of another size (model.bert.embeddings."), line
    assert "resume with the --model.model_name_or_path it was trained from" in line

    damaged = tmp_path / "logs/cola/version_0/checkpoints/damaged.ckpt"
    good = torch.load(last, map_location="cpu", weights_only=True)
    torch.save({**good, "rng_states": {"cpu": torch.zeros(3, dtype=torch.uint8)}}, damaged)
    result = train_in_process(tmp_path, [*args[:-1], str(damaged)])
    assert one_line_error(result).startswith(f"error: {damaged}: its saved random state is damaged")
    damaged.unlink()
    assert set(files_before) <= {p.name for p in run_dir.rglob("*")}  # the resumed run's folder stays


def test_ctrl_c_while_importing_torch_is_one_line_and_exit_130(monkeypatch, capsys):
    import builtins
    import runpy

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "torch":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    try:  # (a KeyboardInterrupt let through would stop pytest itself)
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    except BaseException as stop:
        exit = stop
    monkeypatch.undo()
    assert isinstance(exit, SystemExit) and exit.code == 130, repr(exit)
    assert capsys.readouterr().err.strip() == "interrupted while starting: nothing to save"


def test_only_a_run_folder_counts_as_one(tmp_path):
    # A copy in ~/backup/checkpoints/ must not make ~/backup the run folder a resume writes into.
    backup = tmp_path / "backup" / "checkpoints"
    backup.mkdir(parents=True)
    assert checkpoints.run_folder_of(backup / "last.ckpt") is None
    assert checkpoints.run_folder_of(tmp_path / "backup" / "hpc_ckpt_1.ckpt") is None
    (tmp_path / "backup" / "hparams.yaml").write_text("{}\n")  # what TensorBoardLogger leaves in a run folder
    assert checkpoints.run_folder_of(backup / "last.ckpt") == (tmp_path / "backup").resolve()


def test_last_checkpoint_is_saved_after_every_validation_while_val_mcc_falls(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    # val_mcc forced to fall at every validation (the tiny model's own stays at 0): no epoch after the first is
    # a best one, and a run killed at any epoch's start must still find last.ckpt saved at the end of the one before.
    scores = iter(torch.linspace(0.9, 0.0, 10))
    monkeypatch.setattr("model.MatthewsCorrCoef.compute", lambda self: next(scores))
    seen = []

    def on_train_epoch_start(self):
        last = Path(self.trainer.checkpoint_callback.dirpath) / "last.ckpt"
        seen.append((self.global_step, global_step(last) if last.exists() else None))

    monkeypatch.setattr(TextClassifier, "on_train_epoch_start", on_train_epoch_start, raising=False)
    monkeypatch.setattr(train, "export_for_inference", lambda path: None)  # not what this test is about: save its ~10 s
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + [
        "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--trainer.num_sanity_val_steps", "0"
    ]
    result = train_in_process(tmp_path, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert seen == [(0, None), (2, 2), (4, 4)]
    assert "Best val_mcc 0.9000" in result.stdout and "best-epoch=0-" in result.stdout


@pytest.mark.parametrize("option, value, saved", [
    ("--data.batch_size", "4", "8"), ("--data.max_length", "32", "128"), ("--data.data_dir", "other-data", None),
    ("--model.learning_rate", "0.01", "0.001"),
])
def test_resuming_with_other_settings_than_trained_is_one_line_and_rewrites_nothing(
    trained, tmp_path, tiny_model_dir, tiny_data_dir, option, value, saved
):
    run_dir = tmp_path / "logs/cola/version_0"
    shutil.copytree(trained[0] / "logs/cola/version_0", run_dir)
    shutil.copytree(tiny_data_dir, tmp_path / "other-data")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    last = run_dir / "checkpoints/last.ckpt"
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "3", "--ckpt_path", str(last)]
    line = one_line_error(train_in_process(tmp_path, [*args, option, value]))
    assert line == (
        f"error: {last}: trained with {option} {saved or tiny_data_dir}, not {value}: resume with the options it was"
        " trained with (its run folder's config.yaml has them), or start a new run"
    )
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # config.yaml too
    assert sorted(p.name for p in (tmp_path / "logs/cola").iterdir()) == ["version_0"]


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    # The disk fills half-way through the third save of last.ckpt (it is saved after every step here), as
    # a real full disk does (checked by hand on a 1 MB tmpfs: the same line, the same files left).
    real_save, saves = torch.save, []
    last_being_written = checkpoints.temporary_path(Path("last.ckpt")).name

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", "")).endswith(last_being_written):
            saves.append(obj["global_step"])
            if len(saves) == 3:
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "2", "--save_last_every_minutes", "0"]
    result = train_in_process(tmp_path, args)
    folder = tmp_path / "logs/cola/version_0/checkpoints"
    assert one_line_error(result) == (
        f"error: {folder.relative_to(tmp_path)}/last.ckpt: could not save the checkpoint (No space left on device);"
        " the previous last.ckpt is kept"
    )
    monkeypatch.undo()
    assert global_step(folder / "last.ckpt") == saves[1] and saves[1] < saves[2]
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("blocked", ["file", "read-only"])
def test_a_logs_folder_that_cannot_be_written_is_one_line(tmp_path, tiny_model_dir, tiny_data_dir, blocked):
    logs = tmp_path / "logs"
    if blocked == "file":
        logs.write_text("not a folder")
    else:
        logs.mkdir(mode=0o555)
        if os.geteuid() == 0:  # root writes to any folder whatever its mode, but not to an immutable one
            subprocess.run(["chattr", "+i", str(logs)], check=True)
    try:
        result = train_in_process(tmp_path, tiny_train_args(tiny_model_dir, tiny_data_dir))
    finally:
        if blocked == "read-only" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(logs)], check=True)
    reason = "logs is a file" if blocked == "file" else "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert one_line_error(result) == (
        f"error: logs/cola: cannot create a run folder there ({reason}): fix it, or log elsewhere with"
        " --trainer.logger.init_args.save_dir DIR"
    )


def test_resuming_in_a_run_folder_that_cannot_be_written_is_one_line(trained, tmp_path, tiny_model_dir, tiny_data_dir):
    run_dir = tmp_path / "logs/cola/version_0"
    shutil.copytree(trained[0] / "logs/cola/version_0", run_dir)
    run_dir.chmod(0o555)
    if os.geteuid() == 0:  # root writes to any folder whatever its mode, but not to an immutable one
        subprocess.run(["chattr", "+i", str(run_dir)], check=True)
    last = run_dir / "checkpoints/last.ckpt"
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "3", "--ckpt_path", str(last)]
    try:
        result = train_in_process(tmp_path, args)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(run_dir)], check=True)
        run_dir.chmod(0o755)
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert one_line_error(result) == (
        f"error: {run_dir.relative_to(tmp_path)}: cannot write there to resume the run ({reason}): make it writable,"
        " or resume from a copy of the checkpoint kept elsewhere, in a new run folder"
    )


def test_a_resume_may_leave_out_what_the_model_picked_by_default_and_spell_the_data_folder_another_way(tiny_data_dir):
    saved = {"hyper_parameters": {"learning_rate": 1e-4, "pooling": "cls", "model_name_or_path": "/old/place"},
             "datamodule_hyper_parameters": {"data_dir": str(tiny_data_dir), "batch_size": 8, "num_workers": None}}
    same = {"model": {"learning_rate": None, "pooling": "cls", "model_name_or_path": "/new/place"},
            "data": {"data_dir": f"{tiny_data_dir}/../{tiny_data_dir.name}", "batch_size": 8, "num_workers": 2}}
    checkpoints.check_same_settings("last.ckpt", saved, same)  # no error
    with pytest.raises(checkpoints.CheckpointError, match="trained with --model.pooling cls, not mean"):
        checkpoints.check_same_settings("last.ckpt", saved, {**same, "model": {**same["model"], "pooling": "mean"}})


@pytest.mark.slow
def test_a_run_with_ema_stopped_and_resumed_ends_bit_identical_to_an_undisturbed_one(tmp_path, tiny_model_dir, tiny_data_dir):
    """The average (the checkpoint's state_dict) and the trained weights (current_model_state) both resume."""
    from checkpoints import load_checkpoint

    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "2", "--model.ema_decay", "0.9"]
    (tmp_path / "undisturbed").mkdir()
    (tmp_path / "resumed").mkdir()
    assert train_in_process(tmp_path / "undisturbed", args).returncode == 0
    stopped = train_in_process(tmp_path / "resumed", args, signals={9: signal.SIGTERM})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    command = shlex.split(stopped.stdout.split("Resume with:\n")[1].splitlines()[0])
    final = train_in_process(tmp_path / "resumed", command[2:])
    assert final.returncode == 0, final.stderr[-3000:]
    for name in ("last.ckpt", Path(metrics(tmp_path / "undisturbed/logs/cola/version_0")["best_model_path"]).name):
        ends = [load_checkpoint(tmp_path / run / "logs/cola/version_0/checkpoints" / name) for run in ("undisturbed", "resumed")]
        assert ends[0]["global_step"] == ends[1]["global_step"]
        for key in ("state_dict", "current_model_state"):
            assert ends[0][key].keys() == ends[1][key].keys()
            assert all(torch.equal(ends[0][key][n], ends[1][key][n]) for n in ends[0][key]), (name, key)
    # The best checkpoint was saved at a validation: its state_dict is the average, not the weights as trained.
    assert not all(torch.equal(ends[0]["state_dict"][n], ends[0]["current_model_state"][n]) for n in ends[0]["state_dict"])
