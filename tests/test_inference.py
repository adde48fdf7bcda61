import json
import os
import pickle
import random
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from tokenizers import Tokenizer
from transformers import BertConfig, PreTrainedTokenizerFast

from conftest import REPO, make_sentence
from checkpoints import CheckpointError
from inference import ColaPredictor, InputError, export_hf, find_best_checkpoint

SENTENCES = ["The dog sat on the mat.", "Mat the on sat dog the.", "A big cat ran quickly under the bench."]


def run_inference(workdir, *args, stdin=None):
    return subprocess.run(
        [sys.executable, str(REPO / "inference.py"), *args],
        cwd=workdir, input=stdin, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def best_checkpoint(trained):
    workdir, _ = trained
    return workdir / json.loads((workdir / "logs/cola/version_0/metrics.json").read_text())["best_model_path"]


@pytest.fixture(scope="module")
def predictor(best_checkpoint):
    return ColaPredictor(best_checkpoint)


def test_first_inference_after_training_needs_no_export(trained, tmp_path):
    workdir, train_result = trained
    exported = train_result.stdout.split("Exported for inference.py in ")[1].split(": ", 1)[1].splitlines()[0]
    assert (workdir / exported).is_file() and exported.endswith(".onnx")
    shutil.copytree(workdir / "logs", tmp_path / "logs")  # as left by train.py, whatever later tests do
    result = run_inference(tmp_path, *SENTENCES)
    assert result.returncode == 0 and result.stderr == ""
    assert len(result.stdout.splitlines()) == len(SENTENCES)


def test_an_export_on_first_use_prints_one_line_of_progress_and_no_library_warnings(trained, tmp_path):
    workdir, _ = trained
    shutil.copytree(workdir / "logs", tmp_path / "logs")
    for onnx_file in (tmp_path / "logs").rglob("*.onnx"):
        onnx_file.unlink()
    result = run_inference(tmp_path, SENTENCES[0])
    assert result.returncode == 0
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("Exporting "), result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_predict_returns_one_result_per_sentence_in_order(predictor):
    results = predictor.predict(SENTENCES + [""], batch_size=2)
    assert [r["sentence"] for r in results] == SENTENCES + [""]
    assert results[-1] == {"sentence": "", "error": "empty sentence"}
    for result in results[:-1]:
        assert result["label"] in ("acceptable", "unacceptable")
        assert set(result["probabilities"]) == {"acceptable", "unacceptable"}
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["probabilities"][result["label"]] >= 0.5


def test_batching_and_padding_do_not_change_probabilities(predictor):
    batched = predictor.predict(SENTENCES, batch_size=3)
    one_by_one = [predictor.predict([s])[0] for s in SENTENCES]
    for a, b in zip(batched, one_by_one):
        assert a["probabilities"]["acceptable"] == pytest.approx(b["probabilities"]["acceptable"], abs=1e-5)


def test_matches_the_trained_lightning_module(best_checkpoint, predictor, tiny_data_dir):
    from model import ColaModel

    module = ColaModel.load_from_checkpoint(best_checkpoint, map_location="cpu", weights_only=True).eval()
    encoded = module.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = module.model(**encoded).logits.softmax(-1)[:, 1]
    got = torch.tensor([r["probabilities"]["acceptable"] for r in predictor.predict(SENTENCES)])
    assert torch.allclose(got, expected, atol=1e-5)


def test_onnx_export_is_cached_and_matches_pytorch(best_checkpoint, predictor, tmp_path):
    onnx_file = best_checkpoint.with_suffix(".onnx")
    built_at = onnx_file.stat().st_mtime_ns
    onnx_results = ColaPredictor(best_checkpoint).predict(SENTENCES)
    assert onnx_file.stat().st_mtime_ns == built_at  # reused, not rebuilt
    torch_results = ColaPredictor(best_checkpoint, backend="torch").predict(SENTENCES)
    for a, b in zip(onnx_results, torch_results):
        assert a["label"] == b["label"]
        assert a["probabilities"]["acceptable"] == pytest.approx(b["probabilities"]["acceptable"], abs=1e-4)
    # A checkpoint newer than its export (the run went on) gets a fresh export.
    copy = tmp_path / best_checkpoint.name
    shutil.copy(onnx_file, copy.with_suffix(".onnx"))
    shutil.copy(best_checkpoint, copy)
    os.utime(copy.with_suffix(".onnx"), ns=(built_at - 10**9, built_at - 10**9))
    ColaPredictor(copy)
    assert copy.with_suffix(".onnx").stat().st_mtime > copy.stat().st_mtime


def test_int8_backend_is_cached_and_serves_the_cli(best_checkpoint, trained, tmp_path):
    int8_file = best_checkpoint.with_suffix(".int8.onnx")
    int8_results = ColaPredictor(best_checkpoint, backend="onnx-int8").predict(SENTENCES)
    built_at = int8_file.stat().st_mtime_ns
    assert ColaPredictor(best_checkpoint, backend="onnx-int8").predict(SENTENCES) == int8_results
    assert int8_file.stat().st_mtime_ns == built_at  # reused, not rebuilt
    for result in int8_results:
        assert result["label"] in ("acceptable", "unacceptable")
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    cli = run_inference(trained[0], "--backend", "onnx-int8", "--json", SENTENCES[0])
    # Not int8_results[0]: activations are quantized per call, so the rest of a batch shifts the result a little.
    assert json.loads(cli.stdout) == ColaPredictor(best_checkpoint, backend="onnx-int8").predict(SENTENCES[:1])[0]
    # A checkpoint newer than its int8 copy gets a fresh one, from the (still fresh) fp32 export.
    copy = tmp_path / best_checkpoint.name
    shutil.copy(best_checkpoint, copy)
    shutil.copy(best_checkpoint.with_suffix(".onnx"), copy.with_suffix(".onnx"))
    shutil.copy(int8_file, copy.with_suffix(".int8.onnx"))
    os.utime(copy.with_suffix(".int8.onnx"), ns=(built_at - 10**9, built_at - 10**9))
    fp32_built_at = copy.with_suffix(".onnx").stat().st_mtime_ns
    ColaPredictor(copy, backend="onnx-int8")
    assert copy.with_suffix(".int8.onnx").stat().st_mtime > copy.stat().st_mtime
    assert copy.with_suffix(".onnx").stat().st_mtime_ns == fp32_built_at


@pytest.fixture(scope="module")
def input_sensitive_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny BERT with large random weights, as a checkpoint of this project. The briefly trained one
    gives every sentence the same probability to 4 decimals, too flat to show whether int8 follows fp32."""
    from transformers import BertConfig, BertForSequenceClassification

    labels = {0: "unacceptable", 1: "acceptable"}
    config = BertConfig.from_pretrained(tiny_model_dir, initializer_range=0.2, id2label=labels)
    torch.manual_seed(0)
    weights = BertForSequenceClassification(config).state_dict()
    path = tmp_path_factory.mktemp("sensitive") / "random.ckpt"
    torch.save({
        "hf_config": config.to_dict(),
        "tokenizer_files": {f.name: f.read_text() for f in tiny_model_dir.glob("tokenizer*.json")},
        "state_dict": {f"model.{name}": tensor for name, tensor in weights.items()},
    }, path)
    return path


def test_int8_follows_fp32_onnx(input_sensitive_checkpoint):
    rng = random.Random(1)
    sentences = [make_sentence(rng) for _ in range(32)]
    fp32, int8 = (
        [r["probabilities"]["acceptable"] for r in ColaPredictor(input_sensitive_checkpoint, backend).predict(sentences)]
        for backend in ("onnx", "onnx-int8")
    )
    int8_graph = onnx.load(input_sensitive_checkpoint.with_suffix(".int8.onnx")).graph
    assert "MatMulInteger" in {node.op_type for node in int8_graph.node}
    assert max(fp32) - min(fp32) > 0.3  # the sentences get clearly different probabilities...
    errors = [abs(a - b) for a, b in zip(int8, fp32)]
    assert 0 < max(errors) < 0.03  # ...which int8 reproduces closely, though not exactly
    assert sum(errors) / len(errors) < 0.01


def test_unknown_backend_is_one_line(best_checkpoint):
    with pytest.raises(InputError, match="backend must be one of onnx, onnx-int8, torch, not 'int8'"):
        ColaPredictor(best_checkpoint, backend="int8")

def test_cli_arguments_file_and_stdin_agree(trained, tmp_path):
    workdir, _ = trained
    from_args = run_inference(workdir, *SENTENCES)
    assert from_args.returncode == 0, from_args.stderr
    lines = from_args.stdout.splitlines()
    assert len(lines) == 3
    for line, sentence in zip(lines, SENTENCES):
        label, probability, text = line.split(maxsplit=2)
        assert label in ("acceptable", "unacceptable") and 0.5 <= float(probability) <= 1 and text == sentence
    assert len({line.index(sentence) for line, sentence in zip(lines, SENTENCES)}) == 1  # sentences aligned
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    assert run_inference(workdir, "--file", str(tmp_path / "in.txt")).stdout == from_args.stdout
    assert run_inference(workdir, "-", stdin="\n".join(SENTENCES)).stdout == from_args.stdout


def test_cli_json_keeps_one_line_per_input_line(trained, tmp_path):
    workdir, _ = trained
    (tmp_path / "in.txt").write_text(f"{SENTENCES[0]}\n   \n{SENTENCES[1]}\n")
    result = run_inference(workdir, "--json", "--file", str(tmp_path / "in.txt"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["sentence"] for r in rows] == [SENTENCES[0], "   ", SENTENCES[1]]
    assert rows[1] == {"sentence": "   ", "error": "empty sentence"}
    assert set(rows[0]) == {"sentence", "label", "probabilities"}
    text = run_inference(workdir, "--file", str(tmp_path / "in.txt"))
    assert len(text.stdout.splitlines()) == 2 and "input 2 skipped: empty sentence" in text.stderr


def test_long_sentences_are_truncated_with_a_warning(predictor, capsys):
    long_sentence = " ".join(["the dog sat"] * 100)
    result = predictor.predict([long_sentence, SENTENCES[0]])
    assert "label" in result[0]
    assert predictor.max_length == 64  # the tiny model's position embeddings, below the trained max_length=128
    assert "1 sentence(s) longer than 64 tokens were truncated" in capsys.readouterr().err


def test_discovery_picks_the_best_checkpoint_of_the_latest_run(trained, tmp_path):
    workdir, _ = trained
    runs = tmp_path / "logs" / "cola"
    shutil.copytree(workdir / "logs/cola/version_0", runs / "version_1")
    shutil.copytree(workdir / "logs/cola/version_0", runs / "version_0")
    (runs / "version_2").mkdir()  # a run that crashed before its first checkpoint
    best = json.loads((runs / "version_1/metrics.json").read_text())["best_model_path"].split("/")[-1]
    newer = runs / "version_1/checkpoints/best-epoch=9-val_mcc=-0.5000.ckpt"  # newest file, not the best
    shutil.copy(runs / "version_1/checkpoints/last.ckpt", newer)
    assert find_best_checkpoint(runs) == runs / "version_1/checkpoints" / best
    (runs / "version_1/metrics.json").unlink()  # an unfinished run: last.ckpt remembers the best
    assert find_best_checkpoint(runs) == runs / "version_1/checkpoints" / best
    result = run_inference(tmp_path, "--json", SENTENCES[0])
    assert result.returncode == 0, result.stderr
    assert ColaPredictor(runs / "version_1").predict([SENTENCES[0]]) == [json.loads(result.stdout)]


def test_export_round_trip_through_pipeline(best_checkpoint, predictor, tmp_path):
    from transformers import pipeline

    export_hf(best_checkpoint, str(tmp_path / "export"))
    classifier = pipeline("text-classification", model=str(tmp_path / "export"), top_k=None, device="cpu")
    for ours, theirs in zip(predictor.predict(SENTENCES), classifier(SENTENCES)):
        scores = {s["label"]: s["score"] for s in theirs}
        for label in ("acceptable", "unacceptable"):
            assert scores[label] == pytest.approx(ours["probabilities"][label], abs=1e-5)


def one_line_error(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_no_run_and_no_checkpoint(tmp_path):
    assert "no trained run under logs/cola" in one_line_error(run_inference(tmp_path, "Hello."))


def test_bad_input_files(trained, tmp_path):
    workdir, _ = trained
    assert "cannot read" in one_line_error(run_inference(workdir, "--file", str(tmp_path / "missing.txt")))
    (tmp_path / "latin1.txt").write_bytes(b"The dog sat.\nCaf\xe9 au lait.\n")
    assert "latin1.txt:2: not valid UTF-8" in one_line_error(run_inference(workdir, "--file", str(tmp_path / "latin1.txt")))


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("kind", ["not-a-checkpoint", "truncated", "foreign", "pickled-code", "missing"])
def test_bad_checkpoints_are_refused_in_one_line(best_checkpoint, tmp_path, kind):
    path = tmp_path / "bad.ckpt"
    if kind == "not-a-checkpoint":
        path.write_text("hello")
    elif kind == "truncated":
        path.write_bytes(best_checkpoint.read_bytes()[: best_checkpoint.stat().st_size // 2])
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "pickled-code":
        torch.save({"state_dict": {}, "hf_config": Exploit(), "tokenizer_files": {}}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=str(path)):
        ColaPredictor(path)
    result = run_inference(tmp_path, "--checkpoint", str(path), "Hello.")
    line = one_line_error(result)
    assert line.startswith(f"error: {path}") and "pwned" not in result.stdout


# Property-based: whatever the input, one result per line in order, or one InputError; never another exception.
from argparse import Namespace  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from inference import read_sentences  # noqa: E402

any_text = st.text(st.characters(exclude_categories=()), max_size=50)  # surrogates too (undecodable argv bytes)
long_text = st.builds(lambda word, n: word * n, st.sampled_from(["the dog sat ", "\"quoted\" ", "x"]), st.integers(100, 3000))
line_bytes = st.lists(
    st.sampled_from([b"The dog sat.", b"\n", b"\r\n", b"\r", b"\t", b'"', b"\x0c", b"\xe2\x80\xa8", b"\xc2\x85", b"\xff", b"\xef\xbb\xbf", b" "]),
    max_size=30,
).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | line_bytes | any_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_input_files_give_one_sentence_per_line_or_one_input_error(tmp_path, data):
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    try:
        lines = read_sentences(Namespace(file=str(path), sentences=[]))
    except InputError as error:
        assert str(error).startswith(f"{path}:") and "\n" not in str(error)
        return
    body = data.removeprefix(b"\xef\xbb\xbf")
    assert len(lines) == body.count(b"\n") + (0 if body.endswith(b"\n") or not body else 1)  # as `wc -l` counts
    assert all("\n" not in line for line in lines)


@settings(max_examples=60, deadline=None)
@given(sentences=st.lists(any_text | long_text, max_size=6), batch_size=st.integers(-1, 4))
def test_predict_gives_one_result_per_sentence_or_one_input_error(predictor, sentences, batch_size):
    try:
        results = predictor.predict(sentences, batch_size=batch_size)
    except InputError as error:
        assert "\n" not in str(error)
        unencodable = any(not s.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") == s for s in sentences)
        assert batch_size < 1 or unencodable
        return
    assert batch_size >= 1 and [r["sentence"] for r in results] == sentences
    for sentence, result in zip(sentences, results):
        if sentence.strip():
            assert result["label"] in ("acceptable", "unacceptable")
            assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        else:
            assert result["error"] == "empty sentence"


def test_undecodable_argument_is_one_line(trained):
    workdir, _ = trained
    line = one_line_error(run_inference(workdir, "The dog sat.", os.fsdecode(b"Caf\xe9.")))
    assert line == "error: argument 2 is not valid UTF-8"


def test_mean_pooled_checkpoint_predicts_as_trained_in_every_backend(input_sensitive_checkpoint, tmp_path):
    from transformers import BertForSequenceClassification

    from model import sentence_logits

    checkpoint = torch.load(input_sensitive_checkpoint, weights_only=True)
    mean_pooled = tmp_path / "mean.ckpt"
    torch.save({**checkpoint, "hyper_parameters": {"pooling": "mean"}}, mean_pooled)
    rng = random.Random(2)
    sentences = [make_sentence(rng) for _ in range(16)]

    model = BertForSequenceClassification.from_pretrained(None, config=BertConfig(**checkpoint["hf_config"]),
        state_dict={k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(checkpoint["tokenizer_files"]["tokenizer.json"]))
    with torch.no_grad():
        expected = [sentence_logits(model, "mean", dict(tokenizer([s], return_tensors="pt"))).softmax(-1)[0, 1].item()
                    for s in sentences]
    for backend in ("onnx", "torch"):
        got = [r["probabilities"]["acceptable"] for r in ColaPredictor(mean_pooled, backend).predict(sentences, batch_size=5)]
        assert got == pytest.approx(expected, abs=1e-4), backend
    cls_head = [r["probabilities"]["acceptable"] for r in ColaPredictor(input_sensitive_checkpoint).predict(sentences)]
    assert max(abs(a - b) for a, b in zip(cls_head, expected)) > 0.05  # same weights, other pooling: other answers
    with pytest.raises(CheckpointError, match="mean.ckpt: trained with --model.pooling mean.*pipeline"):
        export_hf(mean_pooled, str(tmp_path / "export"))


def test_fast_path_loads_neither_torch_nor_lightning_nor_training_code(best_checkpoint):
    code = (
        "import sys; from inference import ColaPredictor; ColaPredictor(sys.argv[1]).predict(['The dog sat.']);"
        " print(sorted(m for m in ('torch', 'pytorch_lightning', 'transformers', 'model', 'data', 'train', 'callbacks')"
        " if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(best_checkpoint)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
