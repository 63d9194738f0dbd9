"""Divergence: a step whose loss or gradient norm is not finite, or whose loss exploded.

Such a run stops before anything non-finite is saved (checkpoints check their weights too), so
its last checkpoint is a good one and ``widen resume RUN --set train.lr=...`` continues from it.
"""

from __future__ import annotations

import math

import torch

from engine.errors import WidenError

# A training loss above this many times that of guessing uniformly (ln vocab) is divergence too:
# no model that still learns gets there, and such a run goes on with finite garbage for a long
# time before anything overflows (tiny-neo at lr 1e4: losses of 1e10 for 200 steps, never NaN).
DIVERGED_LOSS_FACTOR = 20.0


class Diverged(WidenError):
    def __init__(self, stage: int, step: int, what: str, run_id: str = "RUN"):
        self.stage, self.step = stage, step
        super().__init__(f"diverged at stage {stage} step {step}: {what} — the last checkpoint is kept; "
                         f"continue with a lower learning rate: widen resume {run_id} --set train.lr=...")


class DivergenceWatch:
    """The divergence check of one stage's steps, read on the host once per window: each step's
    loss and gradient norm stay on the device (``add``: no sync), and ``check`` reads the whole
    window at once and raises Diverged at its first bad step. The loop checks at every log step,
    before an evaluation, a growth or a checkpoint, and at the stage's end, so on a GPU the step
    loop waits for the device once per ``log_interval``, and nothing non-finite is ever saved."""

    def __init__(self, stage: int, run_id: str):
        self.stage, self.run_id = stage, run_id
        self._steps: list[int] = []
        self._values: list[torch.Tensor] = []   # per step: [loss, gradient norm (NaN-free 0 if none)]
        self._vocab = 2

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, vocab: int, step: int) -> None:
        values = loss.detach().float().reshape(1)
        norm = grad_norm.detach().float().reshape(1).to(values.device) if grad_norm is not None \
            else torch.zeros_like(values)
        self._values.append(torch.cat([values, norm]))
        self._steps.append(step)
        self._vocab = vocab

    def check(self) -> float | None:
        """Raise Diverged at the window's first bad step; forget the window when all are good.
        Returns the last step's loss as read (None for an empty window), for the step event."""
        if not self._values:
            return None
        window = torch.stack(self._values).cpu()  # the window's one read from the device
        steps = self._steps
        self._values, self._steps = [], []
        bound = DIVERGED_LOSS_FACTOR * math.log(max(self._vocab, 2))
        bad = ~torch.isfinite(window).all(dim=1) | (window[:, 0] > bound)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            check_step(window[first, 0], window[first, 1], self._vocab, self.stage, steps[first], self.run_id)
        return float(window[-1, 0])


def check_step(loss: torch.Tensor, grad_norm: torch.Tensor | None, vocab: int, stage: int, step: int,
               run_id: str) -> None:
    """Raise Diverged unless the loss (and the gradient norm, when given) is finite and the loss
    at most DIVERGED_LOSS_FACTOR·ln(vocab), naming what is wrong. The loop checks a window of
    steps at once (DivergenceWatch), which calls this with the first bad step's values."""
    values = loss.detach().float().reshape(1)
    if grad_norm is not None:
        values = torch.cat([values, grad_norm.detach().float().reshape(1).to(values.device)])
    bound = DIVERGED_LOSS_FACTOR * math.log(max(vocab, 2))
    if bool(torch.isfinite(values).all()) and float(values[0]) <= bound:
        return
    loss_value = float(values[0])
    if not math.isfinite(loss_value):
        raise Diverged(stage, step, f"the loss is {loss_value}", run_id)
    if loss_value > bound:
        raise Diverged(stage, step, f"the loss is {loss_value:.3g}, above {DIVERGED_LOSS_FACTOR:g}·ln(vocab "
                       f"{vocab}) = {bound:.1f}", run_id)
    raise Diverged(stage, step, f"the gradient norm is {float(values[1])}", run_id)
