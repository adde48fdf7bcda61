"""Run folders and checkpoint files: version numbering, best-checkpoint discovery, safe loading.

Used by train.py (which also finds here the run folder a resumed or requeued SLURM run continues in),
inference.py, export.py and serve.py. Imports no torch or Lightning at module level: inference's fast
path never opens a checkpoint, only the ONNX export cached for it.
"""

import contextlib
import json
import mmap
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Optional

LOG_DIR = Path("logs/cola")  # TensorBoardLogger's save_dir/name as train.py sets them
SLURM_JOB_FILE = "slurm_job_id"  # in a run folder: the SLURM job that trains it, so that a requeued job finds it


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
    root.mkdir(parents=True, exist_ok=True)
    while True:
        numbers = run_numbers(root)
        version = f"version_{numbers[0] + 1 if numbers else 0}"
        try:
            (root / version).mkdir()
            return version
        except FileExistsError:
            continue


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


def find_best_checkpoint(log_dir: Path = LOG_DIR) -> Path:
    """The checkpoint ModelCheckpoint marked best in the most recent run (highest version_N) that has one.
    Newer runs that cannot be used (none saved yet, or damaged) are named in one line on stderr."""
    skipped = []
    for number in run_numbers(log_dir):
        run_dir = log_dir / f"version_{number}"
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
                start = member.header_offset + 30 + name_length + extra_length
                with memoryview(data)[start : start + member.compress_size] as stored:
                    if zlib.crc32(stored) != member.CRC:
                        return f"damaged: the bytes of {member.filename} do not match their CRC-32 (changed after saving); this checkpoint cannot be used"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError):
        return "not a checkpoint: not the zip archive that torch.save writes (another kind of file, or cut short)"
    return None


def load_checkpoint(path: Path) -> dict:
    """torch.load without executing pickled code (weights_only), of a file whose every byte is as saved
    (archive_damage); memory-mapped, so the optimizer state stored beside the weights costs nothing."""
    import torch

    damage = archive_damage(path)
    if damage:
        raise CheckpointError(f"{path}: {damage}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError...: all mean "not a usable file"
        raise CheckpointError(f"{path}: not a loadable checkpoint (truncated, tampered or another format): {first_line(e)}")
    if not isinstance(checkpoint, dict) or not {"hf_config", "tokenizer_files", "state_dict"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model config or tokenizer inside)")
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


def check_resumable(ckpt_path: str) -> None:
    """Refuse, in one line, a --ckpt_path that is missing, truncated, tampered with or not this project's,
    before anything slow starts. Read like Lightning will: torch.load(weights_only=True), no pickled code."""
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"{ckpt_path}: checkpoint not found")
    checkpoint = load_checkpoint(Path(ckpt_path))
    if not {"loops", "optimizer_states"} <= checkpoint.keys():
        raise CheckpointError(f"{ckpt_path}: holds model weights only, no training state to resume from")
