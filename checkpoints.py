"""Run folders and checkpoint files: version numbering, best-checkpoint discovery, safe loading.

Used by train.py (which also finds here the run folder a resumed or requeued SLURM run continues in),
inference.py, export.py and serve.py. Imports no torch or Lightning at module level: inference's fast
path never opens a checkpoint, only the ONNX export cached for it.
"""

import contextlib
import glob
import json
import mmap
import os
import pickle
import re
import shutil
import socket
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Optional

LOG_DIR = Path("logs/cola")  # TensorBoardLogger's save_dir/name as train.py sets them for CoLA (logs/TASK for others)
SLURM_JOB_FILE = "slurm_job_id"  # in a run folder: the SLURM job that trains it, so that a requeued job finds it
SWEEP_FILE = "tune.json"  # in a run folder of a tune.py trial: {"study", "trial", "state": running, pruned or complete}


def temporary_path(path: Path) -> Path:
    """Where an atomic writer puts path's bytes before os.replace() moves them in place: beside it (one
    filesystem), named for this machine and process, so that remove_dead_writers_files can tell a killed
    writer's leftover from a live one's."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def remove_dead_writers_files(folder: Path) -> None:
    """The temporary files (or folders) of writers on this machine that were killed mid-write, removed: kill -9
    and the out-of-memory killer run no clean-up, and nothing else would ever remove them. Every atomic writer
    calls it on its folder first."""
    for leftover in folder.glob(f".*.{glob.escape(socket.gethostname())}.*.tmp"):
        pid = leftover.name.removesuffix(".tmp").rpartition(".")[2]
        if pid.isdigit() and process_gone(int(pid)):
            with contextlib.suppress(OSError):  # a read-only folder: the write itself then says what is wrong
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        pass
    return False


class CheckpointError(Exception):
    """A checkpoint or run folder that cannot be used, reported as one line."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to one short line (library errors can run to pages), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def run_numbers(log_dir: Path) -> list[int]:
    """The N of each version_N run folder under log_dir (TensorBoardLogger's layout), newest first."""
    names = (d.name.removeprefix("version_") for d in log_dir.glob("version_*"))
    return sorted((int(n) for n in names if n.isdigit()), reverse=True)


def claim_run_version(root: Path) -> str:
    """The next free version_N folder under root, created here. os.mkdir fails for all but one of several
    runs that want the same N, so runs started at the same moment get different folders (the logger would
    list the folders and create one later: both could pick the same)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            numbers = run_numbers(root)
            version = f"version_{numbers[0] + 1 if numbers else 0}"
            try:
                (root / version).mkdir()
                return version
            except FileExistsError:
                continue
    except OSError as e:  # read-only, a file where a folder should be, a full disk
        file = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
        raise CheckpointError(
            f"{root}: cannot create a run folder there ({f'{file} is a file' if file else e.strerror}): fix it, or log elsewhere with"
            " --trainer.logger.init_args.save_dir DIR"
        ) from None


def run_folder_of(ckpt_path: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to: RUN for RUN/checkpoints/*.ckpt and for RUN/hpc_ckpt_N.ckpt
    (Lightning's SLURM requeue checkpoint, saved in the Trainer's default_root_dir, which train.py sets to the
    run folder), where RUN holds the hparams.yaml that TensorBoardLogger writes before the first step; None for
    a checkpoint kept anywhere else (a copy in ~/backup/checkpoints/ must not make ~/backup a run folder)."""
    ckpt_path = Path(ckpt_path).resolve()
    if ckpt_path.name.startswith("hpc_ckpt_"):
        run_dir = ckpt_path.parent
    elif ckpt_path.parent.name == "checkpoints":
        run_dir = ckpt_path.parent.parent
    else:
        return None
    return run_dir if (run_dir / "hparams.yaml").is_file() else None


def resumed_run_folder(ckpt_path: Path) -> Optional[Path]:
    """The run folder that ckpt_path belongs to (see run_folder_of), relative to here if it is below. A
    resumed run continues there, wherever that is: in another folder's logs/cola/version_0 too, never in
    this folder's version_0."""
    run_dir = run_folder_of(ckpt_path)
    if run_dir is None:
        return None
    with contextlib.suppress(ValueError):  # not below here
        run_dir = run_dir.relative_to(Path.cwd().resolve())
    return run_dir


