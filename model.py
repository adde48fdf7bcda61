"""A pretrained BERT-family encoder fine-tuned to classify texts or pairs of texts (CoLA by default), as a LightningModule."""

import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    BinaryPrecisionRecallCurve,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, get_linear_schedule_with_warmup

from checkpoints import check_rng_states, check_same_weights
from data import GROUP_PARTS, GROUP_SEEN, LABEL_NAMES, TEACHER_OUTPUTS, OptionError
from hub import explain_hub_errors
from optimizer import NonFiniteLossError, NonFiniteLossGuard, parameter_groups  # noqa: F401 (the error: its name here too)


class MatthewsCorrCoef(BinaryMatthewsCorrCoef):
    """CoLA's official metric, 0 when the model predicts a single class (scikit-learn's and GLUE's
    definition); torchmetrics returns a small non-zero limit there, which would hide a collapsed model."""

    def compute(self) -> torch.Tensor:
        tn, fp, fn, tp = self.confmat.reshape(-1)  # already summed over DDP processes here
        if (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) == 0:
            return torch.zeros((), device=self.confmat.device)
        return super().compute()


def sentence_logits(model: PreTrainedModel, pooling: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a transformers *ForSequenceClassification model for a batch of inputs (no labels).

    "cls": the model's own head (BERT's: its pooler on the [CLS] vector, pretrained by next-sentence
    prediction). "mean": the head's last linear layer on the average of the last layer's token vectors,
    padding left out, as sentence-embedding models (e.g. all-MiniLM-L6-v2) were trained; their [CLS]
    vector and pooler never were.
    """
    if pooling == "cls":
        return model(**inputs).logits
    hidden = model.base_model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return model.classifier(model.dropout((hidden * mask).sum(1) / mask.sum(1)))


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_log_probs: torch.Tensor, weight: float,
                      temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): (1 - weight) * cross-entropy with the true labels + weight * T^2 *
    KL(teacher's softmax at temperature T || the student's). T^2 keeps the soft part's gradients at the hard part's
    scale whatever T. The teacher's log-probabilities stand for its logits: softmax(log p / T) = softmax(logits / T)."""
    hard = torch.nn.functional.cross_entropy(logits, labels)
    student = torch.nn.functional.log_softmax(logits / temperature, dim=-1)
    teacher = torch.nn.functional.log_softmax(teacher_log_probs / temperature, dim=-1)
    soft = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    return (1 - weight) * hard + weight * soft


