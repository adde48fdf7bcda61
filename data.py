"""Text classification data as a LightningDataModule: a GLUE task from the Hugging Face Hub (CoLA by
default), GLUE's own TSV files, or a user's TSV, CSV or JSON Lines files with named columns."""

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import datasets
import numpy as np
import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Sampler
from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

from hub import explain_hub_errors, load_glue

SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}  # GLUE names the validation file dev.tsv
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
# A user's own files: train.* and dev.* (or validation.*; MNLI's dev_matched.tsv) in one of these formats.
FILE_STEMS = {"train": ("train",), "validation": ("dev", "validation", "dev_matched")}
FORMATS = ("tsv", "csv", "jsonl")
MAX_LABELS = 1000  # more distinct labels than a classification head of this recipe learns from small data


class DataError(ValueError):
    """A problem in the user's data, reported as one line: 'file:line: what is wrong'."""


class OptionError(ValueError):
    """An option value that cannot work, reported as one line naming the option and what it accepts."""


def default_metric(task: str) -> str:
    """The metric that picks a task's best checkpoint: GLUE's for its tasks, accuracy for a user's own."""
    return GLUE_TASKS[task].metric if task in GLUE_TASKS else "accuracy"


def read_glue_tsv(path: Path) -> Iterator[dict]:
    """Yield {"sentence", "label", "source"} rows of a GLUE CoLA file (source, label, star, sentence; no header).

    Parsed by hand rather than as CSV: CoLA sentences contain quote characters that a CSV reader
    would take as quoting. Blank lines at the end (editors add one) are ignored. Any other malformed
    line, blank ones included, or a file without sentences raises DataError naming the file and line.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows, first_blank = 0, None
    with f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                first_blank = first_blank or line_no  # an error only if a sentence follows
                continue
            if first_blank:
                raise DataError(f"{path}:{first_blank}: blank line (only the end of the file may have blank lines)")
            columns = line.split("\t")
            if len(columns) != 4:
                raise DataError(
                    f"{where}: expected 4 tab-separated columns (source, label, star, sentence), found {len(columns)}"
                )
            source, label, _, sentence = columns
            if label not in ("0", "1"):
                raise DataError(f"{where}: label must be 0 or 1, found {label!r}")
            if not sentence.strip():
                raise DataError(f"{where}: empty sentence")
            rows += 1
            yield {"sentence": sentence, "label": int(label), "source": source}
    if rows == 0:
        raise DataError(f"{path}: empty file (no sentences)")


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """datasets' "Generating train split" bars, for local files that load in a second: noise before a one-line error."""
    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _file_digest(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def load_local_cola(data_dir: Path, split: str) -> datasets.Dataset:
    """One split of a local GLUE CoLA folder as an Arrow dataset, cached by the file's content hash."""
    path = Path(data_dir) / SPLIT_FILES[split]
    try:
        found = path.is_file()
    except OSError as e:  # a folder that may not be listed: is_file() raises rather than say False
        raise DataError(f"{path}: cannot read ({e.strerror}): check the permissions of --data.data_dir") from None
    if not found:
        raise DataError(f"{path}: file not found (data_dir must hold GLUE CoLA's train.tsv and dev.tsv)")
    return load_cola_file(path, split)


def load_cola_file(path: Path, split: str) -> datasets.Dataset:
    try:
        with no_progress_bars():
            return datasets.Dataset.from_generator(
                read_glue_tsv,
                gen_kwargs={"path": path},
                features=datasets.Features({"sentence": datasets.Value("string"), "label": datasets.Value("int64"),
                                            "source": datasets.Value("string")}),
                fingerprint=f"cola-source-{split}-{_file_digest(path)}",  # "source": older caches lack that column
            )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def read_table(path: Path, text_columns: list[tuple[str, ...]], label_columns: list[str], names: tuple[str, ...],
               group_column: Optional[str] = None) -> Iterator[dict]:
    """Yield {name: text, ..., "label": str, "line": n} rows of a TSV, CSV or JSON Lines file with a header (JSON Lines:
    an object a line), its columns chosen by name: the first of text_columns (and of label_columns) that the file
    has, its texts named names in the rows; with group_column, that column's value too, as "group" (it may be empty). TSV is read as GLUE writes it, without quoting (sentences hold quote
    characters); CSV with quoting, as spreadsheets write it. A bad line raises DataError naming the file and line."""
    kind = path.suffix[1:]
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows, line_no, columns = 0, 1, None
    with f:
        try:
            if kind == "csv":
                reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
                lines = ((reader.line_num, fields) for fields in reader)
            else:  # lines end at \n alone: GLUE's SST-2 has a \r before some tabs
                lines = ((n, text_line(raw, n, path)) for n, raw in enumerate(f, start=1))
                if kind == "tsv":
                    lines = ((n, line.split("\t")) for n, line in lines)
            if kind == "jsonl":
                records = ((n, json_object(line, f"{path}:{n}")) for n, line in lines if line.strip())
            else:
                _, header = next(lines, (1, []))
                records = ((n, dict(zip(header, fields)) if len(fields) == len(header) else len(fields))
                           for n, fields in lines if any(field.strip() for field in fields))
            for line_no, record in records:
                where = f"{path}:{line_no}"
                if isinstance(record, int):
                    raise DataError(f"{where}: {record} fields, but the header (line 1) names {len(header)}")
                if columns is None:  # chosen from the header (or the first JSON object)
                    have = list(header) if kind != "jsonl" else list(record)
                    text = next((c for c in text_columns if set(c) <= set(have)), None)
                    label = next((c for c in label_columns if c in have), None)
                    if text is None or label is None:
                        wanted = [*text_columns[0], label_columns[0]]
                        missing = ", ".join(repr(c) for c in wanted if c not in have)
                        raise DataError(f"{path}:{1 if kind != 'jsonl' else line_no}: no column {missing} (it has {', '.join(map(repr, have))}):"
                                        " name yours with --data.text_columns [TEXT] or [TEXT1,TEXT2] and --data.label_column LABEL")
                    if group_column is not None and group_column not in have:
                        raise DataError(f"{path}:{1 if kind != 'jsonl' else line_no}: no column {group_column!r} (it has"
                                        f" {', '.join(map(repr, have))}): --data.group_column names one of them")
                    columns = dict(zip(names, text))
                row = {"line": line_no}
                if group_column is not None:
                    group = record.get(group_column)
                    if isinstance(group, (int, float, bool)):
                        group = json.dumps(group)
                    if not isinstance(group, str):
                        raise DataError(f"{where}: column {group_column!r} is {'missing' if group is None else 'not text'}")
                    row["group"] = group
                for name, column in [*columns.items(), ("label", label)]:
                    value = record.get(column)
                    if isinstance(value, (int, float, bool)) and name == "label":
                        value = json.dumps(value)  # JSON Lines labels may be numbers: 1 and "1" are one label
                    if not isinstance(value, str):
                        raise DataError(f"{where}: column {column!r} is {'missing' if value is None else 'not text'}")
                    if not value.strip():
                        raise DataError(f"{where}: empty {column!r}")
                    row[name] = value
                rows += 1
                yield row
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no + 1}: not valid UTF-8 ({e.reason})") from None
        except csv.Error as e:
            raise DataError(f"{path}:{line_no + 1}: {e}") from None
    if rows == 0:
        raise DataError(f"{path}: no examples (a header line, then one example a line)")


