"""Text classification data as a LightningDataModule: a GLUE task from the Hugging Face Hub (CoLA by
default), GLUE's own TSV files, or a user's TSV, CSV or JSON Lines files with named columns."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import datasets
import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Sampler
from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding

from checkpoints import CheckpointError
from hub import explain_hub_errors, load_glue
from readers import FORMATS, SPLIT_FILES, DataError, find_split_file, is_headerless_cola, load_cola_file, load_local_table
from samplers import BUCKET_LENGTHS, LengthGroupedSampler, PadToBucket, ResumableDataLoader, ShuffleSampler

MODEL_INPUTS = ["input_ids", "token_type_ids", "attention_mask", "labels"]
TEACHER_OUTPUTS = "teacher_log_probs"  # a training batch's teacher log-probabilities, with --model.teacher
METRICS = ("mcc", "accuracy", "f1")  # validation metrics logged for every task (val_mcc, val_accuracy, val_f1)
# With --data.group_column: a validation batch's flags, 1 where the example's group (CoLA's source, a user's customer)
# occurs in the training data. The model logs the metrics again for each part: val_seen_mcc, val_unseen_mcc, ...
GROUP_SEEN = "group_seen"
GROUP_PARTS = ("seen", "unseen")


@dataclass(frozen=True)
class Task:
    """A GLUE task, as the Hub's nyu-mll/glue has it and as GLUE's own TSV files do."""

    text_columns: tuple[str, ...]  # one sentence, or a pair, on the Hub
    label_names: tuple[str, ...]  # label 0, 1, ...: the Hub's ClassLabel names
    metric: str  # the one GLUE reports (with accuracy for MRPC and QQP): it picks the best checkpoint
    submission: str  # the file GLUE's server expects the test set's predictions in
    tsv_text_columns: tuple[str, ...] = ()  # GLUE's TSV header, where it names them otherwise
    tsv_label_column: str = "label"
    validation: str = "validation"  # Hub splits
    test: str = "test"
    submit_label_names: bool = False  # GLUE's server reads these tasks' labels as words, the others' as numbers


# The one place that knows GLUE's tasks (as the Lightning tutorial's table). STS-B, a regression, is left out.
GLUE_TASKS = {
    "cola": Task(("sentence",), ("unacceptable", "acceptable"), "mcc", "CoLA.tsv"),
    "sst2": Task(("sentence",), ("negative", "positive"), "accuracy", "SST-2.tsv"),
    "mrpc": Task(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1", "MRPC.tsv",
                 tsv_text_columns=("#1 String", "#2 String"), tsv_label_column="Quality"),
    "qqp": Task(("question1", "question2"), ("not_duplicate", "duplicate"), "f1", "QQP.tsv", tsv_label_column="is_duplicate"),
    "qnli": Task(("question", "sentence"), ("entailment", "not_entailment"), "accuracy", "QNLI.tsv", submit_label_names=True),
    "rte": Task(("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy", "RTE.tsv", submit_label_names=True),
    "wnli": Task(("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy", "WNLI.tsv"),
    "mnli": Task(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy", "MNLI-m.tsv",
                 tsv_text_columns=("sentence1", "sentence2"), tsv_label_column="gold_label",
                 validation="validation_matched", test="test_matched", submit_label_names=True),
}
LABEL_NAMES = GLUE_TASKS["cola"].label_names
MAX_LABELS = 1000  # more distinct labels than a classification head of this recipe learns from small data
# TinyBERT's augmentation made 20 variants a sentence, the most in the literature; a sentence of n words has about 1.5n
# single drops and swaps, so more copies repeat themselves (1,000 copies of CoLA: 724 distinct a sentence at most).
MAX_PERTURBED_COPIES = 20
# DataLoader worker processes, each a copy of the training process: beyond a few per core they only cost memory.
MAX_WORKERS = 64


class OptionError(ValueError):
    """An option value that cannot work, reported as one line naming the option and what it accepts."""


def default_metric(task: str) -> str:
    """The metric that picks a task's best checkpoint: GLUE's for its tasks, accuracy for a user's own."""
    return GLUE_TASKS[task].metric if task in GLUE_TASKS else "accuracy"