def logits_and_loss(
    model: PreTrainedModel, pooling: str, batch: dict, distillation: Optional[tuple[float, float]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of a batch with labels: the part of a step that --model.compile compiles. The loss is the
    cross-entropy, or with distillation (weight, temperature) and the teacher's outputs in the batch, distillation_loss."""
    logits = sentence_logits(model, pooling, {k: v for k, v in batch.items() if k not in ("labels", TEACHER_OUTPUTS, GROUP_SEEN)})
    if distillation and TEACHER_OUTPUTS in batch:
        return logits, distillation_loss(logits.float(), batch["labels"], batch[TEACHER_OUTPUTS].float(), *distillation)
    return logits, torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


class SentenceClassifier(torch.nn.Module):
    """A trained *ForSequenceClassification model as inference runs and exports it: inputs in, logits out."""

    def __init__(self, model: PreTrainedModel, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:  # BERT's tokenizer gives them; DistilBERT's does not
            inputs["token_type_ids"] = token_type_ids
        return sentence_logits(self.model, self.pooling, inputs)


def check_options(
    model_name_or_path: str, learning_rate: Optional[float], weight_decay: float, warmup_ratio: float, layer_decay: float,
    head_learning_rate: Optional[float], num_layers: Optional[int] = None, ema_decay: Optional[float] = None,
    distill_weight: float = 0.5, distill_temperature: float = 2.0, head_seed: Optional[int] = None,
) -> None:
    """Refuse, before the model loads, values with which training cannot work (`not x > 0` also catches NaN).
    tune.py checks every value of a search space with it, before the study exists."""
    for name, value in (("learning_rate", learning_rate), ("head_learning_rate", head_learning_rate)):
        if value is not None and not 0 < value < float("inf"):
            raise OptionError(f"--model.{name} must be a positive number (e.g. 2e-5), or null for the default; not {value}")
    if not 0 <= weight_decay < float("inf"):
        raise OptionError(f"--model.weight_decay must be 0 or more (0.01 by default), not {weight_decay}")
    if not 0 <= warmup_ratio < 1:
        raise OptionError(f"--model.warmup_ratio must be at least 0 and below 1 (a fraction of all steps), not {warmup_ratio}")
    if not 0 < layer_decay <= 1:
        raise OptionError(f"--model.layer_decay must be above 0 and at most 1 (1: one learning rate for all), not {layer_decay}")
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise OptionError(f"--model.ema_decay must be above 0 and below 1 (e.g. 0.99), or null for none; not {ema_decay}")
    if not 0 <= distill_weight <= 1:
        raise OptionError(f"--model.distill_weight must be between 0 and 1 (the teacher's share of the loss), not {distill_weight}")
    if not 0 < distill_temperature < float("inf"):
        raise OptionError(f"--model.distill_temperature must be a positive number (e.g. 2), not {distill_temperature}")
    if head_seed is not None and not 0 <= head_seed < 2**64:  # torch.Generator's seeds
        raise OptionError(f"--model.head_seed must be from 0 to 2**64 - 1, or null for none; not {head_seed}")
    if num_layers is not None and num_layers < 1:
        raise OptionError(f"--model.num_layers must be at least 1, or null for all the model's layers; not {num_layers}")
    if num_layers is not None:  # more layers than the model has would be added with random weights
        with explain_hub_errors("model", model_name_or_path):
            available = AutoConfig.from_pretrained(model_name_or_path).num_hidden_layers
        if num_layers > available:
            raise OptionError(f"--model.num_layers {num_layers}: {model_name_or_path} has {available} layers; use at most {available}")


def load_pretrained(model_name_or_path: str, label_names: list[str], num_layers: Optional[int], task: str,
                    text_names: Optional[list[str]]) -> tuple[PreTrainedModel, Any]:
    """The pretrained encoder with a new head for label_names (its first num_layers layers), and its tokenizer."""
    with explain_hub_errors("model", model_name_or_path):
        model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            # A model fine-tuned before, with another number of labels: its head is replaced by a new one, as
            # the recipe assumes anyway (a fresh head; SanityChecks warns of one that is not).
            ignore_mismatched_sizes=True,
            **({"num_hidden_layers": num_layers} if num_layers else {}),  # loads the first num_layers layers
        )
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    # Saved with the config (checkpoint, exports' config.json): what inference reads, one text or a pair.
    model.config.finetuning_task, model.config.text_names = task, list(text_names or ["sentence"])
    # from_pretrained returns the model in eval mode and Lightning keeps each module's mode as it finds it:
    # without this, dropout would stay off during fine-tuning.
    model.train()
    return model, tokenizer


def draw_head(model: PreTrainedModel, seed: int) -> None:
    """New head weights drawn with seed (--model.head_seed), as transformers draws them (normal(0, initializer_range),
    zero bias), from a generator of its own: the global random state, and so the rest of the run, stays the same."""
    generator = torch.Generator().manual_seed(seed)
    head = [module for name, module in model.named_children() if name != model.base_model_prefix]
    for layer in (m for module in head for m in module.modules() if isinstance(m, torch.nn.Linear)):
        torch.nn.init.normal_(layer.weight, std=model.config.initializer_range, generator=generator)
        torch.nn.init.zeros_(layer.bias)


def check_pooling_and_freeze(model: PreTrainedModel, pooling: str, freeze_word_embeddings: bool) -> None:
    """Refuse mean pooling for a model with a head of its own; leave out of training what the recipe does not train."""
    if pooling == "mean":
        head_names = {name for name, _ in model.named_children()} - {model.base_model_prefix}
        if head_names != {"dropout", "classifier"} or not isinstance(model.classifier, torch.nn.Linear):
            raise OptionError(
                f"--model.pooling mean needs a BERT-style head (one linear layer on the pooled vector);"
                f" {type(model).__name__} has its own: use --model.pooling cls"
            )
        if getattr(model.base_model, "pooler", None) is not None:
            model.base_model.pooler.requires_grad_(False)  # unused: DDP fails on parameters without gradients
    if freeze_word_embeddings:
        # The word vectors are half of a small model's weights (11.7M of MiniLM-L6's 22.7M), and CoLA's 7.5k
        # training sentences touch few of the 30k words: moving those away from the rest cost 0.012 val MCC
        # over 3 seeds (README, Results), and steps are 4-7% faster without their gradient and AdamW update.
        model.get_input_embeddings().requires_grad_(False)


class TextClassifier(pl.LightningModule):
    """Sequence classifier (a text, or a pair) with GLUE's metrics and a fine-tuning recipe for small data.

    Args:
        model_name_or_path: a Hub id or a local directory of any BERT-family checkpoint.
        label_names: the labels, label 0 first (train.py links them from the data; None: CoLA's).
        text_names: the names of an example's text, or of the two of a pair (train.py links them from the data's
            text columns; None: CoLA's ["sentence"]); with the task, recorded in the model's config for inference.
        task: the task's name (train.py links it from --data.task), the config's finetuning_task.
        learning_rate: peak AdamW learning rate of the top encoder layer; None picks one by model size:
            2e-5 for BERT-base and larger (the BERT paper's CoLA recipe), 1e-4 for smaller models, which
            barely leave the majority class at 2e-5 (MiniLM-L6: val MCC 0.18 at 2e-5, 0.33 at 1e-4).
        weight_decay: AdamW decay on weight matrices; biases and LayerNorm weights get none.
        warmup_ratio: fraction of all optimizer steps spent warming up linearly, before linear decay to 0.
        layer_decay: layer-wise learning-rate decay: each layer below the top learns this much slower
            (1: one learning rate for all).
        head_learning_rate: learning rate of the new, randomly initialised classifier (None: learning_rate).
        pooling: how a sentence becomes one vector for the classifier: "cls" or "mean" (see sentence_logits).
        freeze_word_embeddings: keep the pretrained word vectors as they are (position and type vectors train).
        num_layers: keep only the first num_layers encoder layers (None: all). MiniLM-L6's first 4 of 6 train 1.5x
            and infer 1.4x faster, and scored no lower on CoLA (benchmarks/README.md, "Reading the middle layers").
        ema_decay: validate, checkpoint and export an exponential moving average of the weights with this
            decay (train.py adds callbacks.ExponentialMovingAverage; None: the weights as trained). A model
            option, so that checkpoints record it and a resume without it is refused.
        head_seed: start the new classifier head from weights drawn with this seed, whatever --seed_everything
            (which then sets only the data order and dropout); None: drawn from --seed_everything. Runs that
            share it start from one point and can be averaged (tune.py --soup); runs with their own random
            heads cannot.
        teacher: a checkpoint of this project (any model, size or tokenizer, trained on this task's labels) to learn
            from as well as from the labels: its outputs for the training examples (computed once, cached beside it)
            and the true labels mixed by distillation_loss. Recorded in checkpoints: a resume with another, or
            none, is refused.
        distill_weight: the teacher's share of the loss (0: the labels alone, 1: the teacher alone).
        distill_temperature: the temperature T both softmaxes are taken at (higher: softer, more of the
            teacher's view of the wrong labels). 0.5 and 2: the best of the points measured on CoLA (w 0.9 and
            w 1 at T 1 did worse; benchmarks/README.md, "Distillation"), where none beat training without a teacher.
        compile: run training steps' forward and backward passes through torch.compile (on CUDA with CUDA graphs,
            mode="reduce-overhead": one launch per step instead of hundreds of kernel launches); train.py then pads
            sentences to a few lengths (--data.pad_to_buckets) so that few shapes compile. Exports and
            checkpoints are those of the plain model.
    """

    def __init__(
        self,
        model_name_or_path: str = "google-bert/bert-base-uncased",
        label_names: Optional[list[str]] = None,
        text_names: Optional[list[str]] = None,
        task: str = "cola",
        learning_rate: Optional[float] = None,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        layer_decay: float = 1.0,
        head_learning_rate: Optional[float] = None,
        pooling: Literal["cls", "mean"] = "cls",
        freeze_word_embeddings: bool = False,
        num_layers: Optional[int] = None,
        ema_decay: Optional[float] = None,
        head_seed: Optional[int] = None,
        teacher: Optional[str] = None,
        distill_weight: float = 0.5,
        distill_temperature: float = 2.0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_options(model_name_or_path, learning_rate, weight_decay, warmup_ratio, layer_decay, head_learning_rate,
                      num_layers, ema_decay, distill_weight, distill_temperature, head_seed)
        self._distillation = (distill_weight, distill_temperature) if teacher else None
        self.label_names = list(label_names or LABEL_NAMES)
        self.save_hyperparameters()
        self.model, self.tokenizer = load_pretrained(model_name_or_path, self.label_names, num_layers, task, text_names)
        if head_seed is not None:
            draw_head(self.model, head_seed)
        if learning_rate is None:
            self.hparams.learning_rate = 2e-5 if self.model.config.hidden_size >= 768 else 1e-4
            # Again, with the rate resolved, so that hparams.yaml and checkpoints record the rate used, not null.
            # (An explicit dict: under LightningCLI a plain call would record the parsed arguments again.)
            self.save_hyperparameters(dict(self.hparams))
        check_pooling_and_freeze(self.model, pooling, freeze_word_embeddings)
        self.warmup_steps = 0  # set by configure_optimizers; early stopping waits for it (train.py)
        self._tokenizer_files: dict[str, str] = {}
        self._rng_states: dict | None = None  # from the checkpoint a run resumes from
        self._compiled_logits_and_loss = None  # made at the first step, once the device is known
        self.loss_guard = NonFiniteLossGuard()  # a NaN or infinite loss: AdamW skips the step, training stops
        self._make_validation_metrics(len(self.label_names))
        # Lightning's model summary counts FLOPs on this input (else it prints 0): one sentence of 16 tokens.
        tokens = torch.ones(1, 16, dtype=torch.long)
        self.example_input_array = ({"input_ids": tokens, "attention_mask": tokens, "labels": torch.zeros(1, dtype=torch.long)},)

    def _make_validation_metrics(self, n: int) -> None:
        # Epoch-level metrics: torchmetrics accumulates over the whole epoch and syncs across DDP ranks.
        # Two labels: F1 of label 1 (GLUE's, for MRPC and QQP) and a precision-recall curve; more: macro F1, no curve.
        self.val_metrics = MetricCollection(
            {"mcc": MatthewsCorrCoef(), "accuracy": BinaryAccuracy(), "f1": BinaryF1Score()} if n == 2 else
            {"mcc": MulticlassMatthewsCorrCoef(n), "accuracy": MulticlassAccuracy(n, average="micro"),
             "f1": MulticlassF1Score(n, average="macro")},
            prefix="val_",
        )
        # The same metrics for the validation examples whose group (--data.group_column) training saw, and the others.
        self.val_group_metrics = torch.nn.ModuleDict({part: self.val_metrics.clone(prefix=f"val_{part}_") for part in GROUP_PARTS})
        self.val_loss = MeanMetric()
        self.val_confusion = BinaryConfusionMatrix() if n == 2 else MulticlassConfusionMatrix(n)
        self.val_pr_curve = BinaryPrecisionRecallCurve(thresholds=101) if n == 2 else None  # binned: constant memory, cheap DDP sync

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, cross-entropy loss) of a batch with labels."""
        if not (self.hparams.compile and self.training):  # validation is short: not worth a second compilation
            return logits_and_loss(self.model, self.hparams.pooling, batch, self._distillation)
        if self._compiled_logits_and_loss is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs exist only there
            self._compiled_logits_and_loss = torch.compile(logits_and_loss, mode=mode)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous one's graph outputs are done with
        return self._compiled_logits_and_loss(self.model, self.hparams.pooling, batch, self._distillation)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, loss = self(batch)
        # Not in the progress bar: the bar would read the loss, waiting for the GPU, at every step.
        self.log("train_loss", loss, batch_size=batch["labels"].size(0))
        self.loss_guard.record(self, loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps
        if (every and self.global_step % every == 0) or self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.loss_guard.check(self)

    def on_train_end(self) -> None:
        self.loss_guard.check(self)  # a run cut short by --trainer.max_steps between two checks

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, loss = self(batch)
        labels = batch["labels"]
        probabilities = logits.float().softmax(dim=-1)
        scores = probabilities[:, 1] if probabilities.size(1) == 2 else probabilities  # two labels: label 1's
        self.val_loss.update(loss, weight=labels.size(0))
        for metric in filter(None, (self.val_metrics, self.val_confusion, self.val_pr_curve)):
            metric.update(scores, labels)
        self.log_dict(self.val_metrics, prog_bar=True)
        self.log("val_loss", self.val_loss, prog_bar=True)
        if GROUP_SEEN in batch:  # in every batch or none: the data module adds it when both parts have examples
            for part, metrics in self.val_group_metrics.items():
                keep = batch[GROUP_SEEN] == (part == "seen")
                if keep.any():  # torchmetrics refuses an empty update
                    metrics.update(scores[keep], labels[keep])
                self.log_dict(metrics)  # in every batch, so that every DDP process computes (a collective) at the end

    def on_validation_epoch_end(self) -> None:
        # compute() is a collective under DDP: every rank calls it; only rank zero draws.
        confusion, pr_curve = self.val_confusion.compute(), self.val_pr_curve and self.val_pr_curve.compute()
        self.val_confusion.reset()
        if self.val_pr_curve:
            self.val_pr_curve.reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                fig, _ = self.val_confusion.plot(confusion, labels=self.label_names)
                logger.experiment.add_figure("val/confusion_matrix", fig, self.current_epoch)
                if self.val_pr_curve:
                    fig, ax = self.val_pr_curve.plot(pr_curve)
                    ax.set_title(f"Precision-recall, positive class: {self.label_names[1]}")
                    logger.experiment.add_figure("val/precision_recall_curve", fig, self.current_epoch)

    def parameter_groups(self) -> list[dict]:
        return parameter_groups(self.model, self.hparams.learning_rate, self.hparams.layer_decay,
                                self.hparams.head_learning_rate, self.hparams.weight_decay)

    def configure_optimizers(self) -> dict:
        # fused: one kernel over all parameters, ~5x faster than the default per-tensor loop on CPU too.
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.learning_rate, fused=True)
        total_steps = self.trainer.estimated_stepping_batches
        self.warmup_steps = int(self.hparams.warmup_ratio * total_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, self.warmup_steps, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # No checkpoint records a run past a non-finite loss (its weights are intact, but its step and schedule moved on).
        self.loss_guard.check(self)
        # Everything inference needs without the network: architecture, label names, tokenizer.
        checkpoint["hf_config"] = self.model.config.to_dict()
        checkpoint["tokenizer_files"] = self.tokenizer_files()
        # Lightning saves no random state; dropout's is needed for a resumed run to train exactly like an
        # uninterrupted one. (Under DDP every process resumes from this, rank zero's, state.)
        checkpoint["rng_states"] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before Lightning loads the weights: its own errors would be tracebacks.
        where = self.trainer.ckpt_path if self._trainer else "checkpoint"
        check_same_weights(where, self.state_dict(), checkpoint["state_dict"], self.hparams.model_name_or_path)
        self._rng_states = checkpoint.get("rng_states")
        check_rng_states(where, self._rng_states)

    def on_train_start(self) -> None:
        # Set here rather than on loading, so that nothing Lightning does in between can draw from it.
        if self._rng_states:
            torch.set_rng_state(self._rng_states["cpu"])
            if "cuda" in self._rng_states and self.device.type == "cuda":
                torch.cuda.set_rng_state(self._rng_states["cuda"], self.device)
            self._rng_states = None

    def tokenizer_files(self) -> dict[str, str]:
        """The tokenizer's saved files (name -> text), computed once."""
        if not self._tokenizer_files:
            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer.save_pretrained(tmp)
                self._tokenizer_files = {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir()}
        return self._tokenizer_files


ColaModel = TextClassifier  # its name when it knew CoLA alone
