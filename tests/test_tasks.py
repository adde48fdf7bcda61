"""Tasks other than CoLA, on tiny local data: a single-text task with word labels (CSV, named columns), a pair
task (RTE's GLUE layout), a 3-class task (JSON Lines). Each trains, resumes, exports, answers in inference.py
and serve.py with its label names; its bad inputs are one line each."""

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import make_sentence, run_script, run_train
from data import DataError, OptionError, TextDataModule
from readers import read_table

# name -> (task option, extra train.py options, files writer, label names as the model should have them)
WORD_LABELS = ("negative", "positive")  # a user's words, sorted: label 0 is "negative"
PAIR_LABELS = ("entailment", "not_entailment")  # RTE's, from data.py's task table
TOPICS = ("cat", "dog", "other")  # the 3-class task's, from its training file


def write_reviews(folder: Path, rng: random.Random) -> None:
    """CSV with a header and quoted fields, text in column "review", labels as words in "sentiment"."""
    for name, n in (("train.csv", 48), ("dev.csv", 24)):
        lines = ["id,review,sentiment"]
        for i in range(n):
            sentence = make_sentence(rng)
            lines.append(f'{i},"{sentence[:-1]}, ""quoted"".",{"positive" if "dog" in sentence.lower() else "negative"}')
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_pairs(folder: Path, rng: random.Random) -> None:
    """RTE's GLUE layout: index, sentence1, sentence2, label (as words)."""
    for name, n in (("train.tsv", 48), ("dev.tsv", 24)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            a, b = make_sentence(rng), make_sentence(rng)
            same = ("dog" in a.lower()) == ("dog" in b.lower())
            lines.append(f"{i}\t{a}\t{b}\t{PAIR_LABELS[0] if same else PAIR_LABELS[1]}")
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def topic(sentence: str) -> str:
    words = sentence.lower()
    return "dog" if "dog" in words else "cat" if "cat" in words else "other"


def write_topics(folder: Path, rng: random.Random) -> None:
    """JSON Lines, one object a line: {"text", "topic"}."""
    for name, n in (("train.jsonl", 60), ("dev.jsonl", 30)):
        rows = [{"text": s, "topic": topic(s)} for s in (make_sentence(rng) for _ in range(n))]
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


TASKS = {
    "reviews": (["--data.task", "reviews", "--data.text_columns", "[review]", "--data.label_column", "sentiment"], write_reviews, WORD_LABELS),
    "rte": (["--data.task", "rte"], write_pairs, PAIR_LABELS),
    "topics": (["--data.task", "topics", "--data.text_columns", "[text]", "--data.label_column", "topic"], write_topics, TOPICS),
}


def data_dir_of(tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(f"data-{name}")
    TASKS[name][1](folder, random.Random(0))
    return folder


def task_args(name: str, model_dir: Path, data_dir: Path) -> list[str]:
    return [*TASKS[name][0], "--model.model_name_or_path", str(model_dir), "--data.data_dir", str(data_dir),
            "--data.batch_size", "8", "--model.learning_rate", "1e-3", "--trainer.log_every_n_steps", "1"]


@pytest.fixture(scope="module", params=list(TASKS))
def trained_task(request, tmp_path_factory, tiny_model_dir):
    """(name, its working folder, its data folder, the run folder) after a 2-epoch run of that task."""
    name = request.param
    data_dir = data_dir_of(tmp_path_factory, name)
    workdir = tmp_path_factory.mktemp(f"run-{name}")
    result = run_train(workdir, *task_args(name, tiny_model_dir, data_dir), "--trainer.max_epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return name, workdir, data_dir, workdir / "logs" / name / "version_0"


def test_a_task_trains_in_its_own_folder_scored_by_its_metric(trained_task):
    name, workdir, _, run_dir = trained_task
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["monitor"] == "val_accuracy" and 0 <= metrics["best_val_accuracy"] <= 1  # not CoLA's MCC
    best = workdir / metrics["best_model_path"]
    assert best.name.startswith("best-epoch=") and "-val_accuracy=" in best.name and best.with_suffix(".onnx").is_file()
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    labels = TASKS[name][2]
    assert [checkpoint["hf_config"]["id2label"][i] for i in range(len(labels))] == list(labels)
    assert checkpoint["hf_config"]["finetuning_task"] == name
    assert len(checkpoint["hf_config"]["text_names"]) == (2 if name == "rte" else 1)
    assert checkpoint["hyper_parameters"]["label_names"] == list(labels)


@pytest.mark.slow  # two more runs of each task: CI
def test_a_task_resumes_from_its_last_checkpoint(trained_task, tiny_model_dir):
    name, workdir, data_dir, run_dir = trained_task
    args = task_args(name, tiny_model_dir, data_dir)
    result = run_train(workdir, *args, "--trainer.max_epochs", "3", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3  # the third epoch, in the same folder
    other = run_train(workdir, *args, "--data.metric", "f1", "--trainer.max_epochs", "4", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert other.returncode == 1 and other.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--data.metric" in other.stderr.strip().splitlines()[-1]


def inference(workdir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run_script("inference.py", list(args), workdir, stdin=stdin, timeout=300)


def example(name: str) -> str:
    return "The dog sat.\tA dog ran." if name == "rte" else "The dog sat on the mat."


@pytest.mark.slow  # nine inference.py processes and a transformers pipeline: CI
def test_inference_answers_with_the_tasks_labels_from_each_backend_and_export(trained_task, tmp_path):
    name, workdir, _, run_dir = trained_task
    labels = TASKS[name][2]
    for backend in ("onnx", "onnx-int8", "torch"):
        result = inference(workdir, "--checkpoint", str(run_dir), "--backend", backend, "--json", example(name))
        assert result.returncode == 0, result.stderr[-2000:]
        answer = json.loads(result.stdout)
        assert answer["label"] in labels and list(answer["probabilities"]) == list(labels)
        assert answer == {**answer, **({"pair": ["The dog sat.", "A dog ran."]} if name == "rte" else {"sentence": example(name)})}
    text = inference(workdir, "--checkpoint", str(run_dir), "-", stdin=example(name) + "\n")
    label, probability, shown = text.stdout.rstrip("\n").split(None, 2)
    assert label in labels and shown == example(name) and 0 <= float(probability) <= 1
    exported = tmp_path / "hf"
    assert inference(workdir, "--checkpoint", str(run_dir), "--export", str(exported)).returncode == 0
    config = json.loads((exported / "config.json").read_text())
    assert list(config["id2label"].values()) == list(labels) and config["finetuning_task"] == name
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(exported))
    given = {"text": "The dog sat.", "text_pair": "A dog ran."} if name == "rte" else example(name)
    answer = classify(given)
    assert (answer[0] if isinstance(answer, list) else answer)["label"] in labels


def test_serve_answers_with_the_tasks_labels_and_says_them(trained_task):
    from inference import Predictor
    from serve import Settings, create_app

    name, _, _, run_dir = trained_task
    labels = TASKS[name][2]
    best = Path(json.loads((run_dir / "metrics.json").read_text())["best_model_path"])
    predictor = Predictor(run_dir / "checkpoints" / best.name)
    with TestClient(create_app(predictor, Settings(checkpoint=str(run_dir / "checkpoints" / best.name)))) as client:
        health = client.get("/health").json()
        assert (health["task"], health["labels"], health["metric"]) == (name, list(labels), "val_accuracy")
        assert len(health["texts"]) == (2 if name == "rte" else 1)
        right, wrong = ({"pairs": [["The dog sat.", "A dog ran."]]}, {"sentences": ["The dog sat."]})
        if name != "rte":
            right, wrong = wrong, right
        answer = client.post("/predict", json=right)
        assert answer.status_code == 200 and answer.json()[0]["label"] in labels
        refused = client.post("/predict", json=wrong)
        expected = f'(expected {{"{"pairs" if name == "rte" else "sentences"}": ['
        assert refused.status_code == 422 and expected in refused.json()["detail"], refused.json()
        metrics = client.get("/metrics").text
        assert f'cola_predictions_total{{label="{answer.json()[0]["label"]}"}} 1.0' in metrics
        assert f'task="{name}"' in metrics
        schemas = client.get("/openapi.json").json()["components"]["schemas"]  # the body this model takes, alone
        assert ("PairsRequest" in schemas) == (name == "rte") and ("PredictRequest" in schemas) == (name != "rte")


def test_a_pair_line_without_its_tab_is_a_warning_and_the_rest_is_answered(trained_task):
    name, workdir, _, run_dir = trained_task
    if name != "rte":
        pytest.skip("pairs only")
    result = inference(workdir, "--checkpoint", str(run_dir), "-", stdin="The dog sat.\tA cat ran.\nno tab here\n")
    assert result.returncode == 0 and result.stdout.count("\n") == 1
    assert "warning: input 2 skipped: empty text (a pair is two texts" in result.stderr


def test_a_pair_line_with_two_tabs_is_a_warning_not_a_guess(trained_task):
    """Issue 44: on e28d847 "first<TAB>second<TAB>third" was classified as ("first", "second<TAB>third") without a word."""
    name, workdir, _, run_dir = trained_task
    if name != "rte":
        pytest.skip("pairs only")
    result = inference(workdir, "--checkpoint", str(run_dir), "-", stdin="The dog sat.\tA cat ran.\nfirst\tsecond\tthird\n")
    assert result.returncode == 0 and result.stdout.count("\n") == 1 and "third" not in result.stdout
    assert "warning: input 2 skipped: 2 tabs (a pair is two texts" in result.stderr


def test_glue_test_writes_the_tasks_submission_file(trained_task, tmp_path):
    name, workdir, _, run_dir = trained_task
    test_file = tmp_path / "test.tsv"
    if name == "rte":
        test_file.write_text("index\tsentence1\tsentence2\n0\tThe dog sat.\tA cat ran.\n1\tA boy ran.\tThe dog sat.\n")
        result = inference(workdir, "--checkpoint", str(run_dir), "--glue_test", str(test_file))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == ["0", "1"]
        assert all(line.split("\t")[1] in PAIR_LABELS for line in lines[1:])  # GLUE reads RTE's labels as words
        assert "RTE.tsv" in result.stderr
    else:
        test_file.write_text("index\tsentence\n0\tThe dog sat.\n")
        result = inference(workdir, "--checkpoint", str(run_dir), "--glue_test", str(test_file))
        assert result.returncode == 1 and result.stderr.strip() == f"error: --glue_test: this model was trained on {name!r}, not a GLUE task" \
            " (cola, sst2, mrpc, qqp, qnli, rte, wnli, mnli)"


# Bad input: one line each, naming the file and line, before any training.
def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


GOOD_TRAIN = "review,sentiment\nA dog sat.,positive\nA cat sat.,negative\n"


@pytest.mark.parametrize("train, dev, options, message", [
    (GOOD_TRAIN, "review,sentiment\nA dog ran.,neutral\n", {}, "dev.csv:2: label 'neutral' is not one of the training file's labels (negative, positive)"),
    ("text,sentiment\nA dog sat.,positive\nA cat.,negative\n", GOOD_TRAIN, {}, "train.csv:1: no column 'review' (it has 'text', 'sentiment')"),
    ("review,sentiment\nA dog sat.,positive\nA cat sat.,positive\n", GOOD_TRAIN, {}, "train.csv: every example has label 'positive'; a classifier needs examples of two labels or more"),
    (GOOD_TRAIN + "A bird sat.\n", GOOD_TRAIN, {}, "train.csv:4: 1 fields, but the header (line 1) names 2"),
    (GOOD_TRAIN + ",negative\n", GOOD_TRAIN, {}, "train.csv:4: empty 'review'"),
    (GOOD_TRAIN, GOOD_TRAIN, {"label_column": "stars"}, "train.csv:1: no column 'stars'"),
    ("review,sentiment,review\nA dog sat.,positive,x\nA cat sat.,negative,y\n", GOOD_TRAIN, {},
     "train.csv:1: the header names column 'review' twice: name each column once"),  # issue 44: the last one was used
    ("review,sentiment\n" + "".join(f"A dog.,{n}\n" for n in range(1001)), GOOD_TRAIN, {},
     "train.csv: 1,001 distinct labels (at most 1,000): is --data.label_column sentiment the column of labels?"),
])
def test_bad_files_are_one_data_error_naming_file_and_line(tmp_path, tiny_model_dir, train, dev, options, message):
    write(tmp_path, "train.csv", train)
    write(tmp_path, "dev.csv", dev)
    datamodule = TextDataModule(str(tiny_model_dir), task="reviews", data_dir=str(tmp_path), text_columns=["review"],
                                **{"label_column": "sentiment", **options})
    with pytest.raises(DataError) as error:
        datamodule.label_names
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_byte_deep_in_a_csv_file_is_reported_at_its_line(tmp_path, tiny_model_dir):
    """Issue 44: on e28d847 a bad UTF-8 byte on line 40 of a CSV file was reported at line 2 (the csv module decodes
    in blocks); a duplicate key of a JSON Lines object silently kept the last one."""
    (tmp_path / "train.csv").write_bytes(GOOD_TRAIN.encode() + b"A dog ran.,positive\n" * 36 + b"A d\xffg.,negative\n")
    write(tmp_path, "dev.csv", GOOD_TRAIN)
    datamodule = TextDataModule(str(tiny_model_dir), task="reviews", data_dir=str(tmp_path), text_columns=["review"],
                                label_column="sentiment")
    with pytest.raises(DataError, match=r"train.csv:40: not valid UTF-8"):
        datamodule.label_names
    (tmp_path / "rows.jsonl").write_text('{"text": "A.", "label": 1}\n{"text": "B.", "label": 0, "text": "C."}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: key 'text' twice in one object"):
        list(read_table(tmp_path / "rows.jsonl", [("text",)], ["label"], ("sentence",)))


def test_glue_files_take_label_words_or_numbers_and_refuse_others(tmp_path, tiny_model_dir):
    write(tmp_path, "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tC.\tD.\t1\n")
    write(tmp_path, "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tcontradiction\n")
    datamodule = TextDataModule(str(tiny_model_dir), task="rte", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"dev.tsv:2: label 'contradiction' is not one of rte's labels \(entailment, not_entailment\)"):
        datamodule.label_names
    write(tmp_path, "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n")
    datamodule = TextDataModule(str(tiny_model_dir), task="rte", data_dir=str(tmp_path))
    datamodule.setup()
    assert datamodule.label_names == list(PAIR_LABELS)
    assert datamodule.splits["train"]["labels"] == [0, 1] and datamodule.splits["validation"]["labels"] == [1]
    # Pairs are tokenized as pairs: [CLS] a [SEP] b [SEP], the second text's token types 1.
    assert datamodule.splits["train"][0]["token_type_ids"].count(1) == 3


@pytest.mark.parametrize("options, message", [
    ({"task": "sst-2"}, "--data.task 'sst-2' is not a GLUE task (cola, sst2, mrpc, qqp, qnli, rte, wnli, mnli)"),
    ({"task": "../x", "data_dir": "d"}, "--data.task must be a name of letters, digits and _ . -"),
    ({"task": "x", "data_dir": "d", "text_columns": ["a", "b", "c"]}, "--data.text_columns names one column (single texts) or two (pairs)"),
    ({"task": "sst2", "text_columns": ["a"]}, "--data.text_columns and --data.label_column choose columns of your files"),
    ({"metric": "auc"}, "--data.metric must be one of mcc, accuracy, f1"),
    # Issue 44: tracebacks on e28d847 (the project's own columns are named line, label, labels...)
    ({"perturbed_copies": 1000000, "teacher": "t.ckpt"}, "--data.perturbed_copies must be from 0 to 20, not 1000000"),  # issue 44: 4 GB
    ({"task": "x", "data_dir": "d", "text_columns": ["line"]}, "--data.text_columns: 'line' names one of the columns this project makes of yours"),
    ({"task": "x", "data_dir": "d", "text_columns": ["labels"]}, "--data.text_columns: 'labels' names one of the columns this project makes of yours"),
    ({"task": "x", "data_dir": "d", "text_columns": ["stars"], "label_column": "stars"},
     "--data.text_columns and --data.label_column both name 'stars': the texts and the labels are two columns"),
])
def test_bad_task_options_are_one_line(options, message):
    with pytest.raises(OptionError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        TextDataModule(**options)


def test_tables_keep_quotes_numbers_and_carriage_returns(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"He said ""hi"", then left.",1\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_bytes(b"sentence\tlabel\nhide new secretions\r\t0\n")  # GLUE's SST-2 has such \r
    (tmp_path / "a.jsonl").write_text('{"text": "A \\"b\\".", "label": 2}\n\n{"text": "C.", "label": true}\n', encoding="utf-8")
    assert list(read_table(tmp_path / "a.csv", [("text",)], ["label"], ("sentence",))) == [
        {"line": 2, "sentence": 'He said "hi", then left.', "label": "1"}]
    assert list(read_table(tmp_path / "a.tsv", [("sentence",)], ["label"], ("sentence",))) == [
        {"line": 2, "sentence": "hide new secretions\r", "label": "0"}]
    assert list(read_table(tmp_path / "a.jsonl", [("text",)], ["label"], ("sentence",))) == [
        {"line": 1, "sentence": 'A "b".', "label": "2"}, {"line": 3, "sentence": "C.", "label": "true"}]
    (tmp_path / "b.jsonl").write_text('{"text": "A."}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b.jsonl:1: no column 'label' \(it has 'text'\)"):
        list(read_table(tmp_path / "b.jsonl", [("text",)], ["label"], ("sentence",)))


def test_labels_of_a_users_task_are_its_distinct_values_numbers_in_number_order(tmp_path, tiny_model_dir):
    write(tmp_path, "train.tsv", "sentence\tstars\n" + "".join(f"A dog {n}.\t{n}\n" for n in (10, 2, 1, 2)))
    write(tmp_path, "dev.tsv", "sentence\tstars\nA cat.\t10\n")
    datamodule = TextDataModule(str(tiny_model_dir), task="stars", data_dir=str(tmp_path), label_column="stars")
    assert datamodule.label_names == ["1", "2", "10"]


def test_two_files_by_path_instead_of_a_folder(tmp_path, tiny_model_dir):
    write(tmp_path, "reviews.csv", GOOD_TRAIN)
    write(tmp_path, "held_out.csv", "review,sentiment\nA dog ran.,positive\n")
    datamodule = TextDataModule(str(tiny_model_dir), task="reviews", train_file=str(tmp_path / "reviews.csv"),
                                validation_file=str(tmp_path / "held_out.csv"), text_columns=["review"], label_column="sentiment")
    datamodule.setup()
    assert datamodule.label_names == list(WORD_LABELS) and datamodule.splits["validation"]["labels"] == [1]
    with pytest.raises(OptionError, match="give --data.train_file and --data.validation_file together"):
        TextDataModule(task="reviews", train_file=str(tmp_path / "reviews.csv"))
    missing = TextDataModule(task="reviews", train_file=str(tmp_path / "reviews.csv"), validation_file=str(tmp_path / "dev.txt"),
                             text_columns=["review"], label_column="sentiment")
    with pytest.raises(DataError, match=r"dev.txt: --data.validation_file takes a .tsv, .csv or .jsonl file"):
        missing.label_names