def check_data_options(
    task: str, data_dir: Optional[str], train_file: Optional[str], validation_file: Optional[str],
    text_columns: Optional[list[str]], label_column: Optional[str], metric: Optional[str], batch_size: int, max_length: int,
    num_workers: Optional[int], teacher: Optional[str], perturbed_copies: int, unlabelled_file: Optional[str],
    group_column: Optional[str],
) -> None:
    """Refuse, in one line and before any data loads, the TextDataModule options with which nothing could work."""
    if bool(train_file) != bool(validation_file) or (train_file and data_dir):
        raise OptionError("give --data.train_file and --data.validation_file together, or --data.data_dir (a folder"
                          " with both), not both")
    local = data_dir or train_file
    if task not in GLUE_TASKS and not local:
        raise OptionError(f"--data.task {task!r} is not a GLUE task ({', '.join(GLUE_TASKS)}); for a task of your own,"
                          " give its files with --data.data_dir (or --data.train_file and --data.validation_file)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", task):  # it names a folder
        raise OptionError(f"--data.task must be a name of letters, digits and _ . - (it names the run folder), not {task!r}")
    if text_columns is not None and (len(text_columns) not in (1, 2) or len(set(text_columns)) != len(text_columns)):
        raise OptionError(f"--data.text_columns names one column (single texts) or two (pairs), e.g. [sentence] or"
                          f" [question1,question2]; not {text_columns}")
    reserved = {"label", "labels", "line", "group", "truncated", *MODEL_INPUTS, TEACHER_OUTPUTS, GROUP_SEEN}
    if text_columns is not None and label_column in text_columns:
        raise OptionError(f"--data.text_columns and --data.label_column both name {label_column!r}: the texts and the labels are two columns")
    if text_columns is not None and (clash := set(text_columns) & reserved):
        raise OptionError(f"--data.text_columns: {sorted(clash)[0]!r} names one of the columns this project makes of yours"
                          f" ({', '.join(sorted(reserved))}): rename that column in your files")
    if group_column is not None and not local:
        raise OptionError("--data.group_column names a column of your files (--data.data_dir); the Hub's GLUE tasks have"
                          " none (for CoLA's sources: GLUE's own TSV files, --data.data_dir and --data.group_column source)")
    if group_column is not None and (not group_column.strip() or group_column in (text_columns or [])
                                     or group_column in ("label", label_column)):
        raise OptionError(f"--data.group_column must name a column other than the texts and the labels, not {group_column!r}")
    if (text_columns or label_column) and not local:
        raise OptionError("--data.text_columns and --data.label_column choose columns of your files (--data.data_dir);"
                          " a GLUE task from the Hub has its own")
    if metric is not None and metric not in METRICS:
        raise OptionError(f"--data.metric must be one of {', '.join(METRICS)}, or null for the task's; not {metric!r}")
    if batch_size < 1:
        raise OptionError(f"--data.batch_size must be at least 1, not {batch_size}")
    if max_length < 3:  # [CLS], one token, [SEP]
        raise OptionError(f"--data.max_length must be at least 3 ([CLS], one token, [SEP]), not {max_length}")
    if not 0 <= perturbed_copies <= MAX_PERTURBED_COPIES:
        raise OptionError(f"--data.perturbed_copies must be from 0 to {MAX_PERTURBED_COPIES}, not {perturbed_copies}")
    if (perturbed_copies or unlabelled_file) and not teacher:
        raise OptionError("--data.perturbed_copies and --data.unlabelled_file add examples that a teacher labels:"
                          " give one with --model.teacher")
    if num_workers is not None and not 0 <= num_workers <= MAX_WORKERS:  # 2**64 forked until memory ran out
        raise OptionError(f"--data.num_workers must be 0 to {MAX_WORKERS} (0: load batches in the training process), not {num_workers}")


