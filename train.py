"""Fine-tune a pretrained BERT on CoLA, another GLUE task or your own labelled texts.

    python train.py                                   # BERT-base from the Hub on CoLA, 3 epochs
    python train.py --data.task rte                   # another GLUE task (data.py: GLUE_TASKS)
    python train.py --data.task reviews --data.data_dir my_data --data.text_columns [review]   # your own files
    python train.py --help                            # every model, data and Trainer option
    python train.py --config my.yaml                  # the same options from YAML
    python train.py --ckpt_path logs/cola/version_0/checkpoints/last.ckpt   # resume that run
"""

import inspect
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

try:  # torch and Lightning take seconds to import: a Ctrl-C meanwhile is one line, not a traceback
    import torch
    import yaml
    from jsonargparse import Namespace, dict_to_namespace, get_loader, set_loader
    from pytorch_lightning import Callback, Trainer
    from pytorch_lightning.callbacks import LearningRateMonitor, Timer
    from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
    from pytorch_lightning.plugins.io import TorchCheckpointIO
    from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from callbacks import (
        AtomicCheckpointIO, BestAndLastCheckpoint, EarlyStoppingAfterWarmup, ExponentialMovingAverage, MidEpochCheckpoint,
        ResumeInRunFolder,
        SanityChecks, StopOnSignal, StoppedBySignal, TrainingThroughput,
    )
    from checkpoints import RUN_VERSION_ENV, CheckpointError, check_resumable, choose_run_folder, requeued_checkpoint
    from data import METRICS, DataError, OptionError, TextDataModule, default_metric
    from hub import HubError
    from model import NonFiniteLossError, TextClassifier, check_options
    from readers import check_yaml_size
except KeyboardInterrupt:
    print("\ninterrupted while starting: nothing to save", file=sys.stderr)
    sys.exit(130)

# Lightning suggests DataLoader workers; on small CPUs they compete with training for cores (see data.py).
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# Lightning 2.6 on torch 2.13: a deprecation inside Lightning's own pytree helper, nothing a user can act on.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Lightning 2.6 advertises its cloud logger (litlogger) at every start.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())
# --data.group_column: the sanity check's two validation batches may hold one group only (CoLA's dev.tsv starts with
# seen sources); torchmetrics then warns of the other's compute() without an update. The real epoch has both.
warnings.filterwarnings("ignore", message=".*``compute`` method of metric .* was called before the ``update``.*")
# Resuming mid-epoch, Lightning warns unless the DataLoader has state_dict(); ours resumes another way (data.py).
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def load_yaml_bounded(text: str) -> Any:
    """jsonargparse's YAML loader (--config files and option values), after check_yaml_size."""
    check_yaml_size(text)
    return JSONARGPARSE_YAML(text)


JSONARGPARSE_YAML = get_loader("yaml")
set_loader("yaml", load_yaml_bounded, exceptions=(yaml.YAMLError,))


