"""Distillation (--model.teacher): a trained checkpoint of this project teaches a student. Its outputs for the
training examples, and for extra examples it labels (perturbed copies of them, a user's unlabelled file), are
computed here, once, and handed to the data module as data (add_teacher_outputs, which train.py wires in as
TextDataModule.teach); the model mixes them into its loss (model.distillation_loss). Measured on CoLA, not adopted:
benchmarks/README.md, "Distillation"."""

import hashlib
import itertools
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import datasets
import numpy as np

from checkpoints import CheckpointError, remove_dead_writers_files, temporary_path
from data import TEACHER_OUTPUTS
from export import file_sha256, user_cache_dir, writable
from inference import InputError, Predictor
from readers import DataError, bounded_lines, text_line

if TYPE_CHECKING:
    from data import TextDataModule

# Examples a teacher labels beyond the training set (perturbed copies and --data.unlabelled_file's lines together):
# each costs ~300 bytes of memory until training starts, and a teacher's forward pass.
MAX_EXTRA_EXAMPLES = 1_000_000


def teacher_outputs(teacher: str, texts: list[list[str]], label_names: list[str]) -> tuple["np.ndarray", str]:
    """(the teacher's log-probabilities for each example, the teacher checkpoint's sha256); texts: one list per text
    column. Computed once per teacher and data (its ONNX export, inference.Predictor: any model of this project, of any
    size or tokenizer) and cached beside the teacher's checkpoint as TEACHER.teacher-outputs-SHA-DATA.npz, keyed by
    both digests, so that a student's epoch costs what a plain epoch costs. CheckpointError (one line) for a teacher
    that cannot be used: the same checks whether its outputs come from the cache or not."""
    path = Path(teacher)
    if not path.is_file():
        raise CheckpointError(f"{teacher}: --model.teacher not found (a .ckpt file trained by this project)")
    sha256 = file_sha256(path)
    data = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    name = f"{path.stem}.teacher-outputs-{sha256[:16]}-{data[:16]}.npz"
    cache = path.with_name(name) if writable(path.parent) else user_cache_dir() / name
    cached = read_teacher_cache(cache, len(texts[0]))
    if cached is not None:
        outputs, labels, text_count = cached
        check_teacher_fits(teacher, labels, text_count, label_names, len(texts))
        return outputs, sha256
    try:
        predictor = Predictor(path)
    except InputError as e:
        raise CheckpointError(f"{teacher}: --model.teacher: {e}") from None
    check_teacher_fits(teacher, predictor.labels, len(predictor.text_names), label_names, len(texts))
    print(f"Teacher {path.name}: classifying the {len(texts[0])} training examples once (cached as {cache})")
    results = predictor.predict(list(zip(*texts)) if len(texts) == 2 else texts[0], progress=True)
    if any("error" in result for result in results):
        raise CheckpointError(f"{teacher}: --model.teacher gives no finite output for some training examples: its weights are damaged")
    probabilities = np.array([[result["probabilities"][label] for label in label_names] for result in results])
    outputs = np.log(np.maximum(probabilities, 1e-30)).astype(np.float32)  # softmax(log p / T) = softmax(logits / T)
    write_teacher_cache(cache, outputs, label_names, len(texts))
    return outputs, sha256


def check_teacher_fits(teacher: str, labels: list[str], text_count: int, label_names: list[str], data_text_count: int) -> None:
    if labels != label_names or text_count != data_text_count:
        raise CheckpointError(f"{teacher}: --model.teacher was trained on labels {labels} of {text_count} text(s) an example;"
                              f" this data has {label_names} of {data_text_count}: use a teacher of this task")


def cache_digest(outputs: "np.ndarray", labels: list[str], text_count: int) -> str:
    """The sha256 of a cache's content, recorded in it: a cache changed on disk (a bad copy, a hand edit) is not used."""
    return hashlib.sha256(outputs.astype("<f4").tobytes() + json.dumps([labels, text_count]).encode()).hexdigest()