def text_line(raw: bytes, line_no: int, path: Path) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff" if line_no == 1 else "").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object ({{\"sentence\": ..., \"label\": ...}} a line)")
    return record


def load_local_table(path: Path, text_columns: list[tuple[str, ...]], label_columns: list[str], names: tuple[str, ...],
                     group_column: Optional[str] = None) -> datasets.Dataset:
    """read_table's rows as an Arrow dataset, cached by the file's content and the columns chosen."""
    choice = hashlib.sha256(json.dumps([text_columns, label_columns, names, group_column]).encode()).hexdigest()[:16]
    group = {"group": datasets.Value("string")} if group_column is not None else {}
    try:
        with no_progress_bars():
            return datasets.Dataset.from_generator(
                read_table,
                # Tuples: datasets would take lists in gen_kwargs as shards to split the work over.
                gen_kwargs={"path": path, "text_columns": tuple(text_columns), "label_columns": tuple(label_columns), "names": names,
                            "group_column": group_column},
                features=datasets.Features({**{n: datasets.Value("string") for n in names}, "label": datasets.Value("string"),
                                            "line": datasets.Value("int64"), **group}),
                fingerprint=f"table-{_file_digest(path)}-{choice}",
            )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def teacher_outputs(teacher: str, texts: list[list[str]], label_names: list[str]) -> tuple["np.ndarray", str]:
    """(the teacher's log-probabilities for each example, the teacher checkpoint's sha256); texts: one list per text
    column. Computed once per teacher and data (its ONNX export, inference.Predictor: any model of this project, of any
    size or tokenizer) and cached beside the teacher's checkpoint as TEACHER.teacher-outputs-SHA-DATA.npy, keyed by
    both digests, so that a student's epoch costs what a plain epoch costs. CheckpointError (one line) for a teacher
    that cannot be used."""
    from checkpoints import CheckpointError, remove_dead_writers_files, temporary_path
    from export import file_sha256, user_cache_dir, writable
    from inference import InputError, Predictor

    path = Path(teacher)
    if not path.is_file():
        raise CheckpointError(f"{teacher}: --model.teacher not found (a .ckpt file trained by this project)")
    sha256 = file_sha256(path)
    count = len(texts[0])
    data = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    name = f"{path.stem}.teacher-outputs-{sha256[:16]}-{data[:16]}.npy"
    cache = path.with_name(name) if writable(path.parent) else user_cache_dir() / name
    try:
        outputs = np.load(cache)
        if outputs.shape == (count, len(label_names)) and np.isfinite(outputs).all():
            return outputs, sha256
    except (OSError, ValueError):  # none yet, or damaged: computed again
        pass
    try:
        predictor = Predictor(path)
    except InputError as e:
        raise CheckpointError(f"{teacher}: --model.teacher: {e}") from None
    if predictor.labels != label_names or len(predictor.text_names) != len(texts):
        raise CheckpointError(f"{teacher}: --model.teacher was trained on labels {predictor.labels} of {len(predictor.text_names)}"
                              f" text(s) an example; this data has {label_names} of {len(texts)}: use a teacher of this task")
    print(f"Teacher {path.name}: classifying the {count} training examples once (cached as {cache})")
    results = predictor.predict(list(zip(*texts)) if len(texts) == 2 else texts[0], progress=True)
    if any("error" in result for result in results):
        raise CheckpointError(f"{teacher}: --model.teacher gives no finite output for some training examples: its weights are damaged")
    probabilities = np.array([[result["probabilities"][label] for label in label_names] for result in results])
    outputs = np.log(np.maximum(probabilities, 1e-30)).astype(np.float32)  # softmax(log p / T) = softmax(logits / T)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers_files(cache.parent)
        with open(temporary_path(cache), "wb") as f:
            np.save(f, outputs)
        os.replace(temporary_path(cache), cache)
    except OSError as e:  # a full disk: the run goes on, computing them again next time
        temporary_path(cache).unlink(missing_ok=True)
        print(f"note: the teacher's outputs were not cached ({e.strerror or e})")
    return outputs, sha256