def say(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(message, file=sys.stderr)


# CoLA takes 3 epochs. A schedule over more than this warms up for 10,000 of them (the first 10%): a typo, not a plan.
MAX_EPOCHS = 100_000


def check_trainer_options(config: Namespace) -> None:
    """Refuse, in one line, the Trainer and run options with which nothing would be trained or saved, or that
    Lightning 2.6 takes and later fails on with a traceback (a 0 it divides by, an int no C integer holds)."""
    for key, value in config.items():
        if key == "trainer.devices" and str(value).lstrip("-").isdigit():  # a count given as a string
            value = int(value)
        if type(value) is int and abs(value) > sys.maxsize and not key.startswith("model."):  # check_options bounds those
            raise OptionError(f"--{key} {value}: too large (at most {sys.maxsize})")
    seed = config.get("seed_everything")
    if type(seed) is int and not 0 <= seed < 2**32:  # numpy's bounds
        raise OptionError(f"--seed_everything must be from 0 to 2**32 - 1 (or true: a random one); not {seed}")
    trainer = config.trainer
    for option in ("max_epochs", "max_steps"):
        value = trainer[option]
        if value is not None and (value == 0 or value < -1):
            raise OptionError(f"--trainer.{option} must be at least 1, or -1 for no limit; not {value}")
    if trainer.max_epochs is not None and trainer.max_epochs > MAX_EPOCHS:
        raise OptionError(f"--trainer.max_epochs must be at most {MAX_EPOCHS:,}; not {trainer.max_epochs}")
    if trainer.max_epochs == -1 and trainer.max_steps == -1:
        raise OptionError("--trainer.max_epochs -1 needs --trainer.max_steps: the learning rate decays to 0 at the last step")
    for option in ("trainer.check_val_every_n_epoch", "trainer.accumulate_grad_batches", "trainer.val_check_interval",
                   "trainer.limit_val_batches", "checkpoint.save_top_k", "checkpoint.every_n_epochs", "checkpoint.every_n_train_steps"):
        if config.get(option) == 0:  # Lightning divides by it, or no validation picks and saves a best checkpoint
            raise OptionError(f"--{option} 0 skips validation or the best checkpoint, which train.py is for: at least 1")
    if trainer.fast_dev_run not in (0, False) or trainer.enable_checkpointing is False:
        raise OptionError("--trainer.fast_dev_run and --trainer.enable_checkpointing false save no checkpoint, which train.py"
                          " is for (for a quick try: --trainer.max_steps 2 --trainer.limit_val_batches 2)")
    if config.get("ckpt_path") == "":
        raise OptionError("--ckpt_path is empty: give the last.ckpt to resume, or leave it out")
    if (minutes := config.save_last_every_minutes) is not None and not 0 <= minutes < float("inf"):
        raise OptionError(f"--save_last_every_minutes must be 0 or more (0: after every step), or null (only after validation); not {minutes}")


def check_config(config: dict) -> None:
    """The checks train.py makes before it loads anything (Trainer, model and data options), on a config as
    --print_config writes it: tune.py runs them on every value of a search space before its study exists."""
    check_trainer_options(dict_to_namespace(config))
    model_options = inspect.signature(check_options).parameters
    check_options(**{name: value for name, value in config["model"].items() if name in model_options})
    TextDataModule(**{name: value for name, value in config["data"].items() if not name.startswith("_")})


def monitored_metric(task: str, metric: Optional[str]) -> str:
    """What picks the best checkpoint and stops early: --data.metric, else the task's (data.default_metric)."""
    return f"val_{metric or default_metric(task)}"


class OneLineErrorParser(LightningArgumentParser):
    """A bad argument is one line, as every other problem: jsonargparse prints its whole usage first (~70 lines)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse trying one way of parsing among others
            super().error(message, ex)
        message = re.sub(r'Parser key "([^"]+)":', r"--\1:", " ".join(message.split()))
        print(f"error: {message} (python train.py --help lists the options)", file=sys.stderr)
        self.exit(2)


class TrainCLI(LightningCLI):
    claimed_run_dir: Optional[Path] = None  # the new run folder this process created, if it did

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.compile", "data.pad_to_buckets")  # few shapes to compile
        parser.link_arguments("model.teacher", "data.teacher")  # its outputs go in the training batches
        # The model's labels and inputs come from the data (as in Lightning's docs: num_classes from the datamodule).
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")
        parser.link_arguments("data.text_columns", "model.text_names", apply_on="instantiate")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Resume training from this last.ckpt.")
        parser.add_argument(
            "--save_last_every_minutes", type=Optional[float], default=10.0,
            help="Also save last.ckpt during epochs, this often (0: after every step; null: only after validation).",
        )
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.mode": "max",  # MCC, accuracy and F1 alike
                "checkpoint.save_last": True,
                # Overwrite, never add -v1 copies: last.ckpt has several writers, and a resumed run rewrites
                # the same best checkpoint when it redoes the validation an interrupted run had done.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(EarlyStoppingAfterWarmup, "early_stopping")
        parser.set_defaults({"early_stopping.mode": "max", "early_stopping.patience": 3})
        # All three metrics are logged for every task; one picks the best checkpoint and stops early.
        for target in ("checkpoint.monitor", "early_stopping.monitor"):
            parser.link_arguments(("data.task", "data.metric"), target, compute_fn=monitored_metric)
        parser.link_arguments(("data.task", "data.metric"), "checkpoint.filename",
                              compute_fn=lambda task, metric: f"best-{{epoch}}-{{{monitored_metric(task, metric)}:.4f}}")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        check_trainer_options(self.config)  # before LightningCLI seeds with --seed_everything

    def before_instantiate_classes(self) -> None:
        logger = self.config.trainer.logger
        init_args = logger.get("init_args", {}) if isinstance(logger, Namespace) else {}
        if not all(key in init_args for key in ("save_dir", "name", "version")):  # another logger, or none
            if self.config.ckpt_path:
                check_resumable(self.config.ckpt_path, self.resume_settings())
            return
        if init_args.name is None:  # the default: logs/TASK (logs/cola, logs/sst2, ...)
            init_args.name = self.config.data.task
        root = Path(init_args.save_dir) / init_args.name
        self.config.ckpt_path, init_args.version = requeued_checkpoint(root, self.config.ckpt_path, init_args.version)
        if self.config.ckpt_path:
            check_resumable(self.config.ckpt_path, self.resume_settings())
        run_dir, claimed = choose_run_folder(root, init_args.version, self.config.ckpt_path, rank_zero_only.rank == 0)
        if run_dir is not None:
            if run_dir != root / run_dir.name:  # the resumed checkpoint's run folder, under another root
                init_args.save_dir, init_args.name = str(run_dir.parent.parent), run_dir.parent.name
            init_args.version = run_dir.name
            self.claimed_run_dir = run_dir if claimed else None
        if init_args.version is not None and self.config.trainer.default_root_dir is None:
            # Lightning saves SLURM's requeue checkpoint (hpc_ckpt_N.ckpt) here: with its run, not in the working directory.
            self.config.trainer.default_root_dir = os.path.join(init_args.save_dir, init_args.name, init_args.version)

    def resume_settings(self) -> dict[str, dict]:
        return {group: {k: v for k, v in self.config[group].items() if not k.startswith("_")} for group in ("data", "model")}

    def remove_unstarted_run(self) -> None:
        """Remove the run folder this run claimed, after a failure before its first training step: it holds
        only this run's files (config, an empty TensorBoard log), and an empty run would hide the last real one."""
        if self.claimed_run_dir is not None and not any(self.claimed_run_dir.rglob("*.ckpt")):
            # (A checkpoint there: a signal stopped step 0 of an accumulation and saved it, with a resume hint.)
            shutil.rmtree(self.claimed_run_dir, ignore_errors=True)
        self.claimed_run_dir = None

    def instantiate_classes(self) -> None:
        # TF32 matrix products on Ampere+ GPUs (tensor cores, 10-bit mantissa inputs, fp32 accumulation).
        # Set for CUDA alone, so that CPU products stay exact fp32.
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            super().instantiate_classes()
        except BaseException as e:  # a bad option, model or data folder: nothing was trained
            self.remove_unstarted_run()
            if isinstance(e, MisconfigurationException):  # Lightning's checks of --checkpoint.* and --early_stopping.*
                raise OptionError(str(e)) from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as e:  # Lightning's checks of --trainer.* options
            raise OptionError(f"--trainer options: {e}") from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # unless --trainer.plugins chose another
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.model.hparams.ema_decay:
            # First: StopOnSignal saves last.ckpt in on_train_batch_end, which must hold this step's average.
            trainer.callbacks.insert(0, ExponentialMovingAverage(self.model.hparams.ema_decay))
        minutes = self.config.save_last_every_minutes
        if minutes is not None:
            interval = timedelta(minutes=minutes)
            trainer.callbacks.append(
                MidEpochCheckpoint(save_last=True, save_top_k=0, train_time_interval=interval, enable_version_counter=False)
            )
        return trainer


def report(trainer: Trainer, datamodule: TextDataModule, timer: Timer, throughput: TrainingThroughput) -> None:
    """Print and save the outcome of a run: the best score (val_mcc for CoLA), where the checkpoints are, what to run next."""
    checkpoint = trainer.checkpoint_callback
    best_score, monitor = float(checkpoint.best_model_score), checkpoint.monitor
    train_seconds = timer.time_elapsed("train")  # by this process: a resumed run's earlier part is not in it
    summary = {
        "monitor": monitor,
        f"best_{monitor}": best_score,
        "best_model_path": checkpoint.best_model_path,
        "last_model_path": checkpoint.last_model_path,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_seconds": train_seconds,
        # As the Hugging Face Trainer's train_samples_per_second (validation time included), of the samples this
        # process trained, on every rank: a run stopped by --trainer.max_steps counts its steps, not whole epochs.
        "train_samples_per_second": throughput.samples_trained * trainer.world_size / train_seconds,
        "last_epoch_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    best = getattr(checkpoint, "best_model_metrics", {})
    groups = {part: {"examples": size, **{name: best[f"val_{part}_{name}"] for name in METRICS if f"val_{part}_{name}" in best}}
              for part, size in datamodule.group_sizes.items()}
    if groups:  # --data.group_column: the best checkpoint's metrics on the groups training saw, and on the others
        summary["group_column"], summary["best_by_group"] = datamodule.hparams.group_column, groups
    run_dir = Path(trainer.logger.log_dir)
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    hparams = {**trainer.lightning_module.hparams, **datamodule.hparams, "max_epochs": trainer.max_epochs}
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # drop LightningCLI's bookkeeping
    trainer.logger.log_hyperparams(hparams, metrics={f"hp/best_{monitor}": best_score})
    trainer.logger.finalize("success")  # fit had closed the event file; logging reopened it: flush and close
    print(f"\nBest {monitor} {best_score:.4f}: {checkpoint.best_model_path}")
    metric = monitor.removeprefix("val_")
    for part, values in groups.items():
        print(f"  {part + ' ' + datamodule.hparams.group_column + 's:':<16} {monitor} {values.get(metric, float('nan')):.4f}"
              f" ({values['examples']} examples; accuracy {values.get('accuracy', float('nan')):.4f})")
    print(f"Run folder (metrics.json, TensorBoard): {run_dir}")


def export_for_inference(best_model_path: str) -> None:
    """Export the best checkpoint to ONNX now, while the user is waiting for the run anyway, so that the first
    `python inference.py` starts as fast as every later one (~1 s instead of ~20 s)."""
    from export import onnx_export  # torch.onnx and onnx load only here, at the end

    started = time.monotonic()
    try:
        path = onnx_export(Path(best_model_path))
    except (KeyboardInterrupt, StoppedBySignal) as e:  # training is over: not "stopped before training"
        print("\nexport interrupted; the run is done and saved, inference.py exports on first use", file=sys.stderr)
        raise SystemExit(128 + getattr(e, "signum", signal.SIGINT)) from None
    except Exception as e:  # the run itself succeeded: say so, and let inference.py export on first use
        print(f"warning: ONNX export for inference failed ({type(e).__name__}: {e}); inference.py will retry", file=sys.stderr)
        return
    print(f"Exported for inference.py in {time.monotonic() - started:.0f} s: {path}")


def main(args: Optional[list[str]] = None, callbacks: Sequence[Callback] = (), export: bool = True) -> None:
    """One training run with these command-line arguments (default: sys.argv), plus callbacks (tune.py reports
    each validation to its trial with one). tune.py exports only the best trial's checkpoint (export=False)."""
    timer, throughput = Timer(), TrainingThroughput()
    cli = TrainCLI(
        TextClassifier,
        TextDataModule,
        args=args,
        run=False,
        parser_class=OneLineErrorParser,
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
                "init_args": {"save_dir": "logs", "name": None, "default_hp_metric": False},  # name None: the task's
            },
            "callbacks": [
                LearningRateMonitor(logging_interval="step"),
                throughput,
                timer,
                StopOnSignal(),
                ResumeInRunFolder(),
                SanityChecks(),
                *callbacks,
            ],
        },
    )
    trainer = cli.trainer
    if cli.datamodule.hparams.teacher:
        from distill import add_teacher_outputs  # it runs the teacher through inference.py: loaded only for a student

        cli.datamodule.teach = add_teacher_outputs
    try:
        # weights_only: resuming never runs code pickled into a checkpoint (check_resumable already refused such a file).
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, weights_only=True)
    except BaseException as e:
        if trainer.global_step == 0:
            cli.remove_unstarted_run()
        if isinstance(e, ValueError) and "`val_check_interval`" in str(e):  # Lightning 2.6 checks it once the data is read
            raise OptionError(f"--trainer.val_check_interval: {' '.join(str(e).split())}") from None
        raise
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_score is None:  # no validation ran: nothing to report
        if trainer.global_step == 0:
            cli.remove_unstarted_run()
        raise OptionError(
            f"no validation ran, so there is no best checkpoint (--trainer.max_steps ended training within an epoch,"
            f" --trainer.check_val_every_n_epoch above the epochs trained, or a resumed run already at"
            f" --trainer.max_epochs); stopped at step"
            f" {trainer.global_step}, last checkpoint: {checkpoint.last_model_path or 'none saved'}"
        )
    if trainer.is_global_zero:
        report(trainer, cli.datamodule, timer, throughput)
    if trainer.is_global_zero and export:
        export_for_inference(checkpoint.best_model_path)
        example = {1: '"The boy is sitting on a bench."', 2: "$'The first text.\\tThe second text.'"}  # a pair: tab-separated
        print(f"Next: python inference.py --checkpoint {checkpoint.best_model_path} {example[len(cli.datamodule.text_columns)]}")


