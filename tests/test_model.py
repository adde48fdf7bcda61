import json
import math
import shutil
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from pytorch_lightning import Callback
from sklearn.metrics import matthews_corrcoef
from transformers import BertConfig, BertForSequenceClassification, BertModel

from conftest import save_tiny_distilbert, tiny_train_args
from model import TextClassifier, MatthewsCorrCoef, OptionError
from test_data import make_datamodule


@pytest.fixture
def model(tiny_model_dir) -> TextClassifier:
    torch.manual_seed(0)
    return TextClassifier(model_name_or_path=str(tiny_model_dir))


def test_labels_and_training_mode(model):
    assert model.model.config.id2label == {0: "unacceptable", 1: "acceptable"}
    assert model.model.training, "dropout must be on while fine-tuning"


def test_loss_at_initialisation_is_near_ln2(model, tiny_model_dir, tiny_data_dir):
    batch = next(iter(make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=48).train_dataloader()))
    model.eval()
    with torch.no_grad():
        loss = model.model(**batch).loss.item()
    assert abs(loss - math.log(2)) < 0.05


def test_overfits_a_batch_of_16(model, tiny_model_dir, tiny_data_dir):
    batch = next(iter(make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=16).train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.eval()  # dropout off: this checks that inputs, labels and loss are wired so that it can memorise
    for _ in range(150):
        loss = model.model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_validation_metrics_cover_the_whole_epoch(model, tiny_model_dir, tiny_data_dir):
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for batch in make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=5).val_dataloader():
            logits = model.model(**batch).logits
            probs.append(logits.softmax(-1)[:, 1])
            labels.append(batch["labels"])
            model.val_metrics.update(probs[-1], labels[-1])
    probs, labels = torch.cat(probs), torch.cat(labels)
    metrics = model.val_metrics.compute()
    expected = matthews_corrcoef(labels.numpy(), (probs > 0.5).long().numpy())
    assert metrics["val_mcc"].item() == pytest.approx(expected, abs=1e-6)
    assert metrics["val_accuracy"].item() == pytest.approx(((probs > 0.5).long() == labels).float().mean().item())


def test_no_weight_decay_on_biases_and_layernorm_and_warmup_then_linear_decay(model):
    with mock.patch.object(type(model), "trainer", SimpleNamespace(estimated_stepping_batches=100)):
        config = model.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        config["optimizer"].step()
        scheduler.step()
    peak = model.hparams.learning_rate
    assert lrs[0] == 0 and lrs[10] == pytest.approx(peak)  # 10% warmup
    assert lrs[5] == pytest.approx(peak / 2) and lrs[55] == pytest.approx(peak / 2)


@pytest.mark.parametrize(
    "preds, target",
    [([1, 1, 1, 1], [1, 0, 1, 0]), ([0, 0, 0, 0], [1, 0, 1, 1]), ([1, 0, 1, 0], [1, 1, 1, 1]), ([1, 0, 0, 1], [1, 0, 1, 0])],
)
def test_mcc_matches_scikit_learn_also_when_one_class_is_predicted(preds, target):
    metric = MatthewsCorrCoef()
    metric.update(torch.tensor(preds, dtype=torch.float), torch.tensor(target))
    assert metric.compute().item() == pytest.approx(matthews_corrcoef(target, preds), abs=1e-6)


def test_layer_decay_and_head_learning_rate_give_each_parameter_its_rate(tiny_model_dir):
    model = TextClassifier(str(tiny_model_dir), learning_rate=1e-4, layer_decay=0.5, head_learning_rate=1e-2)
    num_layers = model.model.config.num_hidden_layers
    rate = {id(p): group["lr"] for group in model.parameter_groups() for p in group["params"]}
    for name, param in model.model.named_parameters():
        if name.startswith("classifier."):
            expected = 1e-2
        elif ".embeddings." in name:
            expected = 1e-4 * 0.5**num_layers
        elif ".layer." in name:
            layer = int(name.split(".layer.")[1].split(".")[0])
            expected = 1e-4 * 0.5 ** (num_layers - 1 - layer)
        else:  # pooler: with the top layer
            expected = 1e-4
        assert rate[id(param)] == pytest.approx(expected), name
    assert len(rate) == len(list(model.parameters()))
    # Named for TensorBoard's learning-rate charts (tiny model: 2 layers; the pooler learns at the top layer's rate).
    names = [group["name"] for group in model.parameter_groups()]
    assert sorted(names) == sorted(
        f"{part}{suffix}" for part in ("embeddings", "layer_0", "layer_1..pooler", "head") for suffix in ("", "-no_decay")
    )