def perturbed(text: str, copy: int) -> Optional[tuple[str, str]]:
    """Copy number `copy` of text with one word dropped or two neighbouring words swapped (even odds), and what was
    done; None for a text of one word, or a swap of two equal words. Seeded by the text and copy alone: the same
    copies for every run and seed, so that the teacher labels them once (its cache)."""
    words = text.split()
    rng = random.Random(f"{copy}\t{text}")  # a str seed is hashed by SHA-512: the same in every process, unlike hash()
    if len(words) < 2:
        return None
    if rng.random() < 0.5:
        i = rng.randrange(len(words))
        return " ".join(words[:i] + words[i + 1:]), f"word {i + 1} dropped ({words[i]})"
    i = rng.randrange(len(words) - 1)
    if words[i] == words[i + 1]:
        return None
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words), f"words {i + 1} and {i + 2} swapped"


def read_unlabelled(path: Path, text_count: int) -> Iterator[tuple[tuple[str, ...], str]]:
    """Yield (texts, "FILE:LINE") for each line of a file of unlabelled examples: one text a line, or a pair's two
    texts separated by a tab (as inference.py --file reads them); blank lines are skipped. DataError for a bad line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}) (--data.unlabelled_file)") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            line = text_line(raw, line_no, path)
            if not line.strip():
                continue
            texts = tuple(line.split("\t")) if text_count == 2 else (line,)
            if len(texts) != text_count or not all(text.strip() for text in texts):
                raise DataError(f"{path}:{line_no}: expected {'two texts separated by a tab' if text_count == 2 else 'one text'},"
                                f" found {line!r} (--data.unlabelled_file)")
            yield texts, f"{path.name}:{line_no}"


def find_split_file(data_dir: Path, split: str) -> Path:
    """data_dir's file for split: train.tsv (or .csv, .jsonl) for "train", dev.tsv (or validation.*) for "validation"."""
    candidates = [data_dir / f"{stem}.{kind}" for stem in FILE_STEMS[split] for kind in FORMATS]
    try:
        found = [path for path in candidates if path.is_file()]
    except OSError as e:  # a folder that may not be listed: is_file() raises rather than say False
        raise DataError(f"{candidates[0]}: cannot read ({e.strerror}): check the permissions of --data.data_dir") from None
    if not found:
        raise DataError(f"{candidates[0]}: file not found (data_dir must hold {SPLIT_FILES['train']} and {SPLIT_FILES['validation']},"
                        " or train and dev files in CSV or JSON Lines: train.csv, dev.jsonl...)")
    if len(found) > 1:
        raise DataError(f"{data_dir}: both {found[0].name} and {found[1].name}: keep one {split} file there")
    return found[0]