def stop_before_training(signum: int, frame: Any) -> None:
    raise StoppedBySignal(signum)  # during training StopOnSignal takes SIGTERM over, to stop between steps


def run() -> None:
    """main() as a command: a problem with the user's data, model id, network, checkpoint or options is
    one line on stderr (once under DDP) and exit status 1, not a traceback. Stopped by Ctrl-C or SIGTERM:
    exit status 128 + the signal's number (130, 143), as a shell reports a process that a signal ended."""
    previous_handler = signal.signal(signal.SIGTERM, stop_before_training)
    try:
        main()
    except (DataError, HubError, CheckpointError, NonFiniteLossError, OptionError) as e:
        if rank_zero_only.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk or a read-only folder while writing logs: say which file, no traceback
        if rank_zero_only.rank == 0:
            print(f"error: {os.fsdecode(e.filename)}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except StoppedBySignal as e:
        if not e.saved and rank_zero_only.rank == 0:
            print(f"\n{e}: stopped before training started, nothing to save", file=sys.stderr)
        sys.exit(128 + e.signum)
    except SIGTERMException:  # Lightning's own, if SIGTERM came while it had the signal (before training)
        say("\nSIGTERM: stopped before training started, nothing to save")
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Ctrl-C before fit (within fit, before training: Lightning's handling, exit 1)
        print("\ninterrupted before training started: nothing to save", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    run()