def read_teacher_cache(cache: Path, count: int) -> Optional[tuple["np.ndarray", list[str], int]]:
    """(outputs, the teacher's labels, its texts an example) from a cache whose content matches its recorded digest;
    None when there is none, or it is damaged (then computed again, with a note)."""
    try:
        with np.load(cache, allow_pickle=False) as saved:
            outputs, labels, text_count, digest = saved["outputs"], saved["labels"].tolist(), int(saved["text_count"]), str(saved["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError) as e:  # not an .npz of ours: a damaged file
        print(f"note: {cache}: the teacher's cached outputs are unreadable ({type(e).__name__}); computing them again")
        return None
    if outputs.shape != (count, len(labels)) or not np.isfinite(outputs).all() or cache_digest(outputs, labels, text_count) != digest:
        print(f"note: {cache}: the teacher's cached outputs do not match their recorded sha256; computing them again")
        return None
    return outputs, labels, text_count


def write_teacher_cache(cache: Path, outputs: "np.ndarray", labels: list[str], text_count: int) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers_files(cache.parent)
        with open(temporary_path(cache), "wb") as f:
            np.savez(f, outputs=outputs, labels=np.array(labels, dtype=str), text_count=np.array(text_count),
                     sha256=np.array(cache_digest(outputs, labels, text_count)))
        os.replace(temporary_path(cache), cache)
    except OSError as e:  # a full disk: the run goes on, computing them again next time
        temporary_path(cache).unlink(missing_ok=True)
        print(f"note: the teacher's outputs were not cached ({e.strerror or e})")


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
        for line_no, raw in bounded_lines(f, path, " (--data.unlabelled_file)"):
            line = text_line(raw, line_no, path)
            if not line.strip():
                continue
            texts = tuple(line.split("\t")) if text_count == 2 else (line,)
            if len(texts) != text_count or not all(text.strip() for text in texts):
                raise DataError(f"{path}:{line_no}: expected {'two texts separated by a tab' if text_count == 2 else 'one text'},"
                                f" found {line!r} (--data.unlabelled_file)")
            yield texts, f"{path.name}:{line_no}"


def add_teacher_outputs(datamodule: "TextDataModule", train: datasets.Dataset) -> datasets.Dataset:
    """The training examples with the teacher's outputs, and the extra examples (perturbed copies, the unlabelled
    file's) labelled by the teacher; the extra ones are written to the run folder's extra_examples.tsv. Sets the data
    module's teacher_sha256, which its checkpoints record."""
    options, text_columns = datamodule.hparams, datamodule.text_columns
    extra = []  # (texts, where from)
    rows = list(zip(*(train[column] for column in text_columns)))  # by column: Arrow rows one by one are slow
    if options.perturbed_copies * len(rows) > MAX_EXTRA_EXAMPLES:
        raise DataError(f"--data.perturbed_copies {options.perturbed_copies} of {len(rows):,} training examples: over"
                        f" {MAX_EXTRA_EXAMPLES:,} examples for the teacher to label; give fewer copies")
    for copy in range(options.perturbed_copies):
        for number, texts in enumerate(rows, start=1):
            if change := perturbed(texts[-1], copy):
                extra.append(((*texts[:-1], change[0]), f"training example {number}, copy {copy + 1}: {change[1]}"))
    if options.unlabelled_file:
        room = MAX_EXTRA_EXAMPLES - len(extra)
        unlabelled = list(itertools.islice(read_unlabelled(Path(options.unlabelled_file), len(text_columns)), room + 1))
        if not unlabelled:
            raise DataError(f"{options.unlabelled_file}: no texts (--data.unlabelled_file: one a line)")
        if len(unlabelled) > room:
            raise DataError(f"{options.unlabelled_file}: over {room:,} texts (--data.unlabelled_file; with the perturbed copies"
                            f" at most {MAX_EXTRA_EXAMPLES:,} examples for the teacher to label)")
        extra += unlabelled
    texts = [list(column) for column in zip(*rows, *(example for example, _ in extra))]  # a list per text column
    label_names = datamodule.label_names
    outputs, datamodule.teacher_sha256 = teacher_outputs(options.teacher, texts, label_names)
    train = train.add_column(TEACHER_OUTPUTS, outputs[:len(train)].tolist())
    if not extra:
        return train
    labels = outputs[len(train):].argmax(axis=1)
    columns = {column: texts[i][len(train):] for i, column in enumerate(text_columns)}
    added = datasets.Dataset.from_dict({**columns, "label": labels.tolist(), TEACHER_OUTPUTS: outputs[len(train):].tolist()},
                                       features=train.features)
    trainer = datamodule.trainer
    if trainer and trainer.is_global_zero and trainer.log_dir:
        record_extra_examples(Path(trainer.log_dir) / "extra_examples.tsv", text_columns, label_names, extra, labels,
                              outputs[len(train):])
    return datasets.concatenate_datasets([train, added])


def record_extra_examples(path: Path, text_columns: list[str], label_names: list[str], extra: list, labels, log_probs) -> None:
    header = [*text_columns, "teacher_label", *(f"p_{name}" for name in label_names), "source"]
    lines = ["\t".join(header)]
    for (texts, source), label, row in zip(extra, labels, log_probs):
        texts = [" ".join(text.split()) for text in texts]  # a tab or line end in a CSV or JSON text would break the TSV
        lines.append("\t".join([*texts, label_names[label], *(f"{p:.4f}" for p in np.exp(row)), source]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"{len(extra)} extra training examples labelled by the teacher: {path}")
