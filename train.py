"""Fine-tune a pretrained BERT on CoLA.

    python train.py                                   # BERT-base from the Hub, 3 epochs
    python train.py --help                            # every model, data and Trainer option
    python train.py --config my.yaml                  # the same options from YAML
    python train.py --ckpt_path logs/cola/version_0/checkpoints/last.ckpt   # resume that run
"""

import json
import math
import os
import shlex
import signal
import sys
import threading
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import fsspec
import torch
from jsonargparse import Namespace
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor, Timer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from data import ColaDataModule, DataError
from hub import HubError
from inference import InputError, load_checkpoint, run_numbers
from model import ColaModel, NonFiniteLossError, OptionError

RUN_VERSION_ENV = "COLA_RUN_VERSION"  # rank zero's run folder, for the DDP processes Lightning starts

# ThroughputMonitor would also report FLOPs if the model declared them; samples and tokens per second suffice.
warnings.filterwarnings("ignore", message=".*`flops_per_batch`.*")
# Lightning suggests DataLoader workers; on small CPUs they compete with training for cores (see data.py).
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# Resuming mid-epoch, Lightning warns unless the DataLoader has state_dict(); ours resumes another way (data.py).
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


class CheckpointError(Exception):
    """A --ckpt_path that cannot be resumed from, reported as one line."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its final name, then renames it over that name: a run killed while
    saving leaves the previous file whole, at worst a `*.ckpt.partial` file to delete.

    Lightning's own save writes to the system's temporary folder and then *moves* the file, which is a
    copy straight into the final name when that folder is on another filesystem (tmpfs /tmp, say).
    """

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        if fsspec.utils.get_protocol(str(path)) != "file":  # s3:// and the like: Lightning's fsspec upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the name points at it, in case the machine goes down
        os.replace(partial, path)


def ends_an_epoch(trainer: Trainer) -> bool:
    """Whether the training step just done was its epoch's last. A checkpoint saved there, before the epoch's
    validation, resumes past that validation: Lightning 2.6 counts the epoch as finished. So none is saved there."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


class MidEpochCheckpoint(ModelCheckpoint):
    """Saves last.ckpt during epochs too, every train_time_interval, so that a killed run loses little
    (the first ModelCheckpoint saves the best and last.ckpt after each validation)."""

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if not ends_an_epoch(trainer):
            super().on_train_batch_end(trainer, *args, **kwargs)


class EarlyStoppingAfterWarmup(EarlyStopping):
    """Early stopping that starts watching once the learning-rate warmup has ended: during warmup val_mcc
    often stays at 0 (the model first predicts the majority class), which would use up the patience."""

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        if trainer.global_step >= trainer.lightning_module.warmup_steps:
            super()._run_early_stopping_check(trainer)


class SanityChecks(Callback):
    """Logs, before the run gets far, the facts that explain most failed CoLA runs: the class balance
    (about 70% acceptable), a loss at initialisation far from ln 2, and a val_mcc still 0 after warmup."""

    def on_train_start(self, trainer: Trainer, model: ColaModel) -> None:
        for split, dataset in trainer.datamodule.splits.items():
            labels = dataset["labels"]
            fraction = sum(labels) / max(len(labels), 1)
            rank_zero_info(f"{split}: {len(labels)} sentences, {fraction:.1%} acceptable")
            if trainer.logger:
                trainer.logger.log_metrics({f"data/{split}_acceptable_fraction": fraction}, step=0)

    def on_train_batch_end(self, trainer: Trainer, model: ColaModel, outputs: Any, *_: Any) -> None:
        if trainer.global_step != 1:  # the first step's loss was computed before any update: the loss at init
            return
        loss = float(outputs["loss"])
        rank_zero_info(f"loss at initialisation {loss:.3f} (ln 2 = {math.log(2):.3f} for a fresh two-class head)")
        if abs(loss - math.log(2)) > 0.25:
            rank_zero_warn(
                f"loss at initialisation is {loss:.3f}, far from ln 2 = 0.693: the classifier head is not fresh"
                " (a fine-tuned model as --model.model_name_or_path?) or the labels are not 0/1"
            )

    def on_validation_end(self, trainer: Trainer, model: ColaModel) -> None:
        if trainer.sanity_checking or trainer.global_step < model.warmup_steps:
            return
        if float(trainer.callback_metrics.get("val_mcc", 1.0)) == 0.0:
            rank_zero_warn(
                f"val_mcc is 0 after warmup (step {trainer.global_step}): the model predicts one class only."
                f" The usual cause is the learning rate ({model.hparams.learning_rate:g}): too high makes the model"
                " collapse to the majority class; try a lower one"
            )


def resume_command(ckpt_path: str) -> str:
    """This command line again, resuming from ckpt_path."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if not skip and arg != "--ckpt_path" and not arg.startswith("--ckpt_path="):
            args.append(arg)
        skip = arg == "--ckpt_path"
    return shlex.join(["python", sys.argv[0], *args, "--ckpt_path", ckpt_path])


