"""--data.group_column: the validation metrics again for the examples whose group (CoLA's source, a user's customer)
occurs in the training data, and for the others, in TensorBoard, metrics.json and the end-of-run lines."""

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import make_sentence, run_train, tiny_train_args
from data import GROUP_SEEN, OptionError, TextDataModule
from model import TextClassifier

# Training sources a and b; validation: 10 of a (seen), 6 of c and 4 of d (unseen: 10 in two sources).
TRAIN_SOURCES = ["a"] * 24 + ["b"] * 24
DEV_SOURCES = ["a"] * 10 + ["c"] * 6 + ["d"] * 4


def write_cola_with_sources(folder: Path) -> Path:
    """GLUE's headerless CoLA layout with a source a line (label 1: the sentence mentions a dog)."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name, sources in (("train.tsv", TRAIN_SOURCES), ("dev.tsv", DEV_SOURCES)):
        sentences = [make_sentence(rng) for _ in sources]
        (folder / name).write_text("".join(f"{source}\t{int('dog' in s.lower())}\t\t{s}\n"
                                           for source, s in zip(sources, sentences)), encoding="utf-8")
    return folder


def mcc(predicted: list[int], labels: list[int]) -> float:
    """Matthews' correlation by its formula (0 when a row or column of the confusion matrix is empty, as GLUE's)."""
    tp = sum(p == 1 and y == 1 for p, y in zip(predicted, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(predicted, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(predicted, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(predicted, labels))
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def test_validation_batches_flag_the_examples_of_groups_seen_in_training(tmp_path, tiny_model_dir, capsys):
    data_dir = write_cola_with_sources(tmp_path / "data")
    datamodule = TextDataModule(str(tiny_model_dir), data_dir=str(data_dir), group_column="source", batch_size=7)
    datamodule.setup("fit")
    flags = torch.cat([batch[GROUP_SEEN] for batch in datamodule.val_dataloader()]).tolist()
    assert flags == [1] * 10 + [0] * 10  # validation keeps the file's order
    assert datamodule.group_sizes == {"seen": 10, "unseen": 10}
    assert "10 examples of a source seen in training (val_seen_*), 10 of 2 unseen (val_unseen_*: c, d)" in capsys.readouterr().out
    assert GROUP_SEEN not in next(iter(datamodule.train_dataloader()))


def test_a_run_reports_the_best_epochs_metrics_by_group_and_they_are_the_recomputed_ones(tmp_path, tiny_model_dir):
    data_dir = write_cola_with_sources(tmp_path / "data")
    result = run_train(tmp_path, *tiny_train_args(tiny_model_dir, data_dir), "--data.group_column", "source",
                       "--trainer.max_epochs", "2", "--model.learning_rate", "3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "logs/cola/version_0/metrics.json").read_text())
    assert metrics["group_column"] == "source"
    by_group = metrics["best_by_group"]
    assert set(by_group) == {"seen", "unseen"} and by_group["seen"]["examples"] == 10 == by_group["unseen"]["examples"]

    # The best checkpoint's predictions, grouped here by the file's own sources: the values metrics.json must hold.
    best = tmp_path / metrics["best_model_path"]
    model = TextClassifier.load_from_checkpoint(best, map_location="cpu", weights_only=False).eval()
    datamodule = TextDataModule(str(tiny_model_dir), data_dir=str(data_dir), batch_size=8)
    datamodule.setup("fit")
    predicted, labels = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits, _ = model(batch)
            predicted += (logits.softmax(-1)[:, 1] > 0.5).long().tolist()
            labels += batch["labels"].tolist()
    for part, rows in (("seen", range(10)), ("unseen", range(10, 20))):
        p, y = [predicted[i] for i in rows], [labels[i] for i in rows]
        assert by_group[part]["mcc"] == pytest.approx(mcc(p, y), abs=1e-6)
        assert by_group[part]["accuracy"] == pytest.approx(sum(a == b for a, b in zip(p, y)) / len(y), abs=1e-6)
    assert metrics["best_val_mcc"] == pytest.approx(mcc(predicted, labels), abs=1e-6)  # the overall metric stays monitored
    for part in ("seen", "unseen"):  # the last epoch's too, as TensorBoard has them
        assert {f"val_{part}_{name}" for name in ("mcc", "accuracy", "f1")} <= set(metrics["last_epoch_metrics"])
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Best val_mcc"))
    assert lines[at + 1].split() == ["seen", "sources:", "val_mcc", f"{by_group['seen']['mcc']:.4f}", "(10", "examples;",
                                     "accuracy", f"{by_group['seen']['accuracy']:.4f})"]
    assert lines[at + 2].split()[:4] == ["unseen", "sources:", "val_mcc", f"{by_group['unseen']['mcc']:.4f}"]
    events = list((tmp_path / "logs/cola/version_0").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set().union(*(EventAccumulator(str(e)).Reload().Tags()["scalars"] for e in events))
    assert {"val_seen_mcc", "val_unseen_mcc", "val_seen_accuracy", "val_unseen_f1"} <= tags


def test_groups_all_seen_log_the_overall_metrics_only_with_a_note(tmp_path, tiny_model_dir, capsys):
    data_dir = write_cola_with_sources(tmp_path / "data")
    (data_dir / "dev.tsv").write_text((data_dir / "dev.tsv").read_text().replace("c\t", "a\t").replace("d\t", "b\t"))
    datamodule = TextDataModule(str(tiny_model_dir), data_dir=str(data_dir), group_column="source")
    datamodule.setup("fit")
    assert "every validation example's source occurs in the training data: only the overall metrics" in capsys.readouterr().out
    assert datamodule.group_sizes == {} and GROUP_SEEN not in next(iter(datamodule.val_dataloader()))


def write_csv_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2)
    for name, customers in (("train.csv", ["acme", "globex"] * 12), ("dev.csv", ["acme", "initech"] * 5)):
        rows = ["text,label,customer"] + [f"{make_sentence(rng)},{i % 2},{c}" for i, c in enumerate(customers)]
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def test_a_users_column_groups_its_files(tmp_path, tiny_model_dir):
    data_dir = write_csv_task(tmp_path / "data")
    datamodule = TextDataModule(str(tiny_model_dir), task="tickets", data_dir=str(data_dir), text_columns=["text"],
                                group_column="customer")
    datamodule.setup("fit")
    assert datamodule.group_sizes == {"seen": 5, "unseen": 5}
    assert datamodule.splits["validation"][GROUP_SEEN] == [1, 0] * 5


@pytest.mark.parametrize("files, args, message", [
    ("csv", ["--data.task", "tickets", "--data.text_columns", "[text]", "--data.group_column", "site"],
     "train.csv:1: no column 'site' (it has 'text', 'label', 'customer'): --data.group_column names one of them"),
    ("cola", ["--data.group_column", "genre"],
     "train.tsv: GLUE's CoLA files have the columns source, label, star and sentence, no 'genre': use --data.group_column source"),
    ("cola", ["--data.group_column", "label"],
     "--data.group_column must name a column other than the texts and the labels, not 'label'"),
    ("hub", ["--data.group_column", "source"],
     "--data.group_column names a column of your files (--data.data_dir); the Hub's GLUE tasks have none"),
])
def test_a_group_column_that_cannot_work_is_one_line(tmp_path, tiny_model_dir, files, args, message):
    data_dir = write_csv_task(tmp_path / "data") if files == "csv" else write_cola_with_sources(tmp_path / "data")
    base = ["--model.model_name_or_path", str(tiny_model_dir), "--data.batch_size", "8"]
    if files != "hub":
        base += ["--data.data_dir", str(data_dir)]
    result = run_train(tmp_path, *base, *args)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("logs/*/version_*"))  # nothing trained, no run folder left


def test_group_column_is_checked_before_anything_loads():
    with pytest.raises(OptionError, match="the Hub's GLUE tasks have none"):
        TextDataModule("unused", task="cola", group_column="source")
    with pytest.raises(OptionError, match="other than the texts"):
        TextDataModule("unused", task="mine", data_dir="x", text_columns=["review"], group_column="review")