def slurm_job() -> Optional[str]:
    """This SLURM job's id (as Lightning's auto-requeue names it), or None outside SLURM.

    SLURM sends the signal of `#SBATCH --signal=SIGUSR1@90` before the time limit; Lightning's
    SLURMEnvironment (auto_requeue, on by default) saves hpc_ckpt_N.ckpt in default_root_dir, here the run
    folder, and requeues the job, whose SIGTERM then makes StopOnSignal save last.ckpt. The requeued job
    keeps its id: train.py finds the run folder by it and resumes from the newer of the two checkpoints.
    """
    from lightning_fabric.plugins.environments import SLURMEnvironment  # Lightning: for training only

    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")


def requeued_slurm_run(root: Path, job: Optional[str]) -> Optional[Path]:
    """The run folder that this SLURM job trained before it was requeued (SLURM counts restarts in
    SLURM_RESTART_COUNT; a second run in the same allocation is no restart and gets a new folder)."""
    if not job or int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        return None
    for number in run_numbers(root):
        with contextlib.suppress(OSError):
            if (root / f"version_{number}" / SLURM_JOB_FILE).read_text().strip() == job:
                return root / f"version_{number}"
    return None


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newer of a run's last.ckpt and Lightning's SLURM requeue checkpoints, if any."""
    saved = [*run_dir.glob("hpc_ckpt_*.ckpt"), *run_dir.glob("checkpoints/last.ckpt")]
    return max(saved, key=lambda path: path.stat().st_mtime) if saved else None


RUN_VERSION_ENV = "COLA_RUN_VERSION"  # rank zero's run folder, for the DDP processes Lightning starts


def requeued_checkpoint(root: Path, ckpt_path: Optional[str], version: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(the checkpoint to resume from, the run version): as given; for a SLURM job requeued without
    --ckpt_path, the newest checkpoint of the run folder it trained, or, if it saved none, that folder to
    start again in."""
    requeued = None if ckpt_path else requeued_slurm_run(root, slurm_job())
    if requeued is None:
        return ckpt_path, version
    checkpoint = newest_checkpoint(requeued)
    return (str(checkpoint), version) if checkpoint else (None, requeued.name)


def choose_run_folder(root: Path, version: Optional[str], ckpt_path: Optional[str], rank_zero: bool) -> tuple[Optional[Path], bool]:
    """The run folder a training run writes to, and whether this process created it: a resumed checkpoint's
    own run folder (see resumed_run_folder); root/version if a version is given; else a new version_N that
    rank zero claims under root, records its SLURM job in, and passes to the DDP processes Lightning starts
    (RUN_VERSION_ENV). None: a DDP process started without that variable, which leaves it to the logger."""
    if ckpt_path:
        run_dir = resumed_run_folder(Path(ckpt_path))
        if run_dir is not None:
            if rank_zero:
                check_writable(run_dir)
                print(f"Resuming in the checkpoint's run folder, {run_dir}", file=sys.stderr)
            return run_dir, False
    if version is not None:
        return root / version, False
    if not rank_zero:  # a DDP process that Lightning started by running train.py again: rank zero's folder
        version = os.environ.get(RUN_VERSION_ENV)
        return (root / version if version else None), False
    run_dir = root / claim_run_version(root)
    os.environ[RUN_VERSION_ENV] = run_dir.name
    job = slurm_job()
    if job:
        (run_dir / SLURM_JOB_FILE).write_text(job + "\n")
    if ckpt_path:
        print(f"{ckpt_path} is not in a run folder's checkpoints/ folder: resuming in a new run folder, {run_dir}", file=sys.stderr)
    return run_dir, True


def check_writable(run_dir: Path) -> None:
    """Refuse, in one line, a run folder to resume in that cannot be written (the logger's writer thread
    would fail with a traceback). Tried by writing, as permission bits do not stop root."""
    for folder in (run_dir, run_dir / "checkpoints"):
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise CheckpointError(
                f"{folder}: cannot write there to resume the run ({e.strerror}): make it writable, or resume from"
                " a copy of the checkpoint kept elsewhere, in a new run folder"
            ) from None


