"""`python train.py` end to end, as a subprocess on the tiny model (each run takes ~10-30 s, mostly imports)."""

import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from conftest import REPO, run_train, save_tiny_distilbert, tiny_train_args


def test_run_writes_checkpoints_metrics_and_tensorboard(trained):
    workdir, result = trained
    run_dir = workdir / "logs" / "cola" / "version_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_step"] == 2 * 48 // 8
    assert metrics["train_samples_per_second"] * metrics["train_seconds"] == pytest.approx(2 * 48)  # samples trained
    best = workdir / metrics["best_model_path"]
    assert best.parent == run_dir / "checkpoints" and best.name.startswith("best-")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # The best holds weights, config, tokenizer and settings, not the optimizer's state; last.ckpt holds all a resume needs.
    best_keys = torch.load(best, weights_only=True).keys()
    assert {"state_dict", "hf_config", "tokenizer_files", "hyper_parameters", "datamodule_hyper_parameters"} <= best_keys
    assert "optimizer_states" not in best_keys and "optimizer_states" in torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert metrics["monitor"] == "val_mcc" and metrics["best_val_mcc"] == pytest.approx(float(best.stem.split("val_mcc=")[1]), abs=1e-4)
    assert f"Best val_mcc {metrics['best_val_mcc']:.4f}" in result.stdout
    assert f"python inference.py --checkpoint {metrics['best_model_path']}" in result.stdout
    assert "Exported for inference.py in " in result.stdout  # the first inference.py needs no export

    scalars, images = set(), set()
    for event_file in run_dir.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(event_file), size_guidance={"images": 0})
        events.Reload()
        scalars |= set(events.Tags()["scalars"])
        images |= set(events.Tags()["images"])
    assert {"train_loss", "val_loss", "val_mcc", "val_accuracy", "val_f1", "hp/best_val_mcc"} <= scalars
    # One chart per parameter group, named for what it holds (default recipe: one rate, with and without decay).
    assert {tag for tag in scalars if tag.startswith("lr-")} == {"lr-AdamW/all", "lr-AdamW/all-no_decay"}
    assert {"train/samples_per_sec", "train/tokens_per_sec"} <= scalars  # TrainingThroughput
    assert {"val/confusion_matrix", "val/precision_recall_curve"} <= images


def test_checkpoint_is_self_contained_and_safe_to_load(trained):
    workdir, _ = trained
    metrics = json.loads((workdir / "logs/cola/version_0/metrics.json").read_text())
    checkpoint = torch.load(workdir / metrics["best_model_path"], map_location="cpu", weights_only=True)
    config = checkpoint["hf_config"]
    assert {int(k): v for k, v in config["id2label"].items()} == {0: "unacceptable", 1: "acceptable"}
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 2
    assert checkpoint["datamodule_hyper_parameters"]["max_length"] == 128
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(checkpoint["tokenizer_files"]["tokenizer.json"]))
    tokens = tokenizer.tokenize("The dog sat on the mat.")
    assert "dog" in tokens and "[UNK]" not in tokens


