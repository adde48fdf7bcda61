"""Lightning callbacks and checkpoint plumbing that train.py adds to its Trainer.

Each class does one job and says why in its docstring. Most are self-contained (Lightning: "a callback
is a self-contained program that can be reused across projects"); EarlyStoppingAfterWarmup and
SanityChecks read the model's warmup_steps, ResumeInRunFolder the run-folder layout of checkpoints.py.
"""

import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import fsspec
import torch
from torch.optim.swa_utils import get_ema_avg_fn
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, WeightAveraging
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from checkpoints import CheckpointError, remove_dead_writers_files, run_folder_of, temporary_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint beside its final name (checkpoints.temporary_path), then renames it over that name:
    a run killed while saving leaves the previous file whole, and the next save in that folder removes what the
    killed one had written (checkpoints.remove_dead_writers_files).

    Lightning's own save writes to the system's temporary folder and then *moves* the file, which is a
    copy straight into the final name when that folder is on another filesystem (tmpfs /tmp, say).
    """

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        if fsspec.utils.get_protocol(str(path)) != "file":  # s3:// and the like: Lightning's fsspec upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers_files(path.parent)
        partial = temporary_path(path)
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the name points at it, in case the machine goes down
        except OSError as e:  # a full disk, say: keep the previous file, and no half-written one
            partial.unlink(missing_ok=True)
            kept = f"the previous {path.name} is kept" if path.exists() else "nothing was saved there"
            raise CheckpointError(f"{path}: could not save the checkpoint ({e.strerror or e}); {kept}") from None
        os.replace(partial, path)


def ends_an_epoch(trainer: Trainer) -> bool:
    """Whether the training step just done was its epoch's last. A checkpoint saved there, before the epoch's
    validation, resumes past that validation: Lightning 2.6 counts the epoch as finished. So none is saved there."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves the best checkpoint without the optimizer's state, and last.ckpt (with it)
    after every validation. Lightning 2.6 saves last.ckpt only where it also
    saved a best checkpoint: once val_mcc stopped improving, last.ckpt stayed at the best epoch, and a run
    killed later resumed from there, losing every epoch since. (Lightning saves at the end of the training
    epoch, after its validation, or at the end of a validation run within an epoch.)"""

    best_model_metrics: dict[str, float] = {}  # every val_* value of the best checkpoint's validation (metrics.json)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, under which checkpoints keep the best score (resumes of earlier runs find it there,
        # and so does checkpoints.best_checkpoint_of_run).
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._also_save_last(trainer, self._should_save_on_train_epoch_end(trainer), super().on_train_epoch_end, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._also_save_last(trainer, not self._should_save_on_train_epoch_end(trainer), super().on_validation_end, pl_module)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # The best checkpoint holds what inference, exports and soups need, not AdamW's moments (twice the weights:
        # a 1.31 GB best checkpoint of a 110M model is 0.44 GB without them); last.ckpt keeps all a resume needs.
        # Except with --model.ema_decay: Lightning 2.6 saves weights only without asking callbacks, and the
        # average would not replace the trained weights.
        if filepath == self.best_model_path:  # a new best: its validation's values, per group too, for the run's report
            self.best_model_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        full = self.save_weights_only
        averaging = any(isinstance(callback, WeightAveraging) for callback in trainer.callbacks)
        self.save_weights_only = full or (filepath != self.last_model_path and not averaging)  # last: set before its save
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            self.save_weights_only = full

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_model_metrics": self.best_model_metrics}  # a resumed run reports them too

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_model_metrics = state_dict.get("best_model_metrics", {})  # none in checkpoints of before 2026-12-07

    def _also_save_last(self, trainer: Trainer, saves_here: bool, save: Any, pl_module: LightningModule) -> None:
        saves_here = saves_here and not self._should_skip_saving_checkpoint(trainer)
        save(trainer, pl_module)
        if saves_here and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class MidEpochCheckpoint(ModelCheckpoint):
    """Saves last.ckpt during epochs too, every train_time_interval, so that a killed run loses little
    (the first ModelCheckpoint saves the best and last.ckpt after each validation)."""

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if not ends_an_epoch(trainer):
            super().on_train_batch_end(trainer, *args, **kwargs)


class EarlyStoppingAfterWarmup(EarlyStopping):
    """Early stopping that starts watching once the learning-rate warmup has ended: during warmup val_mcc
    often stays at 0 (the model first predicts the majority class), which would use up the patience.
    Nor does it check an epoch that --trainer.max_steps cut short before its validation (no val_mcc)."""

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        cut_short = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if cut_short and self.monitor not in trainer.callback_metrics:
            return
        if trainer.global_step >= trainer.lightning_module.warmup_steps:
            super()._run_early_stopping_check(trainer)


class ExponentialMovingAverage(WeightAveraging):
    """Lightning's WeightAveraging with torch's EMA: after every optimizer step, average = decay * average +
    (1 - decay) * weights, over about the last 1 / (1 - decay) steps. Validation, the checkpoints (their
    state_dict; the trained weights go beside it, for resuming) and so the exports hold the average.
    Parameters only: a BERT's buffers are its position and token-type ids, integers."""

    def __init__(self, decay: float) -> None:
        super().__init__(use_buffers=False, avg_fn=get_ema_avg_fn(decay))


