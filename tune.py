"""Find the best model in a budget: many train.py runs (trials) of one Optuna study, the unpromising stopped early.

    python tune.py --n_trials 12 <train.py options>             # 12 restarts, seeds 1, 2, ...: keep the best
    python tune.py --search_space space.yaml <train.py options> # also vary the options space.yaml names
    python tune.py --storage postgresql://user@host/db ...      # workers on several machines share one study
    python tune.py --soup --model.head_seed 0 <train.py options> # then average the good trials into one model

Each trial is an ordinary train.py run, with its own logs/cola/version_N. The study lives in --storage: a
stopped or killed sweep continues with the same command, and inference.py and serve.py pick its best trial.
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, TextIO
from urllib.parse import unquote, unquote_plus


# A URL with user-info (scheme:, any slashes, then user:PASSWORD@ before the host), given to any option.
URL_WITH_USERINFO = re.compile(r"[A-Za-z][\w+.-]*:/*[^/]*@")


def storage_urls(argv: list[str]) -> list[str]:
    """--storage's values, however given: argparse also takes an unambiguous prefix (--sto, --stor...), and NAME=VALUE;
    and any argument shaped like a URL with user-info (given to another option by mistake, an error echoes it)."""
    urls = []
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if len(name) >= len("--s") and "--storage".startswith(name):  # --s, --st: argparse's "ambiguous" error echoes them
            urls += [value] if equals else argv[i + 1:i + 2]
        elif URL_WITH_USERINFO.match(value if equals else arg):
            urls.append(value if equals else arg)
    return urls


def storage_passwords(argv: list[str]) -> set[str]:
    """What no line tune.py prints may show of --storage's URLs: their user-info (user:PASSWORD before an '@') whatever
    the URL's shape (one slash, none, an '@' in the password...), its password alone, ?password=...; as typed and
    percent-decoded."""
    found = set()
    for url in storage_urls(argv):
        rest = url.partition(":")[2].lstrip("/")  # after the scheme, however many slashes it was given
        for userinfo in {rest.partition("@")[0], rest.rpartition("@")[0]} if "@" in rest else ():
            found |= {userinfo, userinfo.partition(":")[2]}  # a password with an '@' in it, typed as it is: both readings
        found.update(re.findall(r"[?&]password=([^&]*)", url))
    # Each piece of a password too: one with an unescaped '@' or '/' is read as part of the host or path, and named there.
    pieces = {piece for password in found if ":" not in password for piece in re.split(r"[@/?#]", password)}
    return {form for password in found | pieces for form in (password, unquote(password), unquote_plus(password)) if form}


class MaskedOutput:
    """A text stream that writes through `stream` with each secret replaced by ***: installed as sys.stdout and
    sys.stderr, it masks every line the process prints (tune.py's, Lightning's and Optuna's, tracebacks too)."""

    def __init__(self, stream: TextIO, secrets: set[str]) -> None:
        self.stream, self.secrets = stream, sorted(secrets, key=len, reverse=True)

    def write(self, text: str) -> int:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...
        return getattr(self.stream, name)


def mask_storage_passwords(argv: list[str]) -> None:
    if secrets := storage_passwords(argv):
        sys.stdout, sys.stderr = MaskedOutput(sys.stdout, secrets), MaskedOutput(sys.stderr, secrets)


# Before the imports: Lightning's and Optuna's log handlers keep the sys.stderr they find when imported.
mask_storage_passwords(sys.argv)

import yaml  # noqa: E402

import train  # noqa: E402  (first of the slow ones: it turns a Ctrl-C during the slow imports into one line)
from callbacks import AtomicCheckpointIO, StoppedBySignal  # noqa: E402
from checkpoints import (  # noqa: E402
    SWEEP_FILE, CheckpointError, best_checkpoint_of_run, best_score, claim_run_version, first_line, load_checkpoint, newest_checkpoint,
    remove_dead_writers_files, temporary_path,
)
from data import DataError, OptionError, TextDataModule  # noqa: E402
from hub import HubError  # noqa: E402
from model import NonFiniteLossError, TextClassifier  # noqa: E402
from readers import check_yaml_size  # noqa: E402

import optuna  # noqa: E402  (after train: see above)
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState
from pytorch_lightning import Callback, LightningModule, Trainer

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_TRIALS = 10_000  # a sweep here runs 10-100; 2**64 ran until stopped
# Lightning warns when LightningCLI gets args= while sys.argv has some: here sys.argv is tune.py's, on purpose.
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
# Heartbeats (a dead worker's trial retried) are marked experimental since Optuna 2.9; they are what tune.py needs.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Successive halving (ASHA): after epoch 1 a trial goes on only if its val MCC is in the top third of the trials
# that got there, after epoch 3 again. Restarts cost ~2 epochs each instead of all of them (benchmarks/README.md).
PRUNER = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


# Optuna stores every parameter value as a 64-bit float: integers beyond 2**53 would change on the way.
MAX_EXACT_INT = 2**53


class SweepError(Exception):
    """A bad tune.py option or search space, reported as one line."""


class ReportToTrial(Callback):
    """Tells the trial each epoch's score (val_mcc for CoLA: the monitored metric) and stops the run when the pruner discards it; marks the run folder
    as this study's trial (checkpoints.py reads the mark: a sweep's best trial, never a pruned one, is served)."""

    def __init__(self, trial: Trial, study: str) -> None:
        self.trial, self.study, self.run_dir = trial, study, None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.logger.log_dir)
        self.trial.set_user_attr("run_dir", str(self.run_dir.resolve()))
        mark(self.run_dir, self.study, self.trial.number, "running")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        monitor = trainer.checkpoint_callback.monitor
        score, epoch = float(trainer.callback_metrics[monitor]), trainer.current_epoch + 1
        self.trial.report(score, epoch)
        if self.trial.should_prune():
            mark(self.run_dir, self.study, self.trial.number, "pruned")
            raise optuna.TrialPruned(f"{monitor} {score:.4f} after epoch {epoch}")


