"""Fine-tune a pretrained BERT on CoLA.

    python train.py                                   # BERT-base from the Hub, 3 epochs
    python train.py --help                            # every model, data and Trainer option
    python train.py --config my.yaml                  # the same options from YAML
    python train.py --ckpt_path logs/cola/version_0/checkpoints/last.ckpt   # resume that run
"""

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor, Timer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from data import ColaDataModule, DataError
from model import ColaModel

# ThroughputMonitor would also report FLOPs if the model declared them; samples and tokens per second suffice.
warnings.filterwarnings("ignore", message=".*`flops_per_batch`.*")
# Lightning suggests DataLoader workers; on small CPUs they compete with training for cores (see data.py).
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class ColaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Resume training from this last.ckpt.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_mcc",  # CoLA's official metric
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{val_mcc:.4f}",
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_mcc", "early_stopping.mode": "max", "early_stopping.patience": 3})

    def before_instantiate_classes(self) -> None:
        # Resuming .../version_N/checkpoints/last.ckpt continues in version_N: same TensorBoard run, same checkpoints.
        ckpt_path, logger = self.config.ckpt_path, self.config.trainer.logger
        if ckpt_path and Path(ckpt_path).parent.name == "checkpoints" and "version" in logger.get("init_args", {}):
            logger.init_args.version = Path(ckpt_path).parent.parent.name


def default_precision() -> str:
    # bf16 autocast is 2-3x faster on Ampere+ GPUs and needs no loss scaling; elsewhere full fp32.
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


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
            "precision": default_precision(),
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
            ],
        },
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    if cli.trainer.is_global_zero:
        report(cli.trainer, cli.datamodule, timer)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