class TrainingThroughput(Callback):
    """Training samples and real (unpadded) tokens per second, logged as train/samples_per_sec and
    train/tokens_per_sec every log_every_n_steps, over the steps since the last log (validation left out).

    Lightning's ThroughputMonitor makes the CPU wait for the GPU after every step (torch.cuda.synchronize, to time
    each step) and again for its token count (an int() of a GPU tensor): here the tokens add up on the device and
    the clock is read only when Lightning logs, which waits for the GPU anyway.
    """

    def __init__(self) -> None:
        self.samples_trained = 0  # by this process since it started (metrics.json's train_samples_per_second)
        self._restart()

    def _restart(self, *_: Any) -> None:
        self._started, self._samples, self._tokens = time.perf_counter(), 0, 0

    on_train_epoch_start = on_validation_end = _restart

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *_: Any) -> None:
        self._samples += batch["input_ids"].size(0)
        self.samples_trained += batch["input_ids"].size(0)
        self._tokens = self._tokens + batch["attention_mask"].sum()  # a tensor: no wait here
        every = trainer.log_every_n_steps
        if not every or trainer.global_step % every:  # Lightning logs at the same steps
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the queued steps belong in this window
        seconds = time.perf_counter() - self._started
        # Straight to the loggers, as ThroughputMonitor did: a timing is no metric for callbacks or metrics.json.
        rates = {"train/samples_per_sec": self._samples / seconds, "train/tokens_per_sec": float(self._tokens) / seconds}
        for logger in trainer.loggers:
            logger.log_metrics(rates, step=trainer.global_step)
        self._restart()