def test_resume_from_last_checkpoint_continues_the_same_run(trained, tmp_path, tiny_model_dir, tiny_data_dir):
    workdir, _ = trained
    shutil.copytree(workdir / "logs", tmp_path / "logs")
    last = "logs/cola/version_0/checkpoints/last.ckpt"
    args = tiny_train_args(tiny_model_dir, tiny_data_dir)
    result = run_train(tmp_path, *args, "--trainer.max_epochs", "3", "--ckpt_path", last)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in result.stdout + result.stderr
    metrics = json.loads((tmp_path / "logs/cola/version_0/metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["global_step"] == 3 * 48 // 8  # 2 epochs restored + 1 more
    assert not (tmp_path / "logs/cola/version_1").exists()


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("src\t2\t\tThe dog sat.", "train.tsv:3: label must be 0 or 1, found '2'"),
        ("src\t1\tThe dog sat.", "train.tsv:3: expected 4 tab-separated columns"),
    ],
)
def test_bad_tsv_line_stops_with_one_line_error(tmp_path, tiny_model_dir, tiny_data_dir, bad_line, message):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data_dir)
    lines = (data_dir / "train.tsv").read_text().splitlines()
    lines[2] = bad_line
    (data_dir / "train.tsv").write_text("\n".join(lines) + "\n")
    result = run_train(tmp_path, *tiny_train_args(tiny_model_dir, data_dir))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(data_dir) in last_line and message in last_line
    assert not list(tmp_path.glob("logs/cola/*/checkpoints/*.ckpt"))


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(tmp_path, tiny_model_dir, tiny_data_dir):
    # Mean pooling leaves BERT's pooler unused; DDP fails on trainable parameters that get no gradient.
    args = [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--model.pooling", "mean"]
    devices = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = run_train(tmp_path, *args, *devices, "--trainer.max_epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "logs" / "cola").iterdir())
    assert [d.name for d in run_dirs] == ["version_0"]
    assert len(list(run_dirs[0].glob("checkpoints/best-*.ckpt"))) == 1
    metrics = json.loads((run_dirs[0] / "metrics.json").read_text())
    assert metrics["global_step"] == 2 * 48 // (8 * 2)  # each of 2 ranks sees half the data per epoch
    checkpoint = torch.load(tmp_path / metrics["best_model_path"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["pooling"] == "mean"  # so inference pools the same way


def test_mean_pooling_on_a_model_with_its_own_head_is_one_line(tmp_path, tiny_model_dir, tiny_data_dir):
    model_dir = save_tiny_distilbert(tmp_path / "distilbert", tiny_model_dir)
    result = run_train(tmp_path, *tiny_train_args(model_dir, tiny_data_dir), "--model.pooling", "mean")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --model.pooling mean needs a BERT-style head")


def test_help_lists_model_data_trainer_and_callback_options(tmp_path):
    result = run_train(tmp_path, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for option in ("--model.learning_rate", "--data.data_dir", "--data.max_length", "--trainer.max_epochs",
                   "--trainer.devices", "--early_stopping.patience", "--data.metric", "--data.task", "--ckpt_path", "--config",
                   "--save_last_every_minutes", "--model.num_layers"):
        assert option in result.stdout



def test_early_stopping_waits_for_warmup_to_end():
    from callbacks import EarlyStoppingAfterWarmup

    callback = EarlyStoppingAfterWarmup(monitor="val_mcc", mode="max", patience=1)
    checked = []
    with mock.patch("pytorch_lightning.callbacks.EarlyStopping._run_early_stopping_check", lambda self, t: checked.append(t.global_step)):
        for step in (5, 9, 10, 20):
            callback._run_early_stopping_check(SimpleNamespace(global_step=step, max_steps=-1, lightning_module=SimpleNamespace(warmup_steps=10)))
    assert checked == [10, 20]


def test_sanity_checks_log_class_balance_initial_loss_and_warn_on_one_class_model(trained):
    from callbacks import SanityChecks

    _, result = trained
    output = result.stdout + result.stderr
    assert "train: 48 sentences, " in output and "% acceptable" in output
    initial_loss = float(output.split("loss at initialisation ")[1].split()[0])
    assert abs(initial_loss - math.log(2)) < 0.1
    model = SimpleNamespace(warmup_steps=10, hparams=SimpleNamespace(learning_rate=1e-3))
    trainer = SimpleNamespace(sanity_checking=False, global_step=12, callback_metrics={"val_mcc": torch.tensor(0.0)})
    with pytest.warns(UserWarning, match="val_mcc is 0 after warmup.*learning rate"):
        SanityChecks().on_validation_end(trainer, model)
    trainer.global_step = 8  # still warming up: a one-class model is normal there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SanityChecks().on_validation_end(trainer, model)


def test_training_does_not_import_the_inference_script():
    code = "import sys, train; print('inference' in sys.modules, 'export' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]  # export.py loads only at the end of a run


def test_a_signal_during_the_end_of_run_export_says_the_run_is_saved(monkeypatch, capsys):
    import export
    import train

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "onnx_export", interrupted)
    with pytest.raises(SystemExit) as stopped:
        train.export_for_inference("logs/cola/version_0/checkpoints/best.ckpt")
    assert stopped.value.code == 130  # not "stopped before training started"
    assert "export interrupted; the run is done and saved" in capsys.readouterr().err


def test_the_model_summary_counts_flops_on_an_example_sentence(trained):
    _, result = trained
    flops = re.search(r"Total FLOPs: (\S+)", result.stdout)
    assert flops and flops[1] != "0", result.stdout[:3000]  # Lightning prints 0 for a model without example input


@pytest.mark.slow
# One of the 15 slowest (~30 s): one cut model trained, resumed, exported to fp32 and int8 ONNX and served.
def test_num_layers_keeps_the_first_layers_in_export_int8_serving_and_resume(tmp_path, tiny_model_dir, tiny_data_dir):
    from fastapi.testclient import TestClient

    from inference import Predictor
    from serve import Settings, create_app

    args = [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--model.num_layers", "1", "--model.pooling", "mean"]
    result = run_train(tmp_path, *args, "--trainer.max_epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs/cola/version_0"
    best = tmp_path / json.loads((run_dir / "metrics.json").read_text())["best_model_path"]
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hf_config"]["num_hidden_layers"] == 1  # so inference builds the same 1-layer model
    layers = {name.split(".layer.")[1].split(".")[0] for name in checkpoint["state_dict"] if ".layer." in name}
    assert layers == {"0"}  # the tiny model's first of its 2 layers

    sentences = ["The dog sat on the mat.", "Mat the on sat dog the.", "A big cat ran quickly under the bench."]
    probabilities = {
        backend: [r["probabilities"]["acceptable"] for r in Predictor(best, backend).predict(sentences)]
        for backend in ("torch", "onnx", "onnx-int8")
    }
    assert probabilities["onnx"] == pytest.approx(probabilities["torch"], abs=1e-4)
    assert probabilities["onnx-int8"] == pytest.approx(probabilities["torch"], abs=0.03)
    predictor = Predictor(best)
    with TestClient(create_app(predictor, Settings(checkpoint=str(best)))) as client:
        assert client.post("/predict", json={"sentences": sentences}).json() == predictor.predict(sentences)

    last = str(run_dir / "checkpoints/last.ckpt")
    all_layers = run_train(tmp_path, *args[:-4], "--model.pooling", "mean", "--trainer.max_epochs", "2", "--ckpt_path", last)
    assert all_layers.returncode == 1  # null (all layers) is not the 1 it was trained with
    assert all_layers.stderr.strip().splitlines()[-1].endswith(
        "trained with --model.num_layers 1, not None: resume with the options it was trained with"
        " (its run folder's config.yaml has them), or start a new run"
    ), all_layers.stderr[-2000:]
    resumed = run_train(tmp_path, *args, "--trainer.max_epochs", "2", "--ckpt_path", last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2


def test_samples_per_second_of_a_run_stopped_by_max_steps_counts_its_steps(tmp_path, tiny_model_dir, tiny_data_dir):
    """3 steps of 8 sentences, stopped by --trainer.max_steps within the first epoch (6 steps): 24 samples. It
    counted the whole epoch (48) as trained: 30 steps of 32 reported 165.7 samples/s where the run did 18.6."""
    result = run_train(tmp_path, *tiny_train_args(tiny_model_dir, tiny_data_dir), "--trainer.max_steps", "3",
                       "--trainer.val_check_interval", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "logs/cola/version_0/metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert metrics["train_samples_per_second"] * metrics["train_seconds"] == pytest.approx(3 * 8)
