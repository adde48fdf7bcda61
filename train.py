"""Fine-tune a pretrained BERT on CoLA.

    python train.py                                   # BERT-base from the Hub, 3 epochs
    python train.py --help                            # every model, data and Trainer option
    python train.py --config my.yaml                  # the same options from YAML
    python train.py --ckpt_path logs/cola/version_0/checkpoints/last.ckpt   # resume that run
"""

import json
import logging
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import Namespace
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor, Timer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from callbacks import AtomicCheckpointIO, EarlyStoppingAfterWarmup, MidEpochCheckpoint, SanityChecks, StopOnCtrlC
from checkpoints import CheckpointError, check_resumable, claim_run_version
from data import ColaDataModule, DataError
from hub import HubError
from model import ColaModel, NonFiniteLossError, OptionError

RUN_VERSION_ENV = "COLA_RUN_VERSION"  # rank zero's run folder, for the DDP processes Lightning starts

# ThroughputMonitor would also report FLOPs if the model declared them; samples and tokens per second suffice.
warnings.filterwarnings("ignore", message=".*`flops_per_batch`.*")
# Lightning suggests DataLoader workers; on small CPUs they compete with training for cores (see data.py).
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# Lightning 2.6 on torch 2.13: a deprecation inside Lightning's own pytree helper, nothing a user can act on.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Lightning 2.6 advertises its cloud logger (litlogger) at every start.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())
# Resuming mid-epoch, Lightning warns unless the DataLoader has state_dict(); ours resumes another way (data.py).
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


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


def export_for_inference(best_model_path: str) -> None:
    """Export the best checkpoint to ONNX now, while the user is waiting for the run anyway, so that the first
    `python inference.py` starts as fast as every later one (~1 s instead of ~20 s)."""
    from export import onnx_export  # torch.onnx and onnx load only here, at the end

    started = time.monotonic()
    try:
        path = onnx_export(Path(best_model_path))
    except Exception as e:  # the run itself succeeded: say so, and let inference.py export on first use
        print(f"warning: ONNX export for inference failed ({type(e).__name__}: {e}); inference.py will retry", file=sys.stderr)
        return
    print(f"Exported for inference.py in {time.monotonic() - started:.0f} s: {path}")


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
        best_model_path = cli.trainer.checkpoint_callback.best_model_path
        export_for_inference(best_model_path)
        print(f'Next: python inference.py --checkpoint {best_model_path} "The boy is sitting on a bench."')


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
