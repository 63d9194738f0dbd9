"""When a stage grows: one small class per ``[stages.grow] trigger``, behind one interface.

Every trigger is fed a ``Progress`` after each optimizer step (``update``: True = "grow now"),
fires at most once per update and at most ``max_growths`` times, and keeps plain-number counters
(``state_dict`` / ``load_state_dict``) so a resumed stage continues where it was. Settings come
from the plan (``engine.plan.GrowSpec``), never from the saved state.

- ``plateau`` (PlateauDetector): the loss stopped improving — ReduceLROnPlateau's test on the
  mean training loss of each `check_interval` steps (Progress.loss; None between checks).
- ``at`` (AtTrigger): at fixed points, in stage steps (`at_steps`) or tokens seen by the run
  (`at_tokens`), as G_stack and Staged Training schedule their growths.
- ``budget`` (BudgetTrigger): when shares `at_fractions` of a compute budget `budget_flops` are
  spent (the run's training FLOPs, the loop's ``history.flops``).

No torch here: the plan checker, the CLI and a Hugging Face Trainer callback can import it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AtTrigger", "BudgetTrigger", "PlateauDetector", "Progress", "TRIGGERS", "make_trigger"]


@dataclass(frozen=True)
class Progress:
    """Where training is, after an optimizer step: what every trigger may read."""

    step: int                   # optimizer steps done in this stage
    tokens: int = 0             # training tokens seen by the run so far
    flops: float = 0.0          # training FLOPs spent by the run so far
    loss: float | None = None   # mean training loss of the check interval ending here; None between checks


class GrowthTrigger:
    """The interface: `kind`, `max_growths`, `growths` (fired so far), `update`, state."""

    kind = ""
    _STATE: tuple[str, ...] = ("growths",)

    def __init__(self, max_growths: int):
        if max_growths < 0:
            raise ValueError("max_growths must be >= 0")
        self.max_growths = max_growths
        self.growths = 0

    @property
    def exhausted(self) -> bool:
        """No growth left: later updates never fire."""
        return self.growths >= self.max_growths

    def update(self, progress) -> bool:
        raise NotImplementedError

    def _fire(self) -> bool:
        if self.exhausted:
            return False
        self.growths += 1
        return True

    def state_dict(self) -> dict:
        """Counters only (settings come from the plan); plain Python numbers, JSON-safe."""
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for key in self._STATE:
            setattr(self, key, type(getattr(self, key))(state[key]))


class PlateauDetector(GrowthTrigger):
    """ReduceLROnPlateau's test (mode "min") deciding when to grow.

    `update(value)` returns True at exactly the checks at which
    ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", patience, threshold,
    threshold_mode=mode, cooldown)`` would reduce the learning rate, with two additions: the
    first `warmup_checks` values are ignored altogether (not even counted towards the best — the
    loss right after a task switch or a growth says little), and at most `max_growths` checks
    trigger. An improvement is value < best·(1 - threshold) ("rel") or value < best - threshold
    ("abs"); after more than `patience` checks without one it triggers, then `cooldown` checks
    count no bad checks. A NaN never improves. `value`: a number (0-dim tensors too) or a
    Progress, whose `loss` is the check's value (None: not a check, nothing counted)."""

    kind = "plateau"
    _STATE = ("checks", "best", "num_bad", "cooldown_counter", "growths")

    def __init__(self, patience: int = 3, threshold: float = 0.01, mode: str = "rel", cooldown: int = 0,
                 warmup_checks: int = 0, max_growths: int = 1):
        if mode not in ("rel", "abs"):
            raise ValueError(f"mode: \"rel\" or \"abs\", got {mode!r}")
        if patience < 0 or cooldown < 0 or warmup_checks < 0 or max_growths < 0:
            raise ValueError("patience, cooldown, warmup_checks and max_growths must be >= 0")
        super().__init__(max_growths)
        self.patience, self.threshold, self.mode = patience, threshold, mode
        self.cooldown, self.warmup_checks = cooldown, warmup_checks
        self.checks = 0                # updates so far (warm-up included)
        self.best = math.inf
        self.num_bad = 0               # ReduceLROnPlateau's num_bad_epochs
        self.cooldown_counter = 0

    @classmethod
    def from_spec(cls, spec) -> "PlateauDetector":
        """From an engine.plan.GrowSpec."""
        return cls(patience=spec.patience, threshold=spec.threshold, mode=spec.mode, cooldown=spec.cooldown,
                   warmup_checks=spec.warmup_checks, max_growths=spec.max_growths)

    @classmethod
    def for_stage(cls, grow, state: dict | None = None) -> "PlateauDetector":
        """The detector of a stage's `[stages.grow]` settings, continuing from a saved `state`."""
        detector = cls.from_spec(grow)
        if state:
            detector.load_state_dict(state)
        return detector

    def is_better(self, value: float) -> bool:
        if self.mode == "rel":
            return value < self.best * (1.0 - self.threshold)
        return value < self.best - self.threshold

    def update(self, value) -> bool:
        """Record one check's value; True means "grow now"."""
        if isinstance(value, Progress):
            if value.loss is None:
                return False
            value = value.loss
        value = float(value)
        self.checks += 1
        if self.checks <= self.warmup_checks:
            return False
        if self.is_better(value):
            self.best, self.num_bad = value, 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            self.cooldown_counter, self.num_bad = self.cooldown, 0
            return self._fire()
        return False


