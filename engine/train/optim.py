"""The optimizer and learning-rate schedule of a stage: AdamW over what trains now."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.grow.apply import takes_weight_decay
from engine.plan.schema import WSD_DECAY_FRACTION, WSD_DECAY_SHAPE


@dataclass(frozen=True)
class LrSchedule:
    """A stage's learning rate as a share of its peak, step by step (``factor``).

    - ``constant``, ``linear``, ``cosine``: `warmup` steps rising linearly, then the schedule's decay
      over the rest of the `steps` (linear to 0, cosine to 0.1 of the peak).
    - ``wsd`` (warmup-stable-decay; MiniCPM, Hägele et al. 2024): the warm-up, then the peak held
      (the stable phase), then a decay to 0 over the last `decay_fraction` of the stage's steps,
      shaped `decay_shape`: linear 1 - p, cosine (1 + cos πp)/2, or sqrt 1 - √p (p: the share of the
      decay done). The decay's length is fixed by the stage, not by its growths: a growth during
      the stable phase keeps it.

    `restarts` (``[stages.grow] schedule_after = "rewarm"``): the stage steps at which a growth
    went back to the peak. From the last restart r <= step on:

    - constant / linear / cosine (LEMON's "same peak, faster decay"): the decay starts again at r
      and runs over the steps left, progress (step - r) / (steps - r);
    - wsd: the peak again until the decay's first step, then the same decay; a restart inside the
      decay runs the decay again over the steps left.

    `rewarm_steps` (SPARKLING's re-warm-up): after a restart the lr climbs linearly from 0 to that
    value over that many steps instead of jumping back (0: the jump, LEMON's rule). No warm-up of
    `warmup` again: the grown model continues a trained one."""

    kind: str
    steps: int
    warmup: int = 0
    restarts: tuple[int, ...] = ()
    decay_fraction: float = WSD_DECAY_FRACTION
    decay_shape: str = WSD_DECAY_SHAPE
    rewarm_steps: int = 0

    @property
    def decay_start(self) -> int:
        """wsd: the first step of the decay (the stable phase ends there)."""
        return self.steps - max(1, round(self.decay_fraction * self.steps))

    def factor(self, step: int) -> float:
        last = max((r for r in self.restarts if r <= step), default=None)
        if last is not None:
            ramp = min(1.0, (step - last + 1) / self.rewarm_steps) if self.rewarm_steps else 1.0
            return ramp * self._after(step, restart=last)
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        return self._after(step, restart=None)

    def _after(self, step: int, restart: int | None) -> float:
        """The share of the peak past the warm-up (or since `restart`)."""
        if self.kind == "wsd":
            start = self.decay_start if restart is None or restart < self.decay_start else restart
            if step < start:
                return 1.0
            return _shape(self.decay_shape, (step - start) / max(1, self.steps - start))
        begin = self.warmup if restart is None else restart
        return _decay(self.kind, (step - begin) / max(1, self.steps - begin))


def stage_schedule(train, stage, restarts=()) -> LrSchedule:
    """The plan's schedule for `stage` (``[train]`` schedule settings, the stage's growth's
    re-warm-up), restarting at the stage steps `restarts`."""
    grow = getattr(stage, "grow", None)
    wsd = {"decay_fraction": train.decay_fraction, "decay_shape": train.decay_shape}  # None but under wsd
    return LrSchedule(train.schedule, stage.steps, train.warmup_steps, tuple(restarts),
                      rewarm_steps=grow.rewarm_steps if grow is not None else 0,
                      **{k: v for k, v in wsd.items() if v is not None})


def _shape(shape: str, progress: float) -> float:
    """wsd's decay from 1 to 0 as `progress` goes from 0 to 1."""
    p = min(1.0, max(0.0, progress))
    if shape == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if shape == "sqrt":
        return 1.0 - math.sqrt(p)
    return 1.0 - p


def _decay(schedule: str, progress: float) -> float:
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def weight_decay_groups(model: torch.nn.Module, masked, weight_decay: float) -> list[dict]:
    """AdamW's groups over what trains: `weight_decay` where ``takes_weight_decay``, 0 elsewhere
    (no empty group)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if takes_weight_decay(p, masked) else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def make_optimizer(model: torch.nn.Module, masked: set[int], train, stage, restarts: tuple[int, ...] = (), *,
                   view=None, base_depth: int | None = None):
    """AdamW over the trainable parameters and the stage's schedule (restarting at the stage
    steps `restarts`, see ``LrSchedule``). Biases, norms and tensors that train only their grown
    entries (`masked`: ids) get no weight decay, so the frozen entries stay exactly as they were.

    Under ``train.residual_scaling = "depth_mup"`` the groups are depth scaling's
    (``engine.train.depth_scaling.param_groups``: each with its own lr, eps and weight decay and
    its ``lr_scale``), over `view` (default: the model's) at `base_depth` (default:
    ``train.residual_base_depth``, else the model's depth now)."""
    lr = stage.lr or train.lr
    restarts = tuple(restarts)
    if train.residual_scaling == "depth_mup":
        from engine.model.view import ArchView
        from engine.train import depth_scaling

        view = view if view is not None else ArchView.of(model)
        base = base_depth or depth_scaling.base_depth(train, view)
        groups = depth_scaling.param_groups(model, view, train, masked, base, lr)
    else:
        groups = weight_decay_groups(model, masked, train.weight_decay)
    optimizer = torch.optim.AdamW(groups or [{"params": []}], lr=lr)
    schedule = stage_schedule(train, stage, restarts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.factor(s))
    return optimizer, scheduler


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Make `lr` the schedule's base rate (a resume with `--set train.lr=...`): each group's base
    rate is `lr` times its ``lr_scale`` (depth scaling's groups; 1 elsewhere). A no-op when they
    already are, so an ordinary resume stays bit-exact."""
    bases = [lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    if list(scheduler.base_lrs) == bases:
        return
    scheduler.base_lrs = bases
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, bases):
        group["initial_lr"] = base
        group["lr"] = base * factor
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
