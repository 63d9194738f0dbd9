"""A run's live state, folded from its events. Shared by `widen watch` and the TUI monitor.

Feed it events as they arrive (``update``); it keeps the latest figures, the curves and the
expansion reports, and estimates the ETA from the recent step rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RunProgress:
    run: str = ""
    plan: str = ""
    device: str = ""
    state: str = "queued"
    error: str | None = None
    stage: int = 0
    stage_name: str = ""
    task: str = ""
    stage_steps: list[int] = field(default_factory=list)
    step: int = 0
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    tokens: int = 0
    eval: dict[str, dict] = field(default_factory=dict)          # task -> latest eval
    train_curve: list[tuple[int, float]] = field(default_factory=list)   # (global step, loss)
    eval_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stage_bounds: list[int] = field(default_factory=list)        # global steps where stages begin
    expansions: list[dict] = field(default_factory=list)
    system: dict = field(default_factory=dict)
    started: float | None = None
    last_t: float | None = None          # time of the latest event (a finished run's end)
    _rate: list[tuple[float, int]] = field(default_factory=list)  # (time, global step) samples

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    @property
    def global_step(self) -> int:
        return sum(self.stage_steps[: self.stage]) + self.step

    def update(self, event: dict) -> None:
        kind = event.get("type")
        if isinstance(event.get("t"), (int, float)) and not event.get("cached"):
            self.last_t = max(self.last_t or 0.0, float(event["t"]))
        if kind == "start":
            self.run, self.plan, self.device = event["run"], event["plan"], event["device"]
            self.stage_steps = list(event.get("stage_steps", []))
            self.started = self.started or event["t"]
            self.state = "running"
        elif kind == "stage" and event["phase"] == "begin":
            self.stage, self.stage_name, self.task = event["stage"], event["name"], event["task"]
            self.step = 0
            bound = sum(self.stage_steps[: self.stage])
            if bound not in self.stage_bounds:
                self.stage_bounds.append(bound)
        elif kind == "step":
            self.stage, self.step = event["stage"], event["step"]
            self.loss, self.lr, self.tokens_per_s = event["loss"], event["lr"], event["tokens_per_s"]
            self.tokens = event["tokens"]
            self.train_curve.append((event["global_step"], event["loss"]))
            if not event.get("cached"):  # copied from a cached prefix: its times are not this run's pace
                self._rate = (self._rate + [(event["t"], event["global_step"])])[-20:]
        elif kind == "eval":
            self.eval[event["task"]] = event
            x = sum(self.stage_steps[: event["stage"]]) + event["step"] if event["stage"] >= 0 else 0
            self.eval_curves.setdefault(event["task"], []).append((x, event["ppl"]))
        elif kind == "expand":
            self.expansions.append(event)
        elif kind == "system":
            self.system = event
        elif kind == "status":
            self.state = event["state"]
            self.error = event.get("error")

    def seconds_per_step(self) -> float | None:
        """The recent pace, from the last step samples (None until there are two)."""
        if len(self._rate) < 2:
            return None
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (t1 - t0) / (s1 - s0)

    def eta_s(self) -> float | None:
        """Seconds left in the whole run, from the step rate over the last samples."""
        pace = self.seconds_per_step()
        if pace is None or not self.total_steps:
            return None
        return max(self.total_steps - self.global_step, 0) * pace

    def stage_eta_s(self) -> float | None:
        """Seconds left in the current stage."""
        pace = self.seconds_per_step()
        if pace is None or self.stage >= len(self.stage_steps):
            return None
        return max(self.stage_steps[self.stage] - self.step, 0) * pace

    def elapsed_s(self, now: float | None = None) -> float:
        """Seconds since the run started, until `now` (default: the clock)."""
        if not self.started:
            return 0.0
        return (time.time() if now is None else now) - self.started