class StopOnCtrlC(Callback):
    """Ctrl-C (SIGINT) stops training cleanly: the current training step finishes, last.ckpt is saved
    there and the command to resume is printed. A second Ctrl-C stops at once, without saving.

    Lightning's own handling stops wherever the program is, half-way through an optimizer step even; the
    state there could not resume into the same run. Raising KeyboardInterrupt between steps lets Lightning
    shut down as usual (on_exception hooks, DDP processes ended, exit status 1).
    """

    def __init__(self) -> None:
        self.requested = False
        self._default_handler = None

    def on_train_start(self, trainer: Trainer, *_: Any) -> None:
        self.requested, self._is_global_zero = False, trainer.is_global_zero
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._default_handler = signal.signal(signal.SIGINT, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._default_handler)  # the next Ctrl-C interrupts at once
        if self._is_global_zero:
            print("\nCtrl-C: stopping after this training step (Ctrl-C again stops at once, without saving)", file=sys.stderr)

    def on_train_batch_end(self, trainer: Trainer, *_: Any) -> None:
        if ends_an_epoch(trainer):  # stop after the next step instead, once the epoch is validated
            return
        requested = self.requested
        if trainer.world_size > 1:  # any process's Ctrl-C stops all, after the same step
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:
            path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
            trainer.save_checkpoint(path, weights_only=False)  # everything, to resume from
            if trainer.is_global_zero:
                print(f"\nStopped at step {trainer.global_step}, saved {path}. Resume with:\n  {resume_command(path)}")
        raise KeyboardInterrupt

    def on_train_end(self, *_: Any) -> None:
        if self._default_handler is not None and not self.requested:
            signal.signal(signal.SIGINT, self._default_handler)


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


def check_resumable(ckpt_path: str) -> None:
    """Refuse, in one line, a --ckpt_path that is missing, truncated, tampered with or not this project's,
    before anything slow starts. Read like Lightning will: torch.load(weights_only=True), no pickled code."""
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"{ckpt_path}: checkpoint not found")
    try:
        checkpoint = load_checkpoint(Path(ckpt_path))
    except InputError as e:
        raise CheckpointError(str(e)) from None
    if not {"loops", "optimizer_states"} <= checkpoint.keys():
        raise CheckpointError(f"{ckpt_path}: holds model weights only, no training state to resume from")


class ColaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Resume training from this last.ckpt.")
        parser.add_argument(
            "--save_last_every_minutes", type=Optional[float], default=10.0,
            help="Also save last.ckpt during epochs, this often (0: after every step; null: only after validation).",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_mcc",  # CoLA's official metric
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{val_mcc:.4f}",
                # Overwrite, never add -v1 copies: last.ckpt has several writers, and a resumed run rewrites
                # the same best checkpoint when it redoes the validation an interrupted run had done.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(EarlyStoppingAfterWarmup, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_mcc", "early_stopping.mode": "max", "early_stopping.patience": 3})

    def before_instantiate_classes(self) -> None:
        ckpt_path, logger = self.config.ckpt_path, self.config.trainer.logger
        if ckpt_path:
            check_resumable(ckpt_path)
        init_args = logger.get("init_args", {}) if isinstance(logger, Namespace) else {}
        if not all(key in init_args for key in ("save_dir", "name", "version")):
            return
        if ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
            # Resuming .../version_N/checkpoints/last.ckpt continues in version_N: same TensorBoard run, same checkpoints.
            logger.init_args.version = Path(ckpt_path).parent.parent.name
        elif logger.init_args.version is None:
            if rank_zero_only.rank == 0:
                logger.init_args.version = claim_run_version(Path(logger.init_args.save_dir) / logger.init_args.name)
                os.environ[RUN_VERSION_ENV] = logger.init_args.version
            else:  # a DDP process that Lightning started by running this script again: rank zero's folder
                logger.init_args.version = os.environ.get(RUN_VERSION_ENV)

    def instantiate_classes(self) -> None:
        # TF32 matrix products on Ampere+ GPUs (tensor cores, 10-bit mantissa inputs, fp32 accumulation).
        # Set for CUDA alone, so that CPU products stay exact fp32.
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # unless --trainer.plugins chose another
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        minutes = self.config.save_last_every_minutes
        if minutes is not None:
            interval = timedelta(minutes=minutes)
            trainer.callbacks.append(
                MidEpochCheckpoint(save_last=True, save_top_k=0, train_time_interval=interval, enable_version_counter=False)
            )
        return trainer


def report(trainer: Trainer, datamodule: ColaDataModule, timer: Timer) -> None:
    """Print and save the outcome of a run: best val_mcc, where the checkpoints are, what to run next."""
    checkpoint = trainer.checkpoint_callback
    best_mcc = float(checkpoint.best_model_score)
    train_seconds = timer.time_elapsed("train")
    train_size = len(datamodule.splits["train"])  # all ranks together see it once per epoch
    samples_per_epoch = min(train_size, trainer.num_training_batches * datamodule.hparams.batch_size * trainer.world_size)
    summary = {
        "best_val_mcc": best_mcc,
        "best_model_path": checkpoint.best_model_path,
        "last_model_path": checkpoint.last_model_path,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_seconds": train_seconds,
        # Same definition as the Hugging Face Trainer's train_samples_per_second (validation time included).
        "train_samples_per_second": trainer.current_epoch * samples_per_epoch / train_seconds,
        "last_epoch_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    run_dir = Path(trainer.logger.log_dir)
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    hparams = {**trainer.lightning_module.hparams, **datamodule.hparams, "max_epochs": trainer.max_epochs}
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # drop LightningCLI's bookkeeping
    trainer.logger.log_hyperparams(hparams, metrics={"hp/best_val_mcc": best_mcc})
    trainer.logger.finalize("success")  # fit had closed the event file; logging reopened it: flush and close
    print(f"\nBest val_mcc {best_mcc:.4f}: {checkpoint.best_model_path}")
    print(f"Run folder (metrics.json, TensorBoard): {run_dir}")
    print(f'Next: python inference.py --checkpoint {checkpoint.best_model_path} "The boy is sitting on a bench."')


def main() -> None:
    timer = Timer()
    cli = ColaCLI(
        ColaModel,
        ColaDataModule,
        run=False,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "max_epochs": 3,
            # fp32 everywhere, TF32 on GPUs. bf16-mixed was 1.9x *slower* for BERT-base at batch 32 on an H200
            # (CoLA's ~12-token sentences leave the GPU waiting on kernel launches, and autocast adds casts);
            # --trainer.precision bf16-mixed pays off for long sentences or large batches.
            "precision": "32-true",
            "log_every_n_steps": 10,
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "logs", "name": "cola", "default_hp_metric": False},
            },
            "callbacks": [
                LearningRateMonitor(logging_interval="step"),
                ThroughputMonitor(
                    batch_size_fn=lambda batch: batch["input_ids"].size(0),
                    length_fn=lambda batch: int(batch["attention_mask"].sum()),  # real (unpadded) tokens
                ),
                timer,
                StopOnCtrlC(),
                SanityChecks(),
            ],
        },
    )
    # weights_only: resuming never runs code pickled into a checkpoint (check_resumable already refused such a file).
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, weights_only=True)
    if cli.trainer.is_global_zero:
        report(cli.trainer, cli.datamodule, timer)


def run() -> None:
    """main() as a command: a problem with the user's data, model id, network, checkpoint or learning rate
    is one line on stderr (once under DDP) and exit status 1, not a traceback."""
    try:
        main()
    except (DataError, HubError, CheckpointError, NonFiniteLossError, OptionError) as e:
        if rank_zero_only.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training started (during it, StopOnCtrlC and Lightning handle it)
        print("\ninterrupted before training started: nothing to save", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
