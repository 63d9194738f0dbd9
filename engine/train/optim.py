"""The optimizer and learning-rate schedule of a stage: AdamW over what trains now."""

from __future__ import annotations

import math

import torch


def lr_factor(schedule: str, step: int, steps: int, warmup: int, restarts: tuple[int, ...] | list[int] = ()) -> float:
    """The stage's lr at `step` as a share of its peak: `warmup` steps rising linearly, then the
    schedule's decay over the rest of the `steps`.

    `restarts` (``[stages.grow] schedule_after = "rewarm"``, LEMON's "same peak, faster decay"):
    the stage steps at which a growth happened. From the last restart r <= step on, the lr is
    back at the peak and decays with the same shape over the steps left, (step - r) / (steps - r)
    — the small model's peak, and a decay as many times faster as the remaining steps are fewer
    than the stage's. No warm-up again: the grown model continues a trained one. A constant
    schedule is the same either way."""
    last = max((r for r in restarts if r <= step), default=None)
    if last is not None:
        return _decay(schedule, (step - last) / max(1, steps - last))
    if warmup and step < warmup:
        return (step + 1) / warmup
    return _decay(schedule, (step - warmup) / max(1, steps - warmup))


def _decay(schedule: str, progress: float) -> float:
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def make_optimizer(model: torch.nn.Module, masked: set[int], train, stage, restarts: tuple[int, ...] = ()):
    """AdamW over the trainable parameters and the stage's schedule (restarting at the stage
    steps `restarts`, see ``lr_factor``). Biases, norms and tensors that train only their grown
    entries (`masked`: ids) get no weight decay, so the frozen entries stay exactly as they were."""
    lr = stage.lr or train.lr
    restarts = tuple(restarts)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in masked or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]] or [{"params": []}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(train.schedule, s, stage.steps, train.warmup_steps, restarts))
    return optimizer, scheduler


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Make `lr` the schedule's base rate (a resume with `--set train.lr=...`); a no-op when it
    already is, so an ordinary resume stays bit-exact."""
    if all(base == lr for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class Precision:
    """How the steps run numerically: autocast to the plan's dtype, and loss scaling for float16
    (its gradients underflow without it; bfloat16 and float32 need none)."""

    def __init__(self, dtype: str, device: torch.device):
        from engine.errors import WidenError

        if dtype == "float16" and device.type != "cuda":
            raise WidenError('train.dtype: "float16" needs a CUDA device — use "bfloat16" or "float32" on CPU')
        self.device_type = device.type
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")

    def autocast(self):
        if self.dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)
