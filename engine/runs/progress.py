"""A run's live state, folded from its events. Shared by `widen watch` and the TUI monitor.

Feed it events as they arrive (``update``); it keeps the latest figures, the curves and the
expansion reports, and estimates the ETA from the recent step rate. A ``resume`` event drops what
the run logged past its resume point (``engine.runs.events.voided_by``), so a resumed run's curves
never rewind. Between steps it keeps what the worker says it is busy with (``activity``: the latest
``progress`` event — loading, tokenizing, evaluating) until a step, eval, stage or status event
shows that part is over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.runs.events import voided_by
from engine.runs.records import (
    EvalEvent,
    EventRecord,
    ExpandEvent,
    ExpertsEvent,
    ProgressEvent,
    RankRow,
    RanksEvent,
    ResumeEvent,
    StageEvent,
    StartEvent,
    StatusEvent,
    StepEvent,
    SystemEvent,
)


@dataclass
class RunProgress:
    run: str = ""
    plan: str = ""
    device: str = ""
    world_size: int = 1            # processes under torchrun
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
    eval: dict[str, EvalEvent] = field(default_factory=dict)     # task -> latest eval
    train_curve: list[tuple[int, float]] = field(default_factory=list)   # (global step, loss)
    eval_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stage_bounds: list[int] = field(default_factory=list)        # global steps where stages begin
    expansions: list[ExpandEvent] = field(default_factory=list)
    system: SystemEvent | None = None                   # the latest sample
    experts: ExpertsEvent | None = None                 # a mixture of experts: the latest routing window
    ranks: list[RankRow] = field(default_factory=list)  # the latest `ranks` event's rows, by rank
    ranks_at: tuple[int, int] | None = None            # (stage, step) they were measured at
    started: float | None = None
    last_t: float | None = None          # time of the latest event (a finished run's end)
    activity: ProgressEvent | None = None  # what the worker is busy with between steps; None: training (or ended)
    activity_since: float | None = None    # when it began (the first event of that phase and `what`)
    _rate: list[tuple[float, int]] = field(default_factory=list)  # (time, global step) samples
    _evals: list[EvalEvent] = field(default_factory=list)  # every eval event of the latest segment
    _segment: int = 0                                      # bumped by start and resume events
    _expansion_segments: dict[int, int] = field(default_factory=dict)  # stage -> segment of its ops

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    @property
    def global_step(self) -> int:
        return sum(self.stage_steps[: self.stage]) + self.step

    def update(self, event: EventRecord) -> None:
        if isinstance(event.t, (int, float)) and not event.cached:
            self.last_t = max(self.last_t or 0.0, float(event.t))
        if isinstance(event, ProgressEvent):
            self._progress(event)
        elif isinstance(event, StartEvent | StepEvent | EvalEvent | StageEvent | StatusEvent | ResumeEvent):
            self.activity = self.activity_since = None  # the part it reported on is over
        if isinstance(event, StartEvent):
            self.run, self.plan, self.device = event.run, event.plan, event.device
            world = event.world_size
            self.world_size = world if isinstance(world, int) and not isinstance(world, bool) and world > 0 else 1
            self.stage_steps = [int(n) for n in event.stage_steps or [] if isinstance(n, int)]
            self.started = self.started or event.t
            self.ranks, self.ranks_at = [], None  # a resume may run on another number of processes
            self.state = "running"
            self.error = None
            self._segment += 1
        elif isinstance(event, ResumeEvent):
            self._resume(event)
        elif isinstance(event, StageEvent) and event.phase == "begin":
            self.stage, self.stage_name, self.task = event.stage, event.name, event.task
            self.step = 0
            bound = sum(self.stage_steps[: self.stage])
            if bound not in self.stage_bounds:
                self.stage_bounds.append(bound)
        elif isinstance(event, StepEvent):
            self.stage, self.step = event.stage, event.step
            self.loss, self.lr, self.tokens_per_s = event.loss, event.lr, event.tokens_per_s
            self.tokens = event.tokens or 0
            if event.loss is not None:
                self.train_curve.append((event.global_step, event.loss))
            if not event.cached:  # copied from a cached prefix: its times are not this run's pace
                self._rate = (self._rate + [(event.t, event.global_step)])[-20:]
        elif isinstance(event, EvalEvent):
            self.eval[event.task] = event
            self._evals.append(event)
            if event.ppl is not None:
                self.eval_curves.setdefault(event.task, []).append((self._eval_x(event), event.ppl))
        elif isinstance(event, ExpandEvent):
            if not event.trigger:  # a resume that applies a stage's operators again: one set
                seen = self._expansion_segments.get(event.stage)
                if seen is not None and seen != self._segment:
                    self.expansions = [e for e in self.expansions if e.trigger or e.stage != event.stage]
                self._expansion_segments[event.stage] = self._segment
            self.expansions.append(event)
        elif isinstance(event, SystemEvent):
            self.system = event
        elif isinstance(event, ExpertsEvent):
            self.experts = event
        elif isinstance(event, RanksEvent):
            self.ranks = sorted(event.ranks, key=lambda r: r.rank)
            self.ranks_at = (event.stage, event.step)
        elif isinstance(event, StatusEvent):
            self.state = event.state
            self.error = event.error

    def _progress(self, event: ProgressEvent) -> None:
        if event.cached:
            return  # a cached prefix's: its loading and evaluations were another run's
        self.state, self.error = "running", None  # a worker at work (before `start`, which needs the model)
        same = self.activity is not None and (self.activity.phase, self.activity.what) == (event.phase, event.what)
        if not same:
            self.activity_since = event.t
        self.activity = event

    def activity_s(self, now: float | None = None) -> float | None:
        """Seconds the current activity has lasted until `now` (default: the clock); None without one."""
        if self.activity is None or self.activity_since is None:
            return None
        return max((time.time() if now is None else now) - self.activity_since, 0.0)

    def _eval_x(self, event: EvalEvent) -> int:
        return sum(self.stage_steps[: event.stage]) + event.step if event.stage >= 0 else 0

    def _resume(self, resume: ResumeEvent) -> None:
        """Forget what the run logged past the resume point: it is done again from there."""
        self._segment += 1
        self.state, self.error = "running", None
        self.ranks, self.ranks_at = [], None
        g = resume.global_step
        self.train_curve = [(x, y) for x, y in self.train_curve if x <= g]
        self._evals = [e for e in self._evals if not voided_by(e, resume)]
        self.eval, self.eval_curves = {}, {}
        for e in self._evals:
            self.eval[e.task] = e
            if e.ppl is not None:
                self.eval_curves.setdefault(e.task, []).append((self._eval_x(e), e.ppl))
        self.expansions = [e for e in self.expansions if not voided_by(e, resume)]
        if self.experts is not None and voided_by(self.experts, resume):
            self.experts = None  # the resumed steps write the next one
        self.stage_bounds = [b for b in self.stage_bounds if b <= g]
        self.stage, self.step = resume.stage, resume.step
        self._rate = []  # the pace before the resume is not this process's

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
