"""--model.teacher: a student trained on the true labels and a trained checkpoint's softened outputs (issue 38)."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import flip_bytes, run_train, tiny_train_args
from checkpoints import CheckpointError
from data import TEACHER_OUTPUTS, DataError, TextDataModule
from distill import add_teacher_outputs, perturbed, read_unlabelled, teacher_outputs
from model import distillation_loss, logits_and_loss
from test_reliability import train_in_process


@pytest.fixture(scope="module")
def teacher(trained, tmp_path_factory) -> Path:
    """A copy of the `trained` run's best checkpoint (a model of CoLA's labels, as any run of this project leaves),
    in a folder of its own: its cached outputs go beside it."""
    workdir, _ = trained
    best = workdir / json.loads((workdir / "logs/cola/version_0/metrics.json").read_text())["best_model_path"]
    copy = tmp_path_factory.mktemp("teacher") / best.name
    copy.write_bytes(best.read_bytes())
    return copy


def test_the_distillation_loss_is_its_formula():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    teacher_probabilities = [[0.9, 0.1], [0.3, 0.7], [0.2, 0.8]]
    weight, temperature = 0.3, 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(x) for x in row]
        return [e / sum(exps) for e in exps]

    hard = sum(-math.log(softmax(row)[y]) for row, y in zip(logits.tolist(), labels.tolist())) / 3
    soft = 0.0
    for row, probabilities in zip(logits.tolist(), teacher_probabilities):
        teacher = softmax([math.log(p) / temperature for p in probabilities])  # the teacher's softmax at T
        student = softmax([x / temperature for x in row])
        soft += sum(t * (math.log(t) - math.log(s)) for t, s in zip(teacher, student))  # KL(teacher || student)
    expected = (1 - weight) * hard + weight * temperature**2 * soft / 3
    log_probabilities = torch.tensor(teacher_probabilities).log()
    assert distillation_loss(logits, labels, log_probabilities, weight, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(logits, labels, log_probabilities, 0.0, temperature).item() == pytest.approx(hard, rel=1e-6)


def test_training_batches_carry_the_teachers_outputs_and_validation_scores_the_labels(teacher, tiny_model_dir, tiny_data_dir):
    datamodule = TextDataModule(str(tiny_model_dir), data_dir=str(tiny_data_dir), batch_size=4, teacher=str(teacher))
    datamodule.teach = add_teacher_outputs  # as train.py wires it
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch[TEACHER_OUTPUTS].shape == (4, 2) and batch[TEACHER_OUTPUTS].exp().sum(1).allclose(torch.ones(4))
    assert TEACHER_OUTPUTS not in next(iter(datamodule.val_dataloader()))
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    logits, loss = logits_and_loss(model, "cls", batch, (0.5, 2.0))
    assert loss.item() == pytest.approx(distillation_loss(logits, batch["labels"], batch[TEACHER_OUTPUTS], 0.5, 2.0).item())
    assert logits_and_loss(model, "cls", batch)[1].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item())


def test_the_teachers_outputs_are_computed_once_per_teacher_and_data(teacher, tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    import distill

    copy = tmp_path / "teacher.ckpt"
    copy.write_bytes(teacher.read_bytes())
    splits, names = TextDataModule(str(tiny_model_dir), data_dir=str(tiny_data_dir))._labelled_splits()
    texts = [list(splits["train"]["sentence"])]
    first, sha256 = teacher_outputs(str(copy), texts, names)
    assert first.shape == (48, 2) and len(list(tmp_path.glob("teacher.teacher-outputs-*.npz"))) == 1

    def no_teacher_run(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(distill, "Predictor", no_teacher_run)
    cached, cached_sha256 = teacher_outputs(str(copy), texts, names)  # from the cache
    assert (cached == first).all() and cached_sha256 == sha256
    with pytest.raises(AssertionError, match="the teacher ran again"):  # other data: computed anew
        teacher_outputs(str(copy), [texts[0][:10]], names)
    state = torch.load(copy, weights_only=True)
    state["state_dict"]["model.classifier.bias"] += 1.0
    torch.save(state, copy)
    with pytest.raises(AssertionError, match="the teacher ran again"):  # another teacher: computed anew
        teacher_outputs(str(copy), texts, names)


def test_a_cached_teacher_is_checked_as_a_computed_one_and_its_cache_verified(teacher, tmp_path, tiny_model_dir,
                                                                              tiny_data_dir, monkeypatch, capsys):
    """Issue 44: on e28d847 a cache hit returned before the teacher's labels were checked, and cached values changed
    on disk were used as they were."""
    import numpy as np

    import distill

    copy = tmp_path / "teacher.ckpt"
    copy.write_bytes(teacher.read_bytes())
    splits, names = TextDataModule(str(tiny_model_dir), data_dir=str(tiny_data_dir))._labelled_splits()
    texts = [list(splits["train"]["sentence"])]
    first, _ = teacher_outputs(str(copy), texts, names)  # computed, and cached
    with pytest.raises(CheckpointError, match=r"trained on labels \['unacceptable', 'acceptable'\] of 1 text\(s\) an example;"
                                              r" this data has \['no', 'yes'\]"):
        teacher_outputs(str(copy), texts, ["no", "yes"])  # a hit: the same check as a miss

    [cache] = tmp_path.glob("teacher.teacher-outputs-*.npz")
    with np.load(cache) as saved:
        tampered = {name: saved[name] for name in saved.files}
    tampered["outputs"] = np.log(np.full_like(first, 0.5))  # the values changed, the recorded digest kept
    with open(cache, "wb") as f:
        np.savez(f, **tampered)
    computed_again = []
    real_predictor = distill.Predictor
    monkeypatch.setattr(distill, "Predictor", lambda *args: computed_again.append(1) or real_predictor(*args))
    outputs, _ = teacher_outputs(str(copy), texts, names)
    assert computed_again and (outputs == first).all()
    assert "the teacher's cached outputs do not match their recorded sha256; computing them again" in capsys.readouterr().out
    cache.write_bytes(b"not an npz")
    outputs, _ = teacher_outputs(str(copy), texts, names)
    assert len(computed_again) == 2 and (outputs == first).all()


def test_a_student_resumes_bit_identically_records_its_teacher_and_exports(teacher, tmp_path, tiny_model_dir, tiny_data_dir):
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + [
        "--trainer.max_epochs", "2", "--model.teacher", str(teacher), "--save_last_every_minutes", "0"]
    for name in ("undisturbed", "resumed"):
        (tmp_path / name).mkdir()
    assert train_in_process(tmp_path / "undisturbed", args).returncode == 0
    stopped = train_in_process(tmp_path / "resumed", args, sigint_before_step=8)  # Ctrl-C in the second epoch
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    last = "logs/cola/version_0/checkpoints/last.ckpt"
    resumed = train_in_process(tmp_path / "resumed", [*args, "--ckpt_path", last])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ours, reference = (torch.load(tmp_path / name / last, weights_only=True) for name in ("resumed", "undisturbed"))
    assert ours["global_step"] == reference["global_step"] == 12
    assert all(torch.equal(ours["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"])
    assert ours["hyper_parameters"]["teacher"] == str(teacher)
    from export import file_sha256

    assert ours["TextDataModule"]["teacher_sha256"] == file_sha256(teacher)
    best = json.loads((tmp_path / "resumed/logs/cola/version_0/metrics.json").read_text())["best_model_path"]
    assert (tmp_path / "resumed" / best).with_suffix(".onnx").is_file()
    # Another teacher, or none, for the same run: refused in one line.
    for other in (["--model.teacher", str(tmp_path / "undisturbed" / last)], ["--model.teacher", "null"]):
        refused = train_in_process(tmp_path / "resumed", [*args, *other, "--trainer.max_epochs", "3", "--ckpt_path", last])
        assert refused.returncode == 1 and "--model.teacher" in refused.stderr.strip().splitlines()[-1]


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[-1]


@pytest.mark.slow  # ~20-35 s: the fast tier keeps the quicker tests of the same code
# A train.py process for each bad teacher (missing, damaged, another task's).
def test_a_missing_damaged_or_other_task_teacher_is_one_line(teacher, tmp_path, tiny_model_dir, tiny_data_dir):
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "1"]
    assert "no.ckpt: --model.teacher not found" in one_line_error(run_train(tmp_path, *args, "--model.teacher", "no.ckpt"))
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(teacher.read_bytes())
    flip_bytes(damaged, at=len(teacher.read_bytes()) // 2)
    assert "damaged.ckpt" in one_line_error(run_train(tmp_path, *args, "--model.teacher", str(damaged)))
    other = tmp_path / "other.ckpt"
    state = torch.load(teacher, weights_only=True)
    state["hf_config"]["id2label"] = {"0": "negative", "1": "positive"}
    torch.save(state, other)
    message = one_line_error(run_train(tmp_path, *args, "--model.teacher", str(other)))
    assert "was trained on labels ['negative', 'positive']" in message and "use a teacher of this task" in message
    assert not (tmp_path / "logs/cola").exists() or not any((tmp_path / "logs/cola").iterdir())  # nothing trained


def test_perturbed_copies_drop_or_swap_a_word_the_same_way_in_every_run():
    text = "the quick brown fox jumps over the lazy dog"
    copies = [perturbed(text, copy) for copy in range(40)]
    assert copies == [perturbed(text, copy) for copy in range(40)]  # seeded by the text and the copy number alone
    kinds = {change.split()[-1].strip("()") if "dropped" in change else "swapped" for _, change in copies}
    assert "swapped" in kinds and len(kinds) > 2  # both kinds, and several words dropped
    for new, change in copies:
        words, original = new.split(), text.split()
        if "dropped" in change:
            i = int(change.split()[1]) - 1
            assert words == original[:i] + original[i + 1:]
        else:
            i = int(change.split()[1]) - 1
            assert words[i:i + 2] == original[i:i + 2][::-1] and words[:i] + words[i + 2:] == original[:i] + original[i + 2:]
    assert perturbed("Go.", 0) is None  # a single word has no neighbour and would become empty


def test_an_unlabelled_file_is_one_text_or_pair_a_line_and_a_bad_line_is_named(tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\ufeffA man sleeps.\tSomeone rests.\n\nno\tpair\n")  # a BOM (Notepad's) and a blank line are skipped
    assert list(read_unlabelled(pairs, 2)) == [(("A man sleeps.", "Someone rests."), "pairs.txt:1"), (("no", "pair"), "pairs.txt:3")]
    assert next(read_unlabelled(pairs, 1))[0] == ("A man sleeps.\tSomeone rests.",)  # one text: the whole line
    bad = tmp_path / "bad.txt"
    bad.write_text("A man sleeps.\tSomeone rests.\nonly one\n")
    with pytest.raises(DataError, match=r"bad.txt:2: expected two texts separated by a tab"):
        list(read_unlabelled(bad, 2))
    with pytest.raises(DataError, match=r"none.txt: cannot read"):
        list(read_unlabelled(tmp_path / "none.txt", 1))


@pytest.mark.slow  # ~20-35 s: the fast tier keeps the quicker tests of the same code
# The teacher labels unlabelled and perturbed examples, then a student trains on them.
def test_extra_examples_are_labelled_by_the_teacher_and_recorded_in_the_run(teacher, tmp_path, tiny_model_dir, tiny_data_dir):
    unlabelled = tmp_path / "more.txt"
    unlabelled.write_text("The dog sat on the mat.\nThe cat sat on the mat.\n")
    datamodule = TextDataModule(str(tiny_model_dir), data_dir=str(tiny_data_dir), teacher=str(teacher), perturbed_copies=2,
                                unlabelled_file=str(unlabelled))
    datamodule.teach = add_teacher_outputs
    datamodule.setup()
    train = datamodule.splits["train"]
    extra = train.select(range(48, len(train)))
    assert 48 + 2 * 40 < len(train) <= 48 + 2 * 48 + 2  # two copies of each example but a few (a swap of equal words)
    outputs = torch.tensor(extra[TEACHER_OUTPUTS])
    assert torch.equal(torch.tensor(extra["labels"]), outputs.argmax(1))  # the teacher's most probable label
    args = tiny_train_args(tiny_model_dir, tiny_data_dir) + ["--trainer.max_epochs", "1", "--model.teacher", str(teacher),
                                                           "--data.perturbed_copies", "2", "--data.unlabelled_file", str(unlabelled)]
    result = run_train(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    record = (tmp_path / "logs/cola/version_0/extra_examples.tsv").read_text().splitlines()
    assert record[0].split("\t") == ["sentence", "teacher_label", "p_unacceptable", "p_acceptable", "source"]
    assert len(record) == 1 + len(extra)
    assert record[-1].startswith("The cat sat on the mat.\t") and record[-1].endswith("\tmore.txt:2")
    assert "training example 1, copy 1: " in record[1]
    (tmp_path / "empty.txt").write_text("\n")
    result = run_train(tmp_path, *args[:-1], str(tmp_path / "empty.txt"))
    assert one_line_error(result).endswith("empty.txt: no texts (--data.unlabelled_file: one a line)")
    # Without a teacher, nothing would label them: one line.
    result = run_train(tmp_path, *tiny_train_args(tiny_model_dir, tiny_data_dir), "--data.perturbed_copies", "1")
    assert "give one with --model.teacher" in one_line_error(result)


def test_a_checkpoint_older_than_the_teacher_option_resumes_only_without_one():
    from checkpoints import CheckpointError, check_same_settings

    saved = {"hyper_parameters": {"pooling": "cls"}, "datamodule_hyper_parameters": {"batch_size": 8}}
    check_same_settings("last.ckpt", saved, {"model": {"pooling": "cls", "teacher": None}, "data": {"batch_size": 8}})
    with pytest.raises(CheckpointError, match="trained with --model.teacher None, not big.ckpt"):
        check_same_settings("last.ckpt", saved, {"model": {"pooling": "cls", "teacher": "big.ckpt"}, "data": {"batch_size": 8}})


def test_an_endless_unlabelled_file_is_one_line_under_a_memory_limit(teacher, tmp_path, tiny_model_dir, tiny_data_dir):
    """Issue 44: on e28d847 --data.unlabelled_file /dev/zero took 3 GB in under 20 s, and so did a 20 MB line."""
    from test_adversarial import run_under_memory_limit

    args = [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--model.teacher", str(teacher), "--data.unlabelled_file", "/dev/zero"]
    result = run_under_memory_limit("train.py", args, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == ("error: /dev/zero:1: a line over 65,536 bytes is no example: is it the"
                                                      " right file? (--data.unlabelled_file)")
