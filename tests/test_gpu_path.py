"""The GPU path, proven on the CPU: no host synchronisation in a training step that does not need one, the
non-finite-loss guard without one, and --model.compile (the same loss as eager; trains, resumes, exports)."""

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback, Trainer

import model as model_module
import train
from conftest import REPO, run_train, tiny_train_args
from model import TextClassifier, NonFiniteLossError
from test_data import make_datamodule

# Each of these makes the CPU wait for the GPU when called on a CUDA tensor.
SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__")
# A library's own, listed as kept in benchmarks/README.md: transformers skips the attention mask of a batch without
# padding (padding_mask.all()); only in eager mode (traced by --model.compile, it is not read).
KEPT = ("transformers/masking_utils.py",)


def test_training_steps_read_no_tensor_between_log_steps(tmp_path, monkeypatch, tiny_model_dir, tiny_data_dir):
    """`python train.py` with its default callbacks and the progress bar, 12 steps logged every 5: a tensor may be
    read (item, bool, int...) only in steps 1 (SanityChecks' loss at initialisation), 5 and 10 (Lightning logs) and
    12 (the epoch's end: the guard's flags, validation)."""
    step = [0]  # the step running now; 0 outside training
    reads: dict[int, list[str]] = {}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            stack = traceback.extract_stack()[:-1]
            files = [frame.filename for frame in stack]
            if step[0] and not any(kept in f for f in files for kept in (*KEPT, "torch/utils/data/")):
                caller = next((f"{Path(fr.filename).name}:{fr.lineno} {fr.line}" for fr in reversed(stack)
                               if "/torch/" not in fr.filename), "?")
                reads.setdefault(step[0], []).append(f"{name} from {caller}")
            return original(self, *args, **kwargs)

        return read

    def on_train_batch_start(self, batch, batch_idx):
        step[0] = self.global_step + 1

    monkeypatch.setattr(TextClassifier, "on_train_batch_start", on_train_batch_start, raising=False)
    real_end = TextClassifier.on_train_end
    monkeypatch.setattr(TextClassifier, "on_train_end", lambda self: (step.__setitem__(0, 0), real_end(self)))
    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.chdir(tmp_path)
    args = [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--data.batch_size", "4", "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "true"]
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        train.main()
    between_logs = {s: calls for s, calls in reads.items() if s not in (1, 5, 10, 12)}
    assert not between_logs, json.dumps(between_logs, indent=1)
    assert reads.get(5) and reads.get(12)  # the recording works: logging and the epoch's end do read


class WeightsBefore(Callback):
    """Keeps a copy of the weights as the given step starts."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_a_non_finite_loss_never_reaches_the_weights(monkeypatch, tiny_model_dir, tiny_data_dir):
    """Step 2's loss is NaN, step 3's is finite again; the flags are read after step 4 (log_every_n_steps 4): neither
    step changed the weights or the optimizer's state, and the error names step 2."""
    real = model_module.logits_and_loss
    losses = []

    def nan_at_step_2(model, pooling, batch, distillation=None):
        logits, loss = real(model, pooling, batch)
        loss = loss * float("nan") if len(losses) == 1 else loss
        losses.append(loss.detach())
        return logits, loss

    monkeypatch.setattr(model_module, "logits_and_loss", nan_at_step_2)
    torch.manual_seed(0)
    model = TextClassifier(model_name_or_path=str(tiny_model_dir), learning_rate=1e-2)
    datamodule = make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=4)
    before = WeightsBefore(step=2)
    trainer = Trainer(max_epochs=1, log_every_n_steps=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[before])
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, datamodule=datamodule)
    assert [bool(loss.isfinite()) for loss in losses] == [True, False, True, True]  # stopped after step 4
    assert str(error.value).startswith("the loss became NaN or infinite at epoch 0, step 2; training stopped before")
    assert "\n" not in str(error.value)
    after = model.state_dict()
    assert before.weights.keys() == after.keys()
    for name, weight in before.weights.items():
        assert torch.equal(weight, after[name]), name
    optimizer = trainer.optimizers[0]
    assert {float(optimizer.state[p]["step"]) for p in model.parameters() if p.requires_grad} == {1.0}


def test_the_guard_also_stops_before_a_checkpoint_is_saved(monkeypatch, tiny_model_dir, tiny_data_dir, tmp_path):
    """A NaN in the epoch's last step, checked at no log step: the epoch's end stops it, and no checkpoint is saved."""
    real = model_module.logits_and_loss
    monkeypatch.setattr(model_module, "logits_and_loss",
                        lambda m, p, b, d=None: (lambda out: (out[0], out[1] * float("nan")))(real(m, p, b, d)))
    model = TextClassifier(model_name_or_path=str(tiny_model_dir))
    datamodule = make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=16)  # 3 steps
    trainer = Trainer(max_epochs=1, log_every_n_steps=50, logger=False, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match="at epoch 0, step 1;"):
        trainer.fit(model, datamodule=datamodule)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_compiled_model_computes_the_eager_loss_and_gradients(tiny_model_dir, tiny_data_dir):
    datamodule = make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=8, pad_to_buckets=True)
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    eager = TextClassifier(model_name_or_path=str(tiny_model_dir))
    compiled = TextClassifier(model_name_or_path=str(tiny_model_dir), compile=True)
    compiled.load_state_dict(eager.state_dict())
    results = []
    for model in (eager, compiled):  # training mode (what compiles), dropout off (its random masks differ)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        logits, loss = model(batch)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert compiled._compiled_logits_and_loss is not None  # it did compile
    (eager_logits, eager_loss, eager_grads), (logits, loss, grads) = results
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
# One of the 15 slowest (~45 s): inductor compiles the model's graphs with a C++ compiler on the CPU, twice (run, resume).
def test_a_compiled_run_trains_checkpoints_resumes_and_exports(tmp_path, tiny_model_dir, tiny_data_dir):
    args = [*tiny_train_args(tiny_model_dir, tiny_data_dir), "--model.compile", "true"]
    first = run_train(tmp_path, *args, "--trainer.max_epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "logs/cola/version_0"
    last = run_dir / "checkpoints/last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["compile"] is True
    assert checkpoint["datamodule_hyper_parameters"]["pad_to_buckets"] is True  # linked from --model.compile
    plain = TextClassifier(model_name_or_path=str(tiny_model_dir))
    assert checkpoint["state_dict"].keys() == plain.state_dict().keys()  # the plain model's weights, no wrapper
    resumed = run_train(tmp_path, *args, "--trainer.max_epochs", "2", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["global_step"]) == (2, 12)
    assert "Exported for inference.py in " in resumed.stdout
    assert list((run_dir / "checkpoints").glob("best-*.onnx"))