class AtTrigger(GrowthTrigger):
    """Fires when a measure of progress reaches the next of increasing `points`: stage steps
    (`unit = "steps"`: at the update after step s, so the growth sits between steps s and s+1),
    tokens seen by the run ("tokens") or FLOPs spent ("flops"). One growth per update: points
    closer than one step's worth fire on successive updates. max_growths = len(points)."""

    kind = "at"
    UNITS = {"steps": "step", "tokens": "tokens", "flops": "flops"}  # unit -> Progress field

    def __init__(self, points: list[float], unit: str = "steps"):
        if unit not in self.UNITS:
            raise ValueError(f"unit: one of {', '.join(self.UNITS)}, got {unit!r}")
        if any(b <= a for a, b in zip(points, points[1:])):
            raise ValueError(f"points must increase strictly, got {list(points)}")
        super().__init__(len(points))
        self.points, self.unit = list(points), unit

    @property
    def next_point(self) -> float | None:
        return None if self.exhausted else self.points[self.growths]

    def update(self, progress: Progress) -> bool:
        point = self.next_point
        if point is None or getattr(progress, self.UNITS[self.unit]) < point:
            return False
        return self._fire()


class BudgetTrigger(AtTrigger):
    """Fires when the run has spent each share of `at_fractions` of `budget_flops` (its training
    FLOPs as the loop counts them): AtTrigger on FLOPs at fraction × budget."""

    kind = "budget"

    def __init__(self, budget_flops: float, fractions: list[float]):
        if not budget_flops > 0:
            raise ValueError(f"budget_flops must be > 0, got {budget_flops!r}")
        if any(not 0 < f < 1 for f in fractions):
            raise ValueError(f"fractions lie in (0, 1), got {list(fractions)}")
        super().__init__([f * budget_flops for f in fractions], unit="flops")
        self.budget_flops, self.fractions = budget_flops, list(fractions)


def _at(grow) -> AtTrigger:
    if grow.at_steps is not None:
        return AtTrigger(grow.at_steps, "steps")
    return AtTrigger(grow.at_tokens, "tokens")


TRIGGERS = {
    "plateau": PlateauDetector.from_spec,
    "at": _at,
    "budget": lambda grow: BudgetTrigger(grow.budget_flops, grow.at_fractions),
}


def make_trigger(grow, state: dict | None = None) -> GrowthTrigger:
    """The trigger of a stage's `[stages.grow]` settings (engine.plan.GrowSpec), continuing from
    a saved `state` (its ``state_dict()``)."""
    trigger = TRIGGERS[grow.trigger](grow)
    if state:
        trigger.load_state_dict(state)
    return trigger