class Sweep:
    """The objective: one train.py run per trial; and when the sweep has enough."""

    def __init__(self, options: argparse.Namespace, train_args: list[str], space: dict) -> None:
        self.options, self.train_args, self.space = options, train_args, space

    def objective(self, trial: Trial) -> float:
        if self.done(trial.study, before=trial.number):  # other workers started the last trials meanwhile
            trial.study.stop()
            trial.set_user_attr("unused", True)
            raise NotNeeded()
        seed = trial.user_attrs.get("seed", trial.number + 1)  # a retried trial keeps its seed
        trial.set_user_attr("seed", seed)
        settings = [f"--{name}={format_value(sample(trial, name, spec))}" for name, spec in self.space.items()]
        args = [*self.train_args, *settings, f"--seed_everything={seed}"]
        run_dir = retried_run(trial, self.options.study)
        if run_dir is not None and (run_dir / "metrics.json").is_file():  # its worker was killed after training
            mark(run_dir, self.options.study, trial.number, "complete")
            return finished(trial, run_dir)
        checkpoint = run_dir and newest_checkpoint(run_dir)
        if run_dir is not None and checkpoint is None:  # it saved nothing: start again, in a new folder
            shutil.rmtree(run_dir, ignore_errors=True)
        report = ReportToTrial(trial, self.options.study)
        try:
            train.main([*args, "--ckpt_path", str(checkpoint)] if checkpoint else args, callbacks=[report], export=False)
        except (StoppedBySignal, KeyboardInterrupt):
            # Retried by whoever runs the study next, from the run's last.ckpt (Optuna's own retry, as for a dead worker).
            RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(trial.study, frozen(trial))
            raise
        except SystemExit as e:  # train.py's parser has said what was wrong
            raise Exit(e.code) from None
        except NonFiniteLossError as e:  # these settings diverge: counted, never picked, as a pruned trial
            mark(report.run_dir, self.options.study, trial.number, "pruned")
            trial.set_user_attr("diverged", True)
            raise optuna.TrialPruned(str(e)) from None
        mark(report.run_dir, self.options.study, trial.number, "complete")
        return finished(trial, report.run_dir)

    def done(self, study: optuna.Study, before: Optional[int] = None) -> bool:
        """Enough trials finished or running (of those numbered below `before`), or the epoch budget spent."""
        trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        counted = [t for t in trials if before is None or t.number < before]
        epochs = sum(len(t.intermediate_values) for t in trials)
        return len(counted) >= self.options.n_trials or epochs >= (self.options.budget_epochs or float("inf"))

    def stop_when_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not trial.user_attrs.get("unused"):
            print(trial_line(trial, monitored(study)), file=sys.stderr)
        if self.done(study):
            study.stop()