def is_headerless_cola(path: Path) -> bool:
    """Whether path starts like GLUE's CoLA files (source, label 0/1, star, sentence; no header)."""
    try:
        with open(path, "rb") as f:
            first = f.readline().split(b"\t")
    except OSError:
        return True  # the CoLA reader says why, as before
    return path.suffix == ".tsv" and len(first) == 4 and first[1] in (b"0", b"1")


class ShuffleSampler(Sampler[int]):
    """A uniformly random order of n items that depends only on (seed, epoch).

    A resumed run must see the interrupted epoch's batches in the same order, so the order cannot come from a
    generator that carries state from epoch to epoch. Lightning calls set_epoch() before every epoch (under
    DDP through its DistributedSamplerWrapper, which then deals the indices out to the processes).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)  # as torch's DistributedSampler seeds

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self._generator()).tolist()


class LengthGroupedSampler(ShuffleSampler):
    """Random batches of sentences of similar length, so that dynamic padding adds few pad tokens.

    Each epoch: shuffle all sentences, sort each window of 50 groups by length, cut it into groups,
    shuffle the groups. A group is one batch per DDP process: Lightning deals a custom sampler's indices
    out round-robin, so every process gets its share of the same group.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int) -> None:
        super().__init__(len(lengths), seed)  # same seed on every DDP process: same order
        self.lengths, self.group_size = lengths, group_size

    def __iter__(self) -> Iterator[int]:
        generator = self._generator()
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = 50 * self.group_size
        groups = []
        for start in range(0, len(order), window):
            by_length = sorted(order[start : start + window], key=self.lengths.__getitem__)
            groups += [by_length[i : i + self.group_size] for i in range(0, len(by_length), self.group_size)]
        # A short group stays last: in the middle it would shift every later batch off its group.
        last = [groups.pop()] if len(groups[-1]) < self.group_size else []
        for group in [groups[i] for i in torch.randperm(len(groups), generator=generator)] + last:
            yield from group


class ResumableDataLoader(DataLoader):
    """A DataLoader that, in a run resumed mid-epoch, starts at the batch where the interrupted run stopped.

    batches_done() says how many batches of the current epoch were already trained on; it is asked at the
    epoch's first batch, when Lightning has restored its progress from the checkpoint. The skipped batches
    are loaded and dropped (cheap next to training on them); the sampler must give the same order again
    (ShuffleSampler does). Under DDP Lightning rebuilds this class with its distributed sampler, and each
    process skips as many of its own batches.

    (Lightning's own mechanism, a DataLoader with state_dict()/load_state_dict(), is silently skipped in
    Lightning 2.6 when configure_optimizers reads trainer.estimated_stepping_batches, as TextClassifier's does:
    that sets up the training DataLoader before the checkpoint is restored, and it is never set up again.)
    """

    def __init__(self, *args, batches_done: Callable[[], int] = lambda: 0, **kwargs) -> None:
        # Its own generator (which only seeds worker processes): iterating must not draw from the global one,
        # whose state a checkpoint saves and restores for dropout (see TextClassifier.on_save_checkpoint).
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def __iter__(self) -> Iterator:
        skip = self.batches_done()  # a generator: this runs at the first next(), not at iter()
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


BUCKET_LENGTHS = (16, 32, 64)  # and max_length: CoLA's sentences are 3-47 tokens, most under 16