def sweep_of(run_dir: Path) -> Optional[dict]:
    """What tune.py wrote in a trial's run folder (see SWEEP_FILE); None for a plain train.py run."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        sweep = json.loads((run_dir / SWEEP_FILE).read_text(encoding="utf-8"))
        return sweep if isinstance(sweep, dict) else None
    return None


def best_score(metrics: dict) -> float:
    """A run's best validation score in its metrics.json: best_val_mcc, best_val_accuracy... as its "monitor" says
    (runs from before other tasks have no monitor: theirs was val_mcc)."""
    return float(metrics[f"best_{metrics.get('monitor', 'val_mcc')}"])


def best_trial_checkpoint(log_dir: Path, study: str) -> Optional[Path]:
    """The best checkpoint of the study's best finished trial under log_dir (by metrics.json, whose best score
    is the trial's value in Optuna; of equals the first trial), or None if none has finished; pruned trials never count."""
    best, best_key = None, (float("-inf"), 0)
    for number in run_numbers(log_dir):
        run_dir = log_dir / f"version_{number}"
        sweep = sweep_of(run_dir)
        if not sweep or sweep.get("study") != study or sweep.get("state") != "complete":
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, CheckpointError):
            score = best_score(json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")))
            checkpoint, key = best_checkpoint_of_run(run_dir), (score, -int(sweep["trial"]))
            if checkpoint is not None and key > best_key:
                best, best_key = checkpoint, key
    return best


def find_best_checkpoint(log_dir: Path = LOG_DIR) -> Path:
    """The checkpoint ModelCheckpoint marked best in the most recent run (highest version_N) that has one; if that
    run is a trial of a tune.py sweep, the best checkpoint of the sweep's best trial (a pruned trial never is).
    Newer runs that cannot be used (none saved yet, or damaged) are named in one line on stderr."""
    skipped = []
    for number in run_numbers(log_dir):
        run_dir = log_dir / f"version_{number}"
        sweep = sweep_of(run_dir)
        best = sweep and best_trial_checkpoint(log_dir, sweep.get("study"))
        if best:
            return best
        if sweep:  # a trial that was pruned, or of a sweep that has finished none yet
            continue
        try:
            best = best_checkpoint_of_run(run_dir)
        except CheckpointError as e:
            skipped.append(f"version_{number} ({e})")
            continue
        if best is None:
            skipped.append(f"version_{number} (no best checkpoint yet)")
            continue
        if skipped:
            print(f"note: using {run_dir}: the newer {', '.join(skipped)} cannot be used", file=sys.stderr)
        return best
    if skipped:
        raise CheckpointError(f"no usable run under {log_dir}: {', '.join(skipped)}; pass --checkpoint")
    raise CheckpointError(f"no trained run under {log_dir}: train one first with `python train.py`, or pass --checkpoint")


def best_checkpoint_of_run(run_dir: Path) -> Optional[Path]:
    """metrics.json names the best checkpoint of a finished run; an unfinished run's last.ckpt remembers it.
    None while the run has saved none; CheckpointError (the reason, without the path) for a damaged run."""
    best_path = None
    if (run_dir / "metrics.json").is_file():
        try:
            best_path = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["best_model_path"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise CheckpointError("its metrics.json is not valid JSON with a best_model_path") from None
        if not isinstance(best_path, str):
            raise CheckpointError("its metrics.json is not valid JSON with a best_model_path")
    elif (run_dir / "checkpoints" / "last.ckpt").is_file():
        try:
            state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt").get("callbacks", {})
            best_path = next((v["best_model_path"] for k, v in state.items() if k.startswith("ModelCheckpoint")), None)
        except (CheckpointError, AttributeError, KeyError, TypeError):
            raise CheckpointError("its checkpoints/last.ckpt is damaged and there is no metrics.json") from None
    if not best_path:
        return None
    # The path was recorded relative to where training ran; the file sits in this run's checkpoints folder.
    best = run_dir / "checkpoints" / Path(best_path).name
    if not best.is_file():
        raise CheckpointError(f"its best checkpoint, checkpoints/{best.name}, is missing")
    return best


def resolve_checkpoint(path: Path) -> Path:
    """A .ckpt file as given, the best checkpoint of a run folder, or of the latest run in a folder of runs."""
    if path.is_dir() and run_numbers(path):  # logs/cola, say
        return find_best_checkpoint(path)
    if path.is_dir():
        try:
            best = best_checkpoint_of_run(path)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: this run folder cannot be used: {e}") from None
        if best is None:
            raise CheckpointError(f"{path}: no best checkpoint here: give a .ckpt file, a run folder or a folder of runs")
        return best
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint: not a regular file (a device, pipe or socket)")
    return path


def archive_damage(path: Path) -> Optional[str]:
    """Why path is not a whole torch.save file, or None. torch.save writes a zip archive whose members (the
    pickled structure, one per tensor) are stored uncompressed with the CRC-32 of their bytes; torch.load
    checks none of them, so changed bytes would load as other weights. Checked here on a memory map, without
    copying: 0.13 s for MiniLM's 178 MB checkpoint, where zipfile's testzip(), which copies every byte, took
    0.25 s (benchmarks/README.md, "Integrity checks at start-up")."""
    import zipfile  # ~0.01 s: only where a checkpoint is opened, never on inference's fast path

    if path.stat().st_size == 0:
        return "empty (0 bytes), not a checkpoint"
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for member in archive.infolist():
                # A local file header: 30 bytes, then the name and the extra field (torch's alignment padding).
                header = data[member.header_offset : member.header_offset + 30]
                if header[:4] != b"PK\x03\x04" or member.compress_type != zipfile.ZIP_STORED:
                    return f"damaged: its zip entry {member.filename} is broken; this checkpoint cannot be used"
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                # The name twice (local header, central directory), as zipfile.open compares them: torch finds a tensor
                # by its name, so one changed character would load as a missing key, past the CRC-32s below.
                if data[member.header_offset + 30 : member.header_offset + 30 + name_length] != member.orig_filename.encode():
                    return f"damaged: its zip entry {member.filename} is broken; this checkpoint cannot be used"
                start = member.header_offset + 30 + name_length + extra_length
                with memoryview(data)[start : start + member.compress_size] as stored:
                    if zlib.crc32(stored) != member.CRC:
                        return f"damaged: the bytes of {member.filename} do not match their CRC-32 (changed after saving); this checkpoint cannot be used"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError):
        return "not a checkpoint: not the zip archive that torch.save writes (another kind of file, or cut short)"
    return None


def file_identity(path: Path) -> str:
    """The file as the file system knows it. Any write changes its ctime (which no tool can set back) and a
    replacement its inode, so an unchanged identity means unchanged content, without the ~0.12 s of hashing
    a 90 MB checkpoint."""
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def load_checkpoint(path: Path) -> dict:
    """torch.load without executing pickled code (weights_only), of a file whose every byte is as saved
    (archive_damage); memory-mapped, so the optimizer state stored beside the weights costs nothing. The
    weights are copied out of the map while the file is as checked: a file written over later (`cp other.ckpt
    best.ckpt` under a server) changes nothing loaded, where through the map its new bytes, never checked,
    would reach the model."""
    import torch

    identity = file_identity(path)
    damage = archive_damage(path)
    if damage:
        raise CheckpointError(f"{path}: {damage}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError...: all mean "not a usable file"
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            # torch's text goes on to advise weights_only=False, which would run the code: name what was refused, never that.
            blocked = re.search(r"GLOBAL (\S+)", str(e))
            what = f"a pickled {blocked[1]}" if blocked else "pickled objects beyond tensors and plain data"
            raise CheckpointError(f"{path}: refused: it holds {what}, which loading could run as code; this project's"
                                  " checkpoints hold only weights and plain data") from None
        raise CheckpointError(f"{path}: not a loadable checkpoint (truncated, tampered or another format): {first_line(e)}")
    if not isinstance(checkpoint, dict) or not {"hf_config", "tokenizer_files", "state_dict"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model config or tokenizer inside)")
    checkpoint["state_dict"] = {name: tensor.clone() for name, tensor in checkpoint["state_dict"].items()}
    if file_identity(path) != identity:
        raise CheckpointError(f"{path}: written while it was being loaded; load it again once it is complete")
    damage = model_config_damage(checkpoint["hf_config"]) or tokenizer_damage(checkpoint["tokenizer_files"])
    if damage:
        raise CheckpointError(f"{path}: {damage}; this checkpoint cannot be used, pick another one")
    return checkpoint


def model_config_damage(config) -> Optional[str]:
    """What is wrong with a checkpoint's hf_config for prediction (its labels, its architecture), or None."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return "its model config (hf_config) is damaged: no model_type"
    labels = config.get("id2label")
    try:
        ids = sorted(int(k) for k in labels)
    except (TypeError, ValueError):
        return "its model config (hf_config) is damaged: id2label is not a mapping of class ids to labels"
    if not ids or ids != list(range(len(ids))) or not all(isinstance(v, str) for v in labels.values()):
        return "its model config (hf_config) is damaged: id2label is not a mapping of class ids to labels"
    return None


def tokenizer_damage(files) -> Optional[str]:
    """What is wrong with a checkpoint's tokenizer_files, or None: tokenizer.json must load in `tokenizers`."""
    from tokenizers import Tokenizer  # ~0.1 s, and only where a checkpoint is opened anyway

    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return "its tokenizer (tokenizer_files) is damaged"
    try:
        Tokenizer.from_str(files["tokenizer.json"])
    except Exception:  # KeyError, or the Rust side's own Exception for text that is not a tokenizer
        return "its tokenizer (tokenizer_files) is damaged: tokenizer.json does not load"
    return None


def check_resumable(ckpt_path: str, settings: dict[str, dict]) -> None:
    """Refuse, in one line, a --ckpt_path that is missing, truncated, tampered with or not this project's,
    before anything slow starts. Read like Lightning will: torch.load(weights_only=True), no pickled code.
    settings: this command's {"data": ..., "model": ...} options, which must be those the run was trained with."""
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"{ckpt_path}: checkpoint not found")
    checkpoint = load_checkpoint(Path(ckpt_path))
    if not {"loops", "optimizer_states"} <= checkpoint.keys():
        raise CheckpointError(f"{ckpt_path}: holds model weights only, no training state to resume from")
    check_same_settings(ckpt_path, checkpoint, settings)


# What a resume may change: where the model is read from (its weights are checked against the checkpoint's
# when they load) and how many processes load batches (the batches stay the same).
FREE_ON_RESUME = {"model_name_or_path", "num_workers"}


def check_same_settings(ckpt_path: str, checkpoint: dict, settings: dict[str, dict]) -> None:
    """A resume continues the run exactly only with the settings it was trained with: another batch size
    changes the steps per epoch (the schedule would no longer reach 0), another data folder or max_length
    other batches, another learning rate is ignored (the optimizer's saved state has the old one)."""
    # The model first: options linked into the data (--model.teacher) are named as the user gives them.
    for group, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        saved = checkpoint.get(key) or {}
        if group == "model":
            saved = {"teacher": None, **saved}  # a checkpoint older than --model.teacher was trained without one
        for name, value in settings[group].items():
            if name in FREE_ON_RESUME or name not in saved or saved[name] == value:
                continue
            if name == "learning_rate" and value is None:
                continue  # "the default": the model saved the one it picked by model size
            if name in ("data_dir", "train_file", "validation_file", "teacher", "unlabelled_file") and saved[name] and value and Path(saved[name]).resolve() == Path(value).resolve():
                continue  # the same folder, spelt another way
            raise CheckpointError(
                f"{ckpt_path}: trained with --{group}.{name} {saved[name]}, not {value}: resume with the options"
                " it was trained with (its run folder's config.yaml has them), or start a new run"
            )


def check_same_weights(where: str, ours: dict, theirs: dict, model_name_or_path: str) -> None:
    """CheckpointError unless the checkpoint's weights (theirs) have the names and shapes of the model's (ours): checked
    before Lightning loads them, whose own errors would be tracebacks."""
    if ours.keys() != theirs.keys():
        name = sorted(ours.keys() ^ theirs.keys())[0]
        raise CheckpointError(
            f"{where}: a checkpoint of another model ({name} is only in one of it and"
            f" {model_name_or_path}): resume with the --model.model_name_or_path it was trained from"
        )
    for name, weight in theirs.items():
        if ours[name].shape != weight.shape:
            raise CheckpointError(
                f"{where}: a checkpoint of a model of another size ({name}: {tuple(weight.shape)}, but"
                f" {tuple(ours[name].shape)} in {model_name_or_path}): resume with the"
                " --model.model_name_or_path it was trained from"
            )


def check_rng_states(where: str, states: Optional[dict]) -> None:
    """CheckpointError for a saved random state that torch cannot set (tried now, so that a damaged one is one line)."""
    if not states:
        return
    import torch  # here alone: inference and serve.py read checkpoints without PyTorch

    saved = torch.get_rng_state()
    try:
        torch.set_rng_state(states["cpu"])
    except Exception as e:  # KeyError, TypeError, RuntimeError: all mean a damaged file
        raise CheckpointError(f"{where}: its saved random state is damaged ({type(e).__name__}: {e})") from None
    finally:
        torch.set_rng_state(saved)