def mark(run_dir: Path, study: str, number: int, state: str) -> None:
    """Marks a run folder as a trial of this study (checkpoints.py reads it: a sweep's best trial is served)."""
    (run_dir / SWEEP_FILE).write_text(json.dumps({"study": study, "trial": number, "state": state}) + "\n")


def finished(trial: Trial, run_dir: Path) -> float:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    trial.set_user_attr("checkpoint", metrics["best_model_path"])
    return best_score(metrics)


class NotNeeded(Exception):
    """A trial started after the sweep had enough: it trains nothing."""


class Exit(Exception):
    """train.py exited (its parser's one-line error is printed): tune.py exits with the same status."""

    def __init__(self, code: Any) -> None:
        self.code = code


def frozen(trial: Trial) -> FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def sample(trial: Trial, name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    if all(isinstance(spec[k], int) for k in ("low", "high")):
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
    return trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))


def format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def retried_run(trial: Trial, study: str) -> Optional[Path]:
    """For a trial retried after its worker was stopped or killed: that worker's run folder, if it is here
    (on another machine, a folder of that name holds another run)."""
    if "run_dir" not in trial.user_attrs:
        return None
    run_dir = Path(trial.user_attrs["run_dir"])
    try:
        info = json.loads((run_dir / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return None
    if info.get("study") != study or info.get("trial") not in RetryHeartbeatStaleTrialCallback.retry_history(frozen(trial)):
        return None
    return run_dir


def read_space(path: Optional[str]) -> dict:
    """The search space: {option: [choices]} or {option: {low, high, log}}, options as train.py names them."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
        check_yaml_size(text)
        space = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as e:  # its line and column, as an editor counts them (PyYAML's mark counts from 0)
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise SweepError(f"--search_space {path}{where}: {e.problem or e.context}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SweepError(f"--search_space {path}: {first_line(e)}") from None
    if not isinstance(space, dict):
        raise SweepError(f"{path}: give a mapping of train.py options to choices, e.g. 'model.pooling: [cls, mean]'")
    for name, spec in space.items():
        if name in ("seed_everything", "ckpt_path"):
            raise SweepError(f"{path}: {name}: tune.py sets it for each trial (seed: trial number + 1)")
        not_scalar = [v for v in spec if not (v is None or isinstance(v, (str, int, float, bool)))] if isinstance(spec, list) else []
        if not_scalar:
            kind = type(not_scalar[0]).__name__
            raise SweepError(f"{path}: {name}: a choice is a {kind}; choices are strings, numbers, true/false or null")
        valid_range = isinstance(spec, dict) and {"low", "high"} <= spec.keys() <= {"low", "high", "log"}
        if not (isinstance(spec, list) and spec) and not (
            valid_range and all(isinstance(spec[k], (int, float)) and not isinstance(spec[k], bool) for k in ("low", "high"))
        ):
            raise SweepError(f"{path}: {name}: give a list of choices, or {{low: 1.0e-5, high: 1.0e-4, log: true}}")
        # Optuna would accept these here and fail at the first trial, after the study has recorded this command.
        if isinstance(spec, dict):
            low, high, log = spec["low"], spec["high"], spec.get("log", False)
            if not isinstance(log, bool):
                raise SweepError(f"{path}: {name}: log is true or false, not {log!r}")
            for bound in (low, high):  # first: NaN is neither above nor below anything
                if not math.isfinite(bound) or abs(bound) > MAX_EXACT_INT:
                    raise SweepError(f"{path}: {name}: {bound} is not a number a trial can take: give finite bounds"
                                     f" within +-{MAX_EXACT_INT:.0e} (Optuna stores values as 64-bit floats)")
            if not low <= high:
                raise SweepError(f"{path}: {name}: low ({low}) is above high ({high}): swap them")
            if log and not low > 0:
                raise SweepError(f"{path}: {name}: log: true needs a low above 0, not {low}")
    return space


def check_train_args(args: list[str], space: dict, space_path: Optional[str]) -> dict:
    """Parse the trials' options as train.py will (with --print_config: nothing loads or trains) and check them as
    train.py does before it loads anything (train.check_config), with every value of the search space in turn
    (each choice; a range's low and high), before the study exists: a bad option or value is one line, and no
    trial, study or run folder is left behind. The trials' config without the space's options."""
    first = {name: spec[0] if isinstance(spec, list) else spec["low"] for name, spec in space.items()}
    variants: list[tuple[str, Any]] = [("", None)]  # the options alone, then each value of the space
    for name, spec in space.items():
        variants += [(name, value) for value in (spec if isinstance(spec, list) else [spec["low"], spec["high"]])]
    configs = []
    for name, value in variants:
        settings = [f"--{n}={format_value(value if n == name else v)}" for n, v in first.items()] if name else []
        where = f"{space_path}: {name}: {format_value(value)}: " if name else ""
        stdout, stderr = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                train.main([*args, *settings, "--print_config"])
        except SystemExit as e:
            if e.code:
                raise SweepError(where + stderr.getvalue().strip().splitlines()[-1].removeprefix("error: ")) from None
        config = yaml.safe_load(stdout.getvalue())
        try:
            train.check_config(config)
        except (OptionError, DataError, HubError) as e:
            raise SweepError(where + str(e)) from None
        configs.append(config)
    return configs[0]


def open_storage(url: str, heartbeat_seconds: int) -> RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose worker died (no heartbeat for 2 intervals) is failed
    and retried, at most 3 times (a trial that kills its worker, out of memory say, is not retried forever)."""
    from sqlalchemy.exc import IntegrityError

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    given = url  # as the user wrote it, for messages (its password masked: MaskedOutput)
    # postgresql:// means psycopg2 to SQLAlchemy; requirements.txt brings psycopg 3.
    url = url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
    # SQLite: wait for another worker's write instead of failing with "database is locked".
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            return RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True),
            )
        except Exception as e:  # no server, wrong password, no driver, not a URL...: all one line
            if (isinstance(e, IntegrityError) or "already exists" in str(e)) and attempt < 2:
                time.sleep(1)  # workers started together on a new database: another one is creating the tables
                continue
            raise SweepError(f"--storage {given}: cannot open the study there: {first_line(e)}") from None


def trial_line(trial: FrozenTrial, monitor: str) -> str:
    values = trial.intermediate_values
    best = f"{monitor} {max(values.values()):.4f}" if values else "no validation"
    state = "diverged (loss not finite)" if trial.user_attrs.get("diverged") else trial.state.name.lower()
    return f"trial {trial.number} (seed {trial.user_attrs.get('seed')}): {state}, {best} after {len(values)} epoch(s)"


def monitored(study: optuna.Study) -> str:
    """The metric the study's trials are scored by (studies from before other tasks: CoLA's val_mcc)."""
    return study.user_attrs.get("monitor", "val_mcc")


def best_trial(trials: list[FrozenTrial]) -> Optional[FrozenTrial]:
    """The complete trial with the highest score (val MCC for CoLA), of equals the first (as checkpoints.py picks it)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def format_cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_table(study: optuna.Study, export: bool = True) -> None:
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("unused")]
    names = sorted({name for t in trials for name in t.params})
    print("\n| trial | seed | " + "".join(f"{n} | " for n in names) + f"best {monitored(study)} | epochs | state | minutes | run folder |")
    print("| ---: " * (2 + len(names)) + "| ---: | ---: | --- | ---: | --- |")
    for t in trials:
        values = t.intermediate_values
        took = t.datetime_complete - t.datetime_start if t.datetime_complete and t.datetime_start else None
        state = "stopped, retried" if t.state == TrialState.FAIL and t.user_attrs.get("run_dir") else t.state.name.lower()
        state = "diverged" if t.user_attrs.get("diverged") else state
        run_dir = Path(t.user_attrs.get("run_dir", "-"))
        cells = [t.number, t.user_attrs.get("seed", "-"), *(format_cell(t.params.get(n, "-")) for n in names)]
        cells += [f"{max(values.values()):.4f}" if values else "-", len(values), state]
        cells += [f"{took.total_seconds() / 60:.1f}" if took else "-", f"{run_dir.parent.name}/{run_dir.name}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    best = best_trial(trials)
    if best is None:
        return
    checkpoint = Path(best.user_attrs["checkpoint"])
    if export and checkpoint.is_file():  # on this machine: export it now, so that inference.py and serve.py start fast
        train.export_for_inference(str(checkpoint))
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    finished = sum(t.state in FINISHED for t in trials)
    print(f"\n{finished} trials, {pruned} pruned. Best: trial {best.number}, {monitored(study)} {best.value:.4f}: {checkpoint}")
    if export:  # else the soup comes next, and is what they pick
        print_next_steps(checkpoint)


def print_next_steps(checkpoint: Path, why: str = "") -> None:
    print(f"inference.py and serve.py pick it without --checkpoint{why}. Next: python serve.py, or")
    print(f'  python inference.py --checkpoint {shlex.quote(str(checkpoint))} "The boy is sitting on a bench."')


def soup_made_of(study_name: str, saved: dict[int, Path]) -> Optional[Path]:
    """The soup checkpoint an earlier --soup made of the same study's same trial checkpoints, if one is still there."""
    log_dir = next(iter(saved.values())).parent.parent.parent
    wanted = sorted((number, str(path), path.stat().st_mtime_ns) for number, path in saved.items())  # a checkpoint rewritten since: another soup
    for metrics_file in log_dir.glob("version_*/metrics.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            metrics = json.loads(metrics_file.read_text())
            soup = metrics["soup"]
            made = sorted((trial["trial"], trial["checkpoint"], trial["mtime_ns"]) for trial in soup["trials"])
            if soup["study"] == study_name and made == wanted and Path(metrics["best_model_path"]).is_file():
                return Path(metrics["best_model_path"])
    return None


def make_soup(study: optuna.Study) -> None:
    """The greedy soup of the study's trials (Wortsman et al., 2022, "Model soups"): their best checkpoints in
    order of val MCC, each added to the average only if the average's val MCC does not drop; written as an
    ordinary run (the newest run folder: inference.py and serve.py pick it) that records what went in.
    Averaging works for runs fine-tuned from one starting point: the same model and the same head (head_seed)."""
    seeds, saved = {}, {}  # trial number -> its seed; -> its best checkpoint, if it saved one on this machine
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if t.user_attrs.get("diverged"):
            continue
        try:
            checkpoint = best_checkpoint_of_run(Path(t.user_attrs["run_dir"]))
        except (KeyError, OSError, CheckpointError) as e:
            checkpoint, why = None, first_line(e)
        else:
            why = "its best checkpoint is gone"
        if checkpoint is None or not checkpoint.is_file():  # deleted since, or trained on another machine
            print(f"note: --soup leaves trial {t.number} out: {why} ({t.user_attrs.get('run_dir', 'no run folder')})")
            continue
        seeds[t.number], saved[t.number] = t.user_attrs.get("seed"), checkpoint
    if len(saved) < 2:
        raise SweepError(f"--soup: {len(saved)} trial(s) with a saved checkpoint on this machine; a soup needs at least 2")
    loaded = {number: load_checkpoint(path) for number, path in saved.items()}
    first_number, first = next(iter(loaded.items()))
    shapes = {k: v.shape for k, v in first["state_dict"].items()}
    for number, checkpoint in loaded.items():
        if checkpoint["hyper_parameters"].get("head_seed") is None:
            raise SweepError(f"--soup: trial {number} was trained without --model.head_seed: its head started from other"
                             " random weights than the others', and their average is no model; sweep with it")
        if {k: v.shape for k, v in checkpoint["state_dict"].items()} != shapes:
            raise SweepError(f"--soup: trials {first_number} and {number} trained models of other shapes: only one model's runs average")
        for name in ("model_name_or_path", "pooling", "head_seed"):  # same shapes, but weights that mean other things
            if checkpoint["hyper_parameters"].get(name) != first["hyper_parameters"].get(name):
                raise SweepError(f"--soup: trials {first_number} and {number} differ in --model.{name}: only runs of one model"
                                 " from one starting point average; keep it out of the search space")
    if earlier := soup_made_of(study.study_name, saved):
        print(f"The soup of these trials is already made: {earlier} (the same --soup again makes none)")
        return
    # Scored as training validates: the same model class, data module, metric and split.
    hyper_parameters = {k: v for k, v in first["hyper_parameters"].items() if not k.startswith("_")}
    model = TextClassifier(**hyper_parameters)
    datamodule = TextDataModule(**{k: v for k, v in first["datamodule_hyper_parameters"].items() if not k.startswith("_")})
    monitor = train.monitored_metric(datamodule.hparams.task, datamodule.hparams.metric)  # as the trials were picked
    trainer = Trainer(devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      plugins=[AtomicCheckpointIO()])

    def val_score(members: list[int]) -> float:
        """The validation score (val MCC for CoLA) of these trials' average, which the model then holds."""
        model.load_state_dict({
            name: sum(loaded[n]["state_dict"][name] for n in members) / len(members) if tensor.is_floating_point() else tensor
            for name, tensor in first["state_dict"].items()
        })
        return trainer.validate(model, datamodule=datamodule, verbose=False)[0][monitor]

    scores = {number: val_score([number]) for number in loaded}
    order = sorted(loaded, key=lambda number: (-scores[number], number))
    best, soup, soup_score = order[0], [order[0]], scores[order[0]]
    print(f"\n| trial | seed | its {monitor} | the soup's with it | in the soup |\n| ---: | ---: | ---: | ---: | --- |")
    print(f"| {best} | {seeds[best]} | {soup_score:.4f} | {soup_score:.4f} | yes (the best) |")
    for number in order[1:]:
        score = val_score([*soup, number])
        if score >= soup_score:  # the greedy rule: a trial that lowers the soup's score stays out
            soup, soup_score = [*soup, number], score
        print(f"| {number} | {seeds[number]} | {scores[number]:.4f} | {score:.4f} | {'yes' if number in soup else 'no'} |")
    val_score(soup)  # the soup's weights into the model
    # Written in a temporary folder, which becomes the next run folder only when whole: a --soup killed mid-write
    # leaves no half run that inference.py would note (the next atomic writer removes the leftover).
    log_dir = saved[best].parent.parent.parent
    remove_dead_writers_files(log_dir)
    building = temporary_path(log_dir / "soup")
    name = f"soup-{monitor}={soup_score:.4f}.ckpt"
    trainer.save_checkpoint(building / "checkpoints" / name, weights_only=True)  # as training saves one, no optimizer state
    shutil.copy(saved[best].parent.parent / "hparams.yaml", building / "hparams.yaml")
    trials = [{"trial": n, "seed": seeds[n], monitor: scores[n], "checkpoint": str(saved[n]), "mtime_ns": saved[n].stat().st_mtime_ns,
               "in_soup": n in soup} for n in order]
    run_dir = log_dir / claim_run_version(log_dir)  # empty: replaced by the whole folder at once (rename(2))
    path = run_dir / "checkpoints" / name
    metrics = {"monitor": monitor, f"best_{monitor}": soup_score, "best_model_path": str(path),
               "soup": {"study": study.study_name, "trials": trials}}
    (building / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    os.rename(building, run_dir)
    print(f"\nSoup of trials {', '.join(map(str, soup))} ({len(soup)} of {len(order)}): {monitor} {soup_score:.4f}, the best"
          f" trial alone {scores[best]:.4f}: {path}")
    train.export_for_inference(str(path))
    print_next_steps(path, " (the newest run folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="Every other option goes to each trial's train.py (python train.py --help lists them).",
    )
    parser.add_argument("--n_trials", type=int, default=10, help="trials to finish, pruned ones included (default 10)")
    parser.add_argument("--budget_epochs", type=int, help="or stop starting trials once all have trained this many epochs")
    parser.add_argument("--search_space", metavar="YAML", help="train.py options to vary (default: only the seed)")
    parser.add_argument("--storage", default="sqlite:///logs/tune.db", help="an SQLAlchemy URL (default: %(default)s)")
    parser.add_argument("--study", default="cola", help="the study's name in --storage (default: %(default)s)")
    parser.add_argument("--heartbeat_seconds", type=int, default=60, help="a killed worker's trial is retried after 2 of these")
    parser.add_argument("--soup", action="store_true", help="then average the trials greedily into one model (needs --model.head_seed)")
    # argparse prints its usage before the error: one line instead, as every other problem.
    parser.error = lambda message: (print(f"error: {message} (python tune.py --help lists the options)", file=sys.stderr), sys.exit(2))
    return parser


def main() -> None:
    options, train_args = build_parser().parse_known_args()
    # Bounds, so that a typo is one line: 2**64 trials ran until stopped; a heartbeat of a day already retries a
    # killed worker's trial two days later.
    for name, most in (("n_trials", MAX_TRIALS), ("budget_epochs", None), ("heartbeat_seconds", 86_400)):
        value = getattr(options, name)
        if value is not None and not 1 <= value <= (most or value):
            raise SweepError(f"--{name} must be at least 1" + (f" and at most {most:,}" if most else "") + f"; not {value}")
    for fixed in ("--seed_everything", "--ckpt_path"):
        if any(a == fixed or a.startswith(fixed + "=") for a in train_args):
            raise SweepError(f"{fixed}: tune.py sets it for each trial (seed: trial number + 1; a retried trial resumes)")
    space = read_space(options.search_space)
    config = check_train_args(train_args, space, options.search_space)
    if options.soup and (config["model"].get("head_seed") is None or "model.head_seed" in space):
        raise SweepError("--soup averages runs that start from one head: give every trial the same --model.head_seed (e.g. 0)")
    sweep = Sweep(options, train_args, space)
    study = optuna.create_study(
        storage=open_storage(options.storage, options.heartbeat_seconds), study_name=options.study, direction="maximize", pruner=PRUNER, load_if_exists=True
    )
    command = {"train_args": train_args, "search_space": space}
    if "command" not in study.user_attrs:
        study.set_user_attr("command", command)
        study.set_user_attr("monitor", train.monitored_metric(config["data"]["task"], config["data"]["metric"]))
    elif study.user_attrs["command"] != command:
        raise SweepError(f"study {options.study!r} in {options.storage} ran other options: give the same ones, or a new --study")
    # A trial whose worker died (kill -9, out of memory, a machine lost) stays RUNNING in the storage, and done()
    # counts it: fail it now, as study.optimize would only once a trial starts, so that its retry is queued.
    optuna.storages.fail_stale_trials(study)
    if not sweep.done(study):
        # Ctrl-C and SIGTERM before and between trials also stop in one line (during training train.py's own handling).
        previous = {signum: signal.signal(signum, train.stop_before_training) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            study.optimize(sweep.objective, catch=(NotNeeded,), callbacks=[sweep.stop_when_done])
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if running:
        print(f"note: trial(s) {', '.join(map(str, running))} still running (another worker, or one killed less than"
              f" {2 * options.heartbeat_seconds} s ago: then run this command again)", file=sys.stderr)
    print_table(study, export=not options.soup)
    if options.soup:
        make_soup(study)


def run() -> None:
    mask_storage_passwords(sys.argv)  # again: run() is also called with an argv of its own (tests)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial (stop_when_done), not Optuna's tracebacks
    try:
        main()
    except (SweepError, DataError, HubError, CheckpointError, OptionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exit as e:
        sys.exit(e.code)
    except (StoppedBySignal, KeyboardInterrupt) as e:
        print(f"\nstopped: the same command continues the sweep ({shlex.join(['python', *sys.argv])})", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))


if __name__ == "__main__":
    run()
