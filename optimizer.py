"""What the model hands AdamW: parameter groups for fine-tuning (layer-wise learning-rate decay: each encoder layer
below the top learns layer_decay times slower; the new head at its own rate; no weight decay on biases and LayerNorm
weights; each group named for the model parts it holds), and the guard that skips its step on a non-finite loss."""

import re
from typing import TYPE_CHECKING, Optional

import torch
from transformers import PreTrainedModel

if TYPE_CHECKING:
    import pytorch_lightning as pl


def layer_depth(parameter_name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for encoder layer i, num_layers for the rest (pooler, head)."""
    match = re.search(r"\.layer\.(\d+)\.", parameter_name)
    if match:
        return int(match.group(1)) + 1
    return 0 if ".embeddings." in parameter_name else num_layers


def group_name(parts: list[str], all_parts: list[str]) -> str:
    """A parameter group's name from the model parts it holds, in all_parts' bottom-to-top order:
    "all", "embeddings", "layer_5..head" (a run of neighbours), "embeddings+head"."""
    if parts == all_parts:
        return "all"
    runs: list[list[str]] = []
    for part in parts:
        if runs and all_parts.index(part) == all_parts.index(runs[-1][-1]) + 1:
            runs[-1].append(part)
        else:
            runs.append([part])
    return "+".join(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}" for run in runs)


def parameter_groups(model: PreTrainedModel, learning_rate: float, layer_decay: float, head_learning_rate: Optional[float],
                     weight_decay: float) -> list[dict]:
    """AdamW groups: one per (learning rate, weight decay) pair that the recipe gives parameters, each named
    for the model parts it holds ("-no_decay" without weight decay), so that LearningRateMonitor's charts
    say what they show: `lr-AdamW/layer_3`, not `lr-AdamW/pg4`."""
    num_layers = model.config.num_hidden_layers
    part_order = ["embeddings", *(f"layer_{i}" for i in range(num_layers)), "pooler", "head"]  # bottom to top
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(model.base_model_prefix + "."):
            depth = layer_depth(name, num_layers)
            lr = learning_rate * layer_decay ** (num_layers - depth)
            part = "pooler" if depth == num_layers and ".layer." not in name else part_order[depth]
        else:  # the classifier head, new
            lr, part = head_learning_rate or learning_rate, "head"
        decay = weight_decay if param.dim() >= 2 else 0.0  # none on biases and LayerNorm
        group = groups.setdefault((lr, decay), {"params": [], "lr": lr, "weight_decay": decay, "parts": []})
        group["params"].append(param)
        if part not in group["parts"]:
            group["parts"].append(part)
    present = [part for part in part_order if any(part in g["parts"] for g in groups.values())]
    for group in groups.values():
        parts = sorted(group.pop("parts"), key=part_order.index)
        group["name"] = group_name(parts, present) + ("" if group["weight_decay"] else "-no_decay")
    return list(groups.values())


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops before that step reaches the weights."""


class NonFiniteLossGuard:
    """A NaN or infinite loss would make every weight NaN at its step's optimizer step. Reading the loss at every step
    to stop would make the CPU wait for the GPU, so the decision stays on the device: the fused AdamW skips its whole
    update (weights, moments, step count) while its found_inf is 1, as it does for a GradScaler, and found_inf stays 1
    from the first non-finite loss on (record). The flags are read, and training stopped, where Lightning reads values
    anyway: every log_every_n_steps, at an epoch's end and before any checkpoint is saved (check)."""

    def __init__(self) -> None:
        self.skip_updates: Optional[torch.Tensor] = None  # 1.0 on the device from the first non-finite loss on
        self.unread: list[tuple[int, int, torch.Tensor]] = []  # (epoch, step, flag) of each step since the last check

    def record(self, module: "pl.LightningModule", loss: torch.Tensor) -> None:
        bad = (~loss.detach().isfinite()).float()
        if module.trainer.world_size > 1:  # all processes skip together: their gradients are averaged
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # queued on the device, no wait
        self.skip_updates = bad if self.skip_updates is None else torch.maximum(self.skip_updates, bad)
        module.trainer.optimizers[0].found_inf = self.skip_updates
        self.unread.append((module.current_epoch, module.global_step + 1, bad))

    def check(self, module: "pl.LightningModule") -> None:
        """Raise NonFiniteLossError, naming the first step whose loss was NaN or infinite, if one was since the last
        check. One wait for the device; the same answer on every DDP process (the flags were reduced)."""
        if not self.unread:
            return
        unread, self.unread = self.unread, []
        flags = torch.stack([flag for *_, flag in unread]).tolist()
        if not any(flags):
            return
        epoch, step, _ = unread[flags.index(1.0)]
        best = getattr(module.trainer.checkpoint_callback, "best_model_path", "") or "none saved yet"
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at epoch {epoch}, step {step}; training"
            f" stopped before that step changed the weights, and the best checkpoint so far is untouched ({best})."
            " Try a lower --model.learning_rate, or --trainer.precision bf16-mixed or 32-true instead of 16-mixed"
        )