class SanityChecks(Callback):
    """Logs, before the run gets far, the facts that explain most failed runs: the class balance (CoLA: about 70%
    acceptable), a loss at initialisation far from ln(number of labels), and a val_mcc still 0 after warmup."""

    def on_train_start(self, trainer: Trainer, model: LightningModule) -> None:
        names = model.label_names
        for split, dataset in trainer.datamodule.splits.items():
            counts = torch.bincount(torch.tensor(dataset["labels"]), minlength=len(names)).tolist()
            shares = {name: count / max(len(dataset), 1) for name, count in zip(names, counts)}
            if len(names) == 2:  # CoLA: "70.4% acceptable", the share of label 1
                shares = dict([list(shares.items())[1]])
            examples = "sentences" if len(trainer.datamodule.text_columns) == 1 else "pairs"
            rank_zero_info(f"{split}: {len(dataset)} {examples}, " + ", ".join(f"{s:.1%} {name}" for name, s in shares.items()))
            if trainer.logger:
                trainer.logger.log_metrics({f"data/{split}_{name}_fraction": s for name, s in shares.items()}, step=0)

    def on_train_batch_end(self, trainer: Trainer, model: LightningModule, outputs: Any, *_: Any) -> None:
        if trainer.global_step != 1:  # the first step's loss was computed before any update: the loss at init
            return
        if model.hparams.get("teacher"):  # the loss is part distillation: ln n is not its value at initialisation
            return
        loss, n = float(outputs["loss"]), len(model.label_names)
        rank_zero_info(f"loss at initialisation {loss:.3f} (ln {n} = {math.log(n):.3f} for a fresh {n}-class head)")
        if abs(loss - math.log(n)) > 0.25:
            rank_zero_warn(
                f"loss at initialisation is {loss:.3f}, far from ln {n} = {math.log(n):.3f}: the classifier head is not fresh"
                " (a fine-tuned model as --model.model_name_or_path?) or the labels are not 0..n-1"
            )

    def on_validation_end(self, trainer: Trainer, model: LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step < model.warmup_steps:
            return
        if float(trainer.callback_metrics.get("val_mcc", 1.0)) == 0.0:
            rank_zero_warn(
                f"val_mcc is 0 after warmup (step {trainer.global_step}): the model predicts one class only."
                f" The usual cause is the learning rate ({model.hparams.learning_rate:g}): too high makes the model"
                " collapse to the majority class; try a lower one"
            )


def resume_command(ckpt_path: str) -> str:
    """This command line again, resuming from ckpt_path (a tune.py sweep's own command resumes its trials)."""
    if Path(sys.argv[0]).name == "tune.py":
        return shlex.join(["python", *sys.argv])
    args, skip = [], False
    for arg in sys.argv[1:]:
        if not skip and arg != "--ckpt_path" and not arg.startswith("--ckpt_path="):
            args.append(arg)
        skip = arg == "--ckpt_path"
    return shlex.join(["python", sys.argv[0], *args, "--ckpt_path", ckpt_path])


class StoppedBySignal(Exception):
    """Training stopped on Ctrl-C or SIGTERM (saved: last.ckpt was saved first); train.py exits with 128 + signum."""

    def __init__(self, signum: int, saved: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) and SIGTERM (sent by SLURM, Kubernetes, `docker stop` before they kill) stop training
    cleanly: the current training step finishes, last.ckpt is saved there and the command to resume is
    printed; then StoppedBySignal. A second Ctrl-C stops at once, without saving; a second SIGTERM kills.

    Lightning's own handling stops wherever the program is on Ctrl-C, half-way through an optimizer step
    even, and the state there could not resume into the same run; on SIGTERM it saves nothing and exits
    with status 0. So this callback takes both signals over while training runs (Lightning's SIGUSR1 handler,
    SLURM's auto-requeue, stays). Raising between steps lets Lightning shut down as usual (on_exception
    hooks, teardown).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: Optional[int] = None
        self._previous_handlers: dict = {}

    def on_train_start(self, trainer: Trainer, *_: Any) -> None:
        self.requested, self._is_global_zero = None, trainer.is_global_zero
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._previous_handlers = {signum: signal.signal(signum, self._request) for signum in self.SIGNALS}

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = signum
        # The next Ctrl-C interrupts at once; the next SIGTERM kills (Lightning's handler would exit with 0).
        signal.signal(signum, self._previous_handlers[signum] if signum == signal.SIGINT else signal.SIG_DFL)
        if self._is_global_zero:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = "Ctrl-C again stops" if signum == signal.SIGINT else "another SIGTERM kills"
            print(f"\n{name}: stopping after this training step ({again} at once, without saving)", file=sys.stderr)

    def on_train_batch_end(self, trainer: Trainer, *_: Any) -> None:
        if ends_an_epoch(trainer):  # stop after the next step instead, once the epoch is validated
            return
        requested = self.requested is not None
        if trainer.world_size > 1:  # any process's signal stops all, after the same step
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:
            path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
            trainer.save_checkpoint(path, weights_only=False)  # everything, to resume from
            if trainer.is_global_zero:
                print(f"\nStopped at step {trainer.global_step}, saved {path}. Resume with:\n  {resume_command(path)}")
        self._restore_handlers()
        # (No signal here: another DDP process got it. SIGTERM is what reaches all processes of a job.)
        raise StoppedBySignal(self.requested or signal.SIGTERM, saved=checkpoint is not None)

    def on_train_end(self, *_: Any) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


class ResumeInRunFolder(Callback):
    """Keeps, in a resumed run, what ModelCheckpoint knew: the best score and checkpoint so far.

    A checkpoint names its files by the paths the interrupted run used, relative to where it ran, and
    Lightning restores its best score only if the checkpoint folder is spelt the same now. train.py resumes
    in the checkpoint's own run folder however it is reached (`../other/logs/cola/version_0/...`): re-point
    the saved paths at that folder. A checkpoint resumed in a new folder keeps no paths (they would name
    another run's files).
    """

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks", {})
        run_dir = run_folder_of(Path(trainer.ckpt_path))
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if not state or not callback.dirpath:
                continue
            same_folder = run_dir == Path(callback.dirpath).resolve().parent

            def rebase(path: str) -> str:
                return os.path.join(callback.dirpath, os.path.basename(path)) if path and same_folder else ""

            state["dirpath"] = callback.dirpath if same_folder else state.get("dirpath")
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state:
                    state[key] = rebase(state[key])
            if same_folder:
                state["best_k_models"] = {rebase(path): score for path, score in state.get("best_k_models", {}).items()}