def test_default_learning_rate_follows_model_size(tiny_model_dir, tmp_path):
    assert TextClassifier(str(tiny_model_dir)).hparams.learning_rate == 1e-4  # hidden 32: a small model
    wide = BertForSequenceClassification(
        BertConfig(vocab_size=30, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64)
    )
    wide.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    assert TextClassifier(str(tmp_path)).hparams.learning_rate == 2e-5  # BERT-base width: the BERT paper's
    assert TextClassifier(str(tmp_path), learning_rate=3e-5).hparams.learning_rate == 3e-5


def test_resolved_learning_rate_is_what_hparams_yaml_and_checkpoints_record(tiny_model_dir, tiny_data_dir):
    # Through LightningCLI, which hands save_hyperparameters the parsed arguments (learning_rate: null).
    from train import TextDataModule, TrainCLI

    args = ["--model.model_name_or_path", str(tiny_model_dir), "--data.data_dir", str(tiny_data_dir), "--trainer.logger", "false"]
    cli = TrainCLI(TextClassifier, TextDataModule, run=False, args=args)
    assert cli.config.model.learning_rate is None
    assert cli.model.hparams_initial.learning_rate == 1e-4  # what the logger writes to hparams.yaml
    assert cli.model.hparams.learning_rate == 1e-4


def test_mean_pooling_averages_real_tokens_only_and_leaves_the_pooler_out(tiny_model_dir, tiny_data_dir):
    torch.manual_seed(0)
    model = TextClassifier(str(tiny_model_dir), pooling="mean")
    short, long = "the dog sat .", "the big dog sat on the mat near the cat ."
    alone = model.tokenizer([short], return_tensors="pt")
    padded = model.tokenizer([short, long], padding=True, return_tensors="pt")
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].size(1)  # the short one is padded
    model.eval()
    with torch.no_grad():
        logits_alone = model({**alone, "labels": torch.tensor([1])})[0]
        logits_padded = model({**padded, "labels": torch.tensor([1, 0])})[0]
        hidden = model.model.base_model(**alone).last_hidden_state
        by_hand = model.model.classifier(hidden.mean(dim=1))
        cls_logits = model.model(**alone).logits
    assert torch.allclose(logits_alone, logits_padded[:1], atol=1e-5)
    assert torch.allclose(logits_alone, by_hand, atol=1e-6)
    assert not torch.allclose(logits_alone, cls_logits, atol=1e-3)  # not the [CLS] head

    # The pooler gets no gradient from the mean: frozen, and out of the optimizer (DDP rejects such parameters).
    model.train()
    batch = next(iter(make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=8).train_dataloader()))
    model(batch)[1].backward()
    trainable = [p for group in model.parameter_groups() for p in group["params"]]
    assert all(p.grad is not None for p in trainable)
    assert not any(p.requires_grad for p in model.model.base_model.pooler.parameters())


def test_mean_pooling_refuses_a_head_it_would_bypass(tmp_path, tiny_model_dir):
    model_dir = save_tiny_distilbert(tmp_path, tiny_model_dir)
    TextClassifier(str(model_dir))  # its own head, on [CLS]: fine
    with pytest.raises(OptionError, match="pooling mean needs a BERT-style head.*DistilBertForSequenceClassification"):
        TextClassifier(str(model_dir), pooling="mean")


@pytest.mark.parametrize("model_kind", ["bert", "distilbert"])
def test_frozen_word_embeddings_stay_pretrained_while_the_rest_trains(model_kind, tmp_path, tiny_model_dir, tiny_data_dir):
    model_dir = tiny_model_dir if model_kind == "bert" else save_tiny_distilbert(tmp_path, tiny_model_dir)
    torch.manual_seed(0)
    model = TextClassifier(str(model_dir), freeze_word_embeddings=True)
    words = model.model.get_input_embeddings().weight
    before = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-2)
    assert all(p is not words for group in optimizer.param_groups for p in group["params"])
    batch = next(iter(make_datamodule(model_dir, tiny_data_dir, batch_size=8).train_dataloader()))
    model(batch)[1].backward()
    optimizer.step()
    changed = {name for name, p in model.model.named_parameters() if not torch.equal(p, before[name])}
    word_name = next(name for name, p in model.model.named_parameters() if p is words)
    assert word_name not in changed and torch.equal(words, before[word_name])
    assert any("position_embeddings" in name for name in changed)  # only the word vectors are frozen
    assert any(name.startswith("classifier") for name in changed)


def test_num_layers_outside_the_model_is_refused_in_one_line(tiny_model_dir):
    with pytest.raises(OptionError, match=r"--model.num_layers 3: .* has 2 layers; use at most 2"):
        TextClassifier(str(tiny_model_dir), num_layers=3)  # the extra layer would start from random weights
    with pytest.raises(OptionError, match="--model.num_layers must be at least 1"):
        TextClassifier(str(tiny_model_dir), num_layers=0)