@dataclass
class PadToBucket(DataCollatorWithPadding):
    """Pads each batch to the shortest of a few lengths that holds its longest sentence: a compiled model
    (--model.compile) then meets a few shapes, instead of one per batch length, each compiled once."""

    buckets: tuple[int, ...] = ()

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(feature["input_ids"]) for feature in features)
        length = next(bucket for bucket in self.buckets if bucket >= longest)
        return pad_without_fast_tokenizer_warning(
            self.tokenizer, features, padding="max_length", max_length=length, return_tensors="pt"
        )


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
        teacher: a checkpoint whose outputs for the training examples go in their batches (teacher_outputs); set by
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
        if perturbed_copies < 0:
            raise OptionError(f"--data.perturbed_copies must be 0 or more, not {perturbed_copies}")
        if (perturbed_copies or unlabelled_file) and not teacher:
            raise OptionError("--data.perturbed_copies and --data.unlabelled_file add examples that a teacher labels:"
                              " give one with --model.teacher")
        if num_workers is not None and num_workers < 0:
            raise OptionError(f"--data.num_workers must be 0 or more (0: load batches in the training process), not {num_workers}")
        self.save_hyperparameters()
        glue = GLUE_TASKS.get(task)
        # The texts' names in the dataset: the Hub's for a GLUE task (its TSV files' columns are renamed to them).
        self.text_columns: list[str] = list(text_columns or (glue.text_columns if glue else ("sentence",)))
        self.tokenizer = None
        self.splits: dict[str, datasets.Dataset] = {}
        self._label_names: Optional[list[str]] = None
        self.teacher_sha256: Optional[str] = None  # the teacher's content, recorded in checkpoints (state_dict)
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
        column, seen = self.hparams.group_column, set(train["group"])
        flags = [int(group in seen) for group in validation["group"]]
        unseen = sorted(set(validation["group"]) - seen)
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
        if self.hparams.teacher:
            splits["train"] = self._taught(splits["train"].select_columns([*self.text_columns, "label"]))
        for split, dataset in splits.items():
            self.splits[split] = self._tokenize(dataset, split)

    def _taught(self, train: datasets.Dataset) -> datasets.Dataset:
        """The training examples with the teacher's outputs, and the extra examples (perturbed copies, the unlabelled
        file's) labelled by the teacher; the extra ones are written to the run folder's extra_examples.tsv."""
        extra = []  # (texts, where from)
        rows = list(zip(*(train[column] for column in self.text_columns)))  # by column: Arrow rows one by one are slow
        for copy in range(self.hparams.perturbed_copies):
            for number, texts in enumerate(rows, start=1):
                if change := perturbed(texts[-1], copy):
                    extra.append(((*texts[:-1], change[0]), f"training example {number}, copy {copy + 1}: {change[1]}"))
        if self.hparams.unlabelled_file:
            unlabelled = list(read_unlabelled(Path(self.hparams.unlabelled_file), len(self.text_columns)))
            if not unlabelled:
                raise DataError(f"{self.hparams.unlabelled_file}: no texts (--data.unlabelled_file: one a line)")
            extra += unlabelled
        texts = [list(column) for column in zip(*rows, *(example for example, _ in extra))]  # a list per text column
        outputs, self.teacher_sha256 = teacher_outputs(self.hparams.teacher, texts, self._label_names)
        train = train.add_column(TEACHER_OUTPUTS, outputs[:len(train)].tolist())
        if not extra:
            return train
        labels = outputs[len(train):].argmax(axis=1)
        columns = {column: texts[i][len(train):] for i, column in enumerate(self.text_columns)}
        added = datasets.Dataset.from_dict({**columns, "label": labels.tolist(), TEACHER_OUTPUTS: outputs[len(train):].tolist()},
                                           features=train.features)
        if self.trainer and self.trainer.is_global_zero and self.trainer.log_dir:
            self._record(Path(self.trainer.log_dir) / "extra_examples.tsv", extra, labels, outputs[len(train):])
        return datasets.concatenate_datasets([train, added])

    def _record(self, path: Path, extra: list, labels, log_probs) -> None:
        header = [*self.text_columns, "teacher_label", *(f"p_{name}" for name in self._label_names), "source"]
        lines = ["\t".join(header)]
        for (texts, source), label, row in zip(extra, labels, log_probs):
            texts = [" ".join(text.split()) for text in texts]  # a tab or line end in a CSV or JSON text would break the TSV
            lines.append("\t".join([*texts, self._label_names[label], *(f"{p:.4f}" for p in np.exp(row)), source]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        print(f"{len(extra)} extra training examples labelled by the teacher: {path}")

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

        dataset = dataset.map(encode, batched=True, desc=f"Tokenizing {split}")
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
            from checkpoints import CheckpointError

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