class TextDataModule(pl.LightningDataModule):
    """Tokenized batches of a text classification task (single sentences or pairs), with per-batch dynamic padding.

    Args:
        model_name_or_path: whose tokenizer to use (set from --model.model_name_or_path by train.py).
        task: a GLUE task (cola, sst2, mrpc, qqp, qnli, rte, wnli, mnli: GLUE_TASKS), loaded from the Hub unless
            data_dir is given; or a name of your own for your own files in data_dir (it names the run's folder
            under logs/).
        data_dir: a folder with train and dev files: GLUE's TSV files (CoLA's without a header, as GLUE has them),
            or TSV, CSV or JSON Lines files with a header (train.csv and dev.csv, say); None loads the task from the Hub.
        train_file, validation_file: the two files by path, instead of data_dir.
        text_columns: the column of the text, or the two of a pair, in data_dir's files (None: the task's;
            ["sentence"] for your own task).
        label_column: the column of the labels (None: the task's; "label" for your own task): words or numbers,
            two or more distinct values; the model's labels are named by them.
        metric: the validation metric that picks the best checkpoint and stops training early: mcc, accuracy
            or f1 (macro-averaged for more than two labels); None: the task's (GLUE's: MCC for CoLA, F1 for MRPC
            and QQP, else accuracy; accuracy for your own task).
        batch_size: examples per batch (per device under DDP).
        max_length: longer examples are truncated to this many tokens (CoLA's longest is ~45).
        num_workers: DataLoader worker processes; None: 2 with a GPU (batches collated while the GPU
            computes), 0 without (on a small CPU, workers would compete with the model for cores).
        group_by_length: training batches of similar-length examples (LengthGroupedSampler) instead
            of uniformly random ones: less padding, faster steps.
        pad_to_buckets: pad batches to 16, 32, 64 or max_length tokens (PadToBucket) instead of to their longest
            example; set by train.py from --model.compile.
        teacher: a checkpoint whose outputs for the training examples go in their batches (distill.py); set by
            train.py from --model.teacher.
        perturbed_copies: with a teacher, this many copies of each training example with a word dropped or two
            neighbours swapped (perturbed; of a pair, its last text), added to the training data with the teacher's
            labels (its most probable one for the cross-entropy, its probabilities for distillation).
        unlabelled_file: with a teacher, a file of more examples for it to label, as perturbed_copies are: one text
            a line (a pair: two texts and a tab between). Both are recorded in the run folder, extra_examples.tsv.
        group_column: a column of your files that groups the examples (CoLA's `source` in GLUE's files; a customer,
            a product, a site): the validation metrics are logged again for the examples whose group occurs in the
            training data (val_seen_mcc, ...) and for the others (val_unseen_mcc, ...: how the model carries over to
            a group it never saw). The monitored metric stays the overall one.
    """

    def __init__(
        self,
        model_name_or_path: str = "google-bert/bert-base-uncased",
        task: str = "cola",
        data_dir: Optional[str] = None,
        train_file: Optional[str] = None,
        validation_file: Optional[str] = None,
        text_columns: Optional[list[str]] = None,
        label_column: Optional[str] = None,
        metric: Optional[Literal["mcc", "accuracy", "f1"]] = None,
        batch_size: int = 32,
        max_length: int = 128,
        num_workers: Optional[int] = None,
        group_by_length: bool = True,
        pad_to_buckets: bool = False,
        teacher: Optional[str] = None,
        perturbed_copies: int = 0,
        unlabelled_file: Optional[str] = None,
        group_column: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_data_options(task, data_dir, train_file, validation_file, text_columns, label_column, metric, batch_size,
                           max_length, num_workers, teacher, perturbed_copies, unlabelled_file, group_column)
        self.save_hyperparameters()
        glue = GLUE_TASKS.get(task)
        # The texts' names in the dataset: the Hub's for a GLUE task (its TSV files' columns are renamed to them).
        self.text_columns: list[str] = list(text_columns or (glue.text_columns if glue else ("sentence",)))
        self.tokenizer = None
        self.splits: dict[str, datasets.Dataset] = {}
        self._label_names: Optional[list[str]] = None
        # With a teacher: what adds its outputs to the training split (train.py sets distill.add_teacher_outputs, which
        # lives above this file: it runs the teacher through inference.py), and the teacher's sha256 it found.
        self.teach: Optional[Callable[["TextDataModule", datasets.Dataset], datasets.Dataset]] = None
        self.teacher_sha256: Optional[str] = None  # recorded in checkpoints (state_dict)
        self.group_sizes: dict[str, int] = {}  # validation examples of a group seen in training, and not: group_column

    @property
    def label_names(self) -> list[str]:
        """The labels' names, label 0 first: the Hub's ClassLabel names, GLUE's for its tasks' files, else the
        training file's distinct labels, sorted (as numbers, if they all are). Read from the data once."""
        if self._label_names is None:
            self._label_names = self._labelled_splits()[1]
        return self._label_names

    def _load_split(self, split: str) -> tuple[datasets.Dataset, str]:
        """One split as loaded, and where from: labels are ClassLabel ids (the Hub, CoLA's headerless files) or the
        file's own words or numbers (with each example's line, for errors)."""
        task, glue = self.hparams.task, GLUE_TASKS.get(self.hparams.task)
        given = self.hparams.train_file if split == "train" else self.hparams.validation_file
        if not (self.hparams.data_dir or given):
            return load_glue(task, split if split == "train" else glue.validation), f"the Hub's {task} {split} split"
        path = Path(given) if given else find_split_file(Path(self.hparams.data_dir), split)
        option = "--data.train_file" if split == "train" else "--data.validation_file"
        if given and path.suffix[1:] not in FORMATS:
            raise DataError(f"{path}: {option} takes a .tsv, .csv or .jsonl file")
        if given and not path.is_file():
            raise DataError(f"{path}: file not found ({option})")
        group_column = self.hparams.group_column
        if task == "cola" and not self.hparams.text_columns and is_headerless_cola(path):
            if group_column not in (None, "source"):
                raise DataError(f"{path}: GLUE's CoLA files have the columns source, label, star and sentence, no {group_column!r}:"
                                " use --data.group_column source")
            dataset = load_cola_file(path, split)
            return (dataset.rename_column("source", "group") if group_column else dataset.remove_columns("source")), str(path)
        if self.hparams.text_columns:
            text_columns = [tuple(self.hparams.text_columns)]
        else:  # GLUE's TSV header, or the Hub's names (a Hub split saved as CSV, say)
            text_columns = [glue.tsv_text_columns, glue.text_columns] if glue and glue.tsv_text_columns else [tuple(self.text_columns)]
        label_columns = [self.hparams.label_column or (glue.tsv_label_column if glue else "label"), "label"]
        return load_local_table(path, text_columns, label_columns, tuple(self.text_columns), group_column), str(path)

    def _labelled_splits(self) -> tuple[dict[str, datasets.Dataset], list[str]]:
        """Both splits with label ids 0..n-1, and the labels' names; DataError for a label the training data lacks,
        or training data of a single label."""
        loaded = {split: self._load_split(split) for split in SPLIT_FILES}
        train, train_source = loaded["train"]
        feature, glue = train.features["label"], GLUE_TASKS.get(self.hparams.task)
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        elif glue:
            names = list(glue.label_names)
        else:
            values = set(train["label"])
            numbers = all(re.fullmatch(r"-?[0-9]+", v) for v in values)
            names = sorted(values, key=int if numbers else None)
        if len(names) > MAX_LABELS:  # a column of texts, say: a head of thousands of classes would train on nothing
            raise DataError(f"{train_source}: {len(names):,} distinct labels (at most {MAX_LABELS:,}): is --data.label_column"
                            f" {self.hparams.label_column or 'label'} the column of labels?")
        if len(set(train["label"])) < 2:
            only = train[0]["label"]
            raise DataError(f"{train_source}: every example has label {names[only] if isinstance(only, int) else only!r};"
                            " a classifier needs examples of two labels or more")
        splits = {}
        for split, (dataset, source) in loaded.items():
            if dataset.features["label"].dtype != "string":
                splits[split] = dataset
                continue
            ids = {name: i for i, name in enumerate(names)}
            if glue:  # GLUE's files number most tasks' labels
                ids.update({str(i): i for i in range(len(names))})
            labels = []
            for value, line in zip(dataset["label"], dataset["line"]):
                if value not in ids:
                    known = "the training file's labels" if not glue else f"{self.hparams.task}'s labels"
                    raise DataError(f"{source}:{line}: label {value!r} is not one of {known} ({', '.join(names)})")
                labels.append(ids[value])
            splits[split] = dataset.remove_columns(["label", "line"]).add_column("label", labels)
        return splits, names

    def _mark_seen_groups(self, train: datasets.Dataset, validation: datasets.Dataset) -> datasets.Dataset:
        """validation with GROUP_SEEN (1: the example's group occurs in train), when both parts have examples."""
        column, seen, groups = self.hparams.group_column, set(train["group"]), validation["group"]
        flags = [int(group in seen) for group in groups]
        unseen = sorted(set(groups) - seen)
        if not 0 < sum(flags) < len(flags):
            print(f"note: --data.group_column {column}: {'every' if all(flags) else 'no'} validation example's {column} occurs"
                  " in the training data: only the overall metrics are logged")
            return validation
        self.group_sizes = {"seen": sum(flags), "unseen": len(flags) - sum(flags)}
        shown = ", ".join(unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        print(f"validation: {self.group_sizes['seen']} examples of a {column} seen in training (val_seen_*), {self.group_sizes['unseen']}"
              f" of {len(unseen)} unseen (val_unseen_*: {shown})")
        return validation.add_column(GROUP_SEEN, flags)

    def _load_tokenizer(self):
        with explain_hub_errors("tokenizer", self.hparams.model_name_or_path):
            return AutoTokenizer.from_pretrained(self.hparams.model_name_or_path)

    def prepare_data(self) -> None:
        # Runs on one process: fill the caches (Hub download, Arrow files, tokenizer), keep no state.
        self._load_tokenizer()
        for split in SPLIT_FILES:
            self._load_split(split)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.tokenizer = self._load_tokenizer()
        splits, self._label_names = self._labelled_splits()
        if self.hparams.group_column:
            splits["validation"] = self._mark_seen_groups(splits["train"], splits["validation"])
        if self.hparams.teacher and stage in (None, "fit"):  # validating alone needs no teacher
            if self.teach is None:
                raise OptionError("--data.teacher: set TextDataModule.teach to distill.add_teacher_outputs (train.py does)")
            splits["train"] = self.teach(self, splits["train"].select_columns([*self.text_columns, "label"]))
        for split, dataset in splits.items():
            self.splits[split] = self._tokenize(dataset, split)

    def _model_max_length(self) -> int:
        """The longest input the model takes: its tokenizer's model_max_length, and its position embeddings
        (a tokenizer saved without model_max_length allows any length, and a longer input crashes the model)."""
        with explain_hub_errors("model", self.hparams.model_name_or_path):
            config = AutoConfig.from_pretrained(self.hparams.model_name_or_path)
        positions = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        return min(self.tokenizer.model_max_length, positions)

    def _tokenize(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        max_length = min(self.hparams.max_length, self._model_max_length())

        def encode(batch: dict) -> dict:
            texts = [batch[column] for column in self.text_columns]  # one list, or two for pairs
            encoded = self.tokenizer(*texts, truncation=True, max_length=max_length)
            # A second, untruncated pass only counts what truncation cut; map caches both.
            full_lengths = [len(ids) for ids in self.tokenizer(*texts)["input_ids"]]
            encoded["truncated"] = [n > max_length for n in full_lengths]
            return encoded

        # 64 texts a call, not datasets' 1,000: the tokenizer holds a text's whole encoding and its overflow pieces
        # (~1.5 MB for a 64 KiB line), and 1,000 such lines took 6.9 GB (benchmarks/README.md, "Memory bounds").
        dataset = dataset.map(encode, batched=True, batch_size=64, desc=f"Tokenizing {split}")
        truncated = sum(dataset["truncated"])
        if truncated:
            print(f"{split}: {truncated} of {len(dataset)} sentences truncated to max_length={max_length} tokens")
        dataset = dataset.rename_column("label", "labels")
        return dataset.select_columns([c for c in [*MODEL_INPUTS, TEACHER_OUTPUTS, GROUP_SEEN] if c in dataset.column_names])

    def state_dict(self) -> dict:
        return {"teacher_sha256": self.teacher_sha256} if self.teacher_sha256 else {}

    def load_state_dict(self, state: dict) -> None:
        # A resume goes on learning from the teacher it started with (the path alone is checked before: check_resumable).
        if state.get("teacher_sha256") != self.teacher_sha256:
            raise CheckpointError(f"the checkpoint was trained with a teacher of sha256 {str(state.get('teacher_sha256'))[:12]},"
                                  f" --model.teacher {self.hparams.teacher} is {str(self.teacher_sha256)[:12]}: resume with the"
                                  " teacher it was trained with, or start a new run")

    def _loader(self, split: str, sampler: Optional[Sampler] = None, loader_class: type = DataLoader, **kwargs) -> DataLoader:
        gpu = torch.cuda.is_available()
        workers = self.hparams.num_workers if self.hparams.num_workers is not None else 2 * gpu
        if self.hparams.pad_to_buckets:
            max_length = min(self.hparams.max_length, self.tokenizer.model_max_length)
            collate = PadToBucket(self.tokenizer, buckets=(*(b for b in BUCKET_LENGTHS if b < max_length), max_length))
        else:  # multiples of 8 tokens keep matrix shapes aligned to the GPU's tensor cores (TF32 and bf16)
            collate = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=8 if gpu else None)
        return loader_class(
            self.splits[split],
            **kwargs,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=gpu,
        )

    def train_dataloader(self) -> DataLoader:
        seed = torch.initial_seed()  # seed_everything's seed, the same on every DDP process
        if self.hparams.group_by_length:
            lengths = [len(ids) for ids in self.splits["train"]["input_ids"]]
            world_size = self.trainer.world_size if self.trainer else 1
            sampler = LengthGroupedSampler(lengths, self.hparams.batch_size * world_size, seed)
        else:
            sampler = ShuffleSampler(len(self.splits["train"]), seed)
        return self._loader("train", sampler, ResumableDataLoader, batches_done=self._batches_done_this_epoch)

    def _batches_done_this_epoch(self) -> int:
        # Training batches of the current epoch that Lightning counts as done: those of the interrupted
        # run when resuming from a checkpoint saved mid-epoch, 0 at every epoch's start.
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer else 0

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")


ColaDataModule = TextDataModule  # its name when it knew CoLA alone