class RecordWeights(Callback):
    """The model's parameters after each optimizer step, and as the first validation batch of each epoch sees them."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.in_validation: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after_step.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self.in_validation.append((trainer.global_step, {k: v.detach().clone() for k, v in pl_module.named_parameters()}))


def test_ema_weights_are_what_validation_the_checkpoint_and_the_export_hold(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """--model.ema_decay d: the weights validated, saved as the checkpoint's state_dict and exported are torch's
    AveragedModel with get_ema_avg_fn(d) over the weights after each step, computed here by hand."""
    import train
    from checkpoints import load_checkpoint
    from inference import Predictor

    decay, recorder = 0.7, RecordWeights()
    monkeypatch.chdir(tmp_path)
    train.main([*tiny_train_args(tiny_model_dir, tiny_data_dir), "--trainer.max_epochs", "2", "--model.ema_decay", str(decay),
                "--trainer.enable_progress_bar", "false"], callbacks=[recorder])
    ema, by_step = None, {}
    for step, weights in enumerate(recorder.after_step, start=1):
        ema = {k: w.clone() for k, w in weights.items()} if ema is None else {k: decay * ema[k] + (1 - decay) * w for k, w in weights.items()}
        by_step[step] = ema
    assert [step for step, _ in recorder.in_validation] == [6, 12]  # 48 sentences, batches of 8, 2 epochs
    for step, seen in recorder.in_validation:
        for name, value in seen.items():
            torch.testing.assert_close(value, by_step[step][name], rtol=1e-6, atol=1e-7)
    metrics = json.loads((tmp_path / "logs/cola/version_0/metrics.json").read_text())
    best = tmp_path / metrics["best_model_path"]
    checkpoint = load_checkpoint(best)
    step = checkpoint["global_step"]
    for name, value in checkpoint["state_dict"].items():
        if name in by_step[step]:
            torch.testing.assert_close(value, by_step[step][name], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(checkpoint["current_model_state"][name], recorder.after_step[step - 1][name])
    sentences = ["The dog sat on the mat.", "Mat the on sat dog the."]
    exported = Predictor(best).predict(sentences)  # train.py's ONNX export of the best checkpoint
    averaged = Predictor(best, backend="torch").predict(sentences)  # the checkpoint's state_dict
    for onnx_result, torch_result in zip(exported, averaged):
        assert onnx_result["probabilities"] == pytest.approx(torch_result["probabilities"], abs=1e-5)


@pytest.mark.slow  # ~20-35 s: the fast tier keeps the quicker tests of the same code
# One of the 15 slowest (~35 s): three train.py runs (with EMA, its resume, a resume with another decay), each exported.
def test_ema_resume_is_refused_without_the_same_decay(tiny_model_dir, tiny_data_dir, tmp_path):
    from conftest import run_train

    args = [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--trainer.max_epochs", "1"]
    assert run_train(tmp_path, *args, "--model.ema_decay", "0.9").returncode == 0
    last = "logs/cola/version_0/checkpoints/last.ckpt"
    resumed = run_train(tmp_path, *args, "--trainer.max_epochs", "2", "--ckpt_path", last)
    assert resumed.returncode != 0 and "ema_decay" in resumed.stderr.splitlines()[-1], resumed.stderr[-2000:]
    refused = run_train(tmp_path, *args, "--model.ema_decay", "1.0")
    assert refused.returncode != 0 and "--model.ema_decay must be above 0 and below 1" in refused.stderr.splitlines()[-1]


def test_head_seed_fixes_the_new_head_and_leaves_the_runs_random_state_alone(tiny_model_dir, tmp_path):
    encoder = tmp_path / "encoder"  # a pretrained encoder without a classifier (as all-MiniLM-L6-v2): the head is new
    BertModel(BertConfig.from_pretrained(tiny_model_dir)).save_pretrained(encoder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, encoder / name)

    def build(seed: int, head_seed: int | None) -> tuple[torch.nn.Linear, torch.Tensor]:
        torch.manual_seed(seed)  # as --seed_everything does before the model is made
        return TextClassifier(str(encoder), head_seed=head_seed).model.classifier, torch.get_rng_state()

    (shared_1, state_1), (shared_2, _) = build(1, 0), build(2, 0)
    (own_1, own_state_1), (own_2, _) = build(1, None), build(2, None)
    assert torch.equal(shared_1.weight, shared_2.weight)  # one head, whatever the run's seed: runs can be averaged
    assert not torch.equal(own_1.weight, own_2.weight) and not torch.equal(shared_1.weight, own_1.weight)
    assert torch.equal(state_1, own_state_1)  # data order and dropout draw as they would without head_seed
    assert not shared_1.bias.any() and shared_1.weight.std().item() == pytest.approx(0.02, rel=0.3)  # BERT's initializer_range
