"""Events -> curves: the one model of a run's loss curves, shared by the PNG figures
(``widen_tui.views.plot``), the TUI's chart (``widgets.loss_chart``) and the Compare screen.

Pure Python: no matplotlib, no Textual, no torch. Events are the records of ``engine.runs.records``.

- ``curves_from_events(label, events)`` -> ``RunCurves``: step, eval, stage and expand events,
  deduplicated (a resumed run repeats what came after its checkpoint) and placed on a common
  global-step axis; ``CurveFolder`` builds the same thing incrementally for a live run.
- ``RunCurves`` answers where things sit on any x axis (``X_AXES``: steps, tokens, flops):
  ``train_series``, ``eval_series``, ``stage_marks``, ``expansion_marks``. Evals, stage begins and
  growths are ``Placed``: the event with the global step it sits at.
- ``downsample(points, max_points)``: min-max bucketing, so a long history stays cheap to draw
  and keeps its spikes.
- ``matrix_from_events(events)``: the evaluation (forgetting) matrix before results.json exists.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from engine.runs.events import latest_segment, voided_by
from engine.runs.records import (
    EvalEvent,
    EventRecord,
    ExpandEvent,
    ResumeEvent,
    StageEvent,
    StartEvent,
    StepEvent,
    is_number,
)

X_AXES = {"steps": "global step", "tokens": "tokens seen", "flops": "training FLOPs"}  # docs/flops.md

Point = tuple[float, float]


_num = is_number  # the name plot.py has always used (a finite int or float, not a bool)


def human(n: float) -> str:
    """131584 -> '132k', 2.5e6 -> '2.5M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            text = f"{n / div:.1f}".rstrip("0").rstrip(".") if abs(n) < 10 * div else f"{n / div:.0f}"
            return text + suffix
    return f"{n:g}"


@dataclass
class Mark:
    """A point of interest on a curve: a stage boundary or an expansion."""

    x: float
    y: float | None          # None for stage boundaries (a vertical line)
    label: str
    kind: str                # "stage" | "expansion" | "growth"
    params_added: int = 0
    trigger: str | None = None  # a growth: what fired it ("plateau", "at", "budget"; None: not recorded)


E = TypeVar("E", bound=EventRecord)


@dataclass(frozen=True)
class Placed(Generic[E]):
    """An event and the global step it sits at: its own, or its stage's start plus its step."""

    event: E
    g: float


@dataclass
class RunCurves:
    """One run's events, deduplicated and placed on a common global-step axis."""

    label: str
    stage_steps: dict[int, int] = field(default_factory=dict)
    stage_names: dict[int, str] = field(default_factory=dict)
    stage_begins: dict[int, Placed[StageEvent]] = field(default_factory=dict)  # phase begin, at its stage's start
    steps: list[StepEvent] = field(default_factory=list)        # by global step
    evals: list[Placed[EvalEvent]] = field(default_factory=list)
    expansions: list[ExpandEvent] = field(default_factory=list)   # stage-start operators
    growths: list[Placed[ExpandEvent]] = field(default_factory=list)  # with a trigger (mid-stage)
    _axis_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def offset(self, stage: int) -> int:
        """Global step at which `stage` begins (0 for the initial evaluation, stage -1)."""
        return sum(self.stage_steps.get(s, 0) for s in range(max(stage, 0)))

    def has(self, key: str) -> bool:
        """Whether every step event carries `key` (tokens / flops: older runs lack them)."""
        if key == "steps":
            return True
        if ("has", key) not in self._axis_cache:
            self._axis_cache[("has", key)] = all(e.number(key) is not None for e in self.steps)
        return self._axis_cache[("has", key)]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(p.event.task for p in self.evals))

    def _axis(self, key: str) -> tuple[list[float], list[float]]:
        # (global steps, key values) starting at (0, 0); cached: `at` is called per eval and mark
        if key not in self._axis_cache:
            xs, ys = [0.0], [0.0]
            for e in self.steps:
                xs.append(float(e.global_step))
                ys.append(float(getattr(e, key)))
            self._axis_cache[key] = (xs, ys)
        return self._axis_cache[key]

    def at(self, g: float, key: str) -> float:
        """`key` (tokens or flops) at global step `g`, interpolated between logged steps."""
        if key == "steps":
            return float(g)
        return _interp(float(g), *self._axis(key))

    def x_of(self, placed: Placed, key: str) -> float:
        """Where an eval, expand or stage event sits: its own tokens / flops when it carries them,
        else interpolated at its global step."""
        own = placed.event.number(key) if key != "steps" else None
        return float(own) if own is not None else self.at(placed.g, key)

    def stage_x(self, stage: int, key: str) -> float:
        begin = self.stage_begins.get(stage)
        return self.x_of(begin, key) if begin else self.at(self.offset(stage), key)

    def train_loss_at(self, g: float) -> float | None:
        if not self.steps:
            return None
        xs, ys = self._axis("loss")
        return _interp(g, xs[1:], ys[1:])

    # -- series for any chart ------------------------------------------------------------------
    def train_series(self, x: str = "steps") -> dict[int, list[Point]]:
        """Training loss per stage (a task switch is never joined by a line): stage -> points."""
        out: dict[int, list[Point]] = {}
        for e in self.steps:
            px = float(e.global_step) if x == "steps" else float(getattr(e, x))
            out.setdefault(e.stage, []).append((px, float(e.loss)))
        return out

    def eval_series(self, x: str = "steps", metric: str = "loss") -> dict[str, list[Point]]:
        """Held-out eval `metric` per task: task -> points."""
        out: dict[str, list[Point]] = {}
        for placed in self.evals:
            value = placed.event.number(metric)
            if value is not None:
                out.setdefault(placed.event.task, []).append((self.x_of(placed, x), float(value)))
        return out

    def stage_marks(self, x: str = "steps") -> list[Mark]:
        """Where each stage begins (vertical lines), with its name."""
        return [Mark(self.stage_x(s, x), None, name, "stage") for s, name in sorted(self.stage_names.items())]

    def expansion_marks(self, x: str = "steps") -> list[Mark]:
        """A mark per stage that applied operators (kind "expansion", at its start) and per
        growth (kind "growth", with the trigger that fired it), at the loss just after."""
        marks = []
        for stage in sorted({e.stage for e in self.expansions}):
            ops = [e for e in self.expansions if e.stage == stage]
            after = [e.loss_after for e in ops if is_number(e.loss_after)]
            y = after[-1] if after else self.train_loss_at(self.offset(stage))
            names = ", ".join(dict.fromkeys(e.op for e in ops))
            added = sum(e.params_added or 0 for e in ops)
            marks.append(Mark(self.stage_x(stage, x), y, names, "expansion", int(added)))
        for placed in self.growths:
            e = placed.event
            y = e.loss_after if is_number(e.loss_after) else self.train_loss_at(placed.g)
            tag = f"growth {e.growth + 1}" if e.growth is not None else "growth"  # 0-based
            trigger = e.trigger if isinstance(e.trigger, str) and e.trigger else None
            marks.append(Mark(self.x_of(placed, x), y, f"{e.op} ({tag})", "growth", int(e.params_added or 0),
                              trigger))
        return marks


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if not xs:
        return 0.0
    if x <= xs[0]:
        return ys[0]
    i = bisect_left(xs, x)
    if i >= len(xs):
        return ys[-1]
    x0, x1 = xs[i - 1], xs[i]
    return ys[i] if x1 == x0 else ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


class CurveFolder:
    """Builds ``RunCurves`` from events fed as they arrive (``add``); ``curves()`` is the same as
    ``curves_from_events`` over everything added so far. A ``resume`` event drops what was logged
    past its resume point (``engine.runs.events.voided_by``: the latest segment only); later copies win,
    and a resume that applies a stage's operators again keeps one set of them."""

    def __init__(self, label: str = ""):
        self.label = label
        self._stage_steps: dict[int, int] = {}
        self._stage_names: dict[int, str] = {}
        self._stage_begins: dict[int, StageEvent] = {}
        self._steps: dict[tuple, StepEvent] = {}
        self._evals: dict[tuple, EvalEvent] = {}
        self._growths: dict[tuple, ExpandEvent] = {}
        self._stage_ops: dict[int, tuple[int, list[ExpandEvent]]] = {}
        self._segment = 0
        self.version = 0  # bumped by every event that changes a curve: redraw only when it moves
        self.expand_events = 0  # expand events taken in (a table of them redraws when it moves)

    def add(self, events: Iterable[EventRecord]) -> None:
        for e in events:
            self._add(e)

    def _add(self, e: EventRecord) -> None:
        if isinstance(e, StartEvent):
            self._segment += 1
            for i, n in enumerate(e.stage_steps or []):
                if isinstance(n, int) and not isinstance(n, bool):
                    self._stage_steps.setdefault(i, n)
        elif isinstance(e, ResumeEvent):
            self._segment += 1
            self._resume(e)
        elif isinstance(e, StageEvent):
            self._stage_steps[e.stage] = e.steps
            self._stage_names[e.stage] = e.name or f"stage {e.stage + 1}"
            if e.phase == "begin":
                self._stage_begins[e.stage] = e
        elif isinstance(e, StepEvent) and is_number(e.loss):
            self._steps[(e.stage, e.step)] = e
        elif isinstance(e, EvalEvent) and is_number(e.loss):
            self._evals[(e.stage, e.step, e.task)] = e
        elif isinstance(e, ExpandEvent):
            self.expand_events += 1
            if e.trigger or e.global_step is not None:
                self._growths[(e.stage, e.global_step, e.growth, e.op)] = e
            else:
                seg, ops = self._stage_ops.get(e.stage, (self._segment, []))
                if seg != self._segment:
                    ops = []  # a resume re-applies the stage's operators: keep one set
                self._stage_ops[e.stage] = (self._segment, ops + [e])
        else:
            return
        self.version += 1

    def _resume(self, resume: ResumeEvent) -> None:
        """Drop the voided tail: steps, evals, growths, stage begins and operators past the point."""
        for store in (self._steps, self._evals, self._growths):
            for key in [k for k, e in store.items() if voided_by(e, resume)]:
                del store[key]
        for stage in [s for s, e in self._stage_begins.items() if voided_by(e, resume)]:
            del self._stage_begins[stage]
        for stage, (seg, ops) in list(self._stage_ops.items()):
            kept = [e for e in ops if not voided_by(e, resume)]
            if kept:
                self._stage_ops[stage] = (seg, kept)
            else:
                del self._stage_ops[stage]

    def curves(self) -> RunCurves:
        run = RunCurves(self.label, dict(self._stage_steps), dict(self._stage_names))

        def g_of(e: StepEvent | EvalEvent | ExpandEvent) -> float:
            g = e.global_step
            return g if is_number(g) else run.offset(e.stage) + (e.step or 0)

        # the records are shared, read-only; a copy only for a step without a finite global step
        run.steps = sorted((e if is_number(e.global_step) else e.model_copy(update={"global_step": g_of(e)})
                            for e in self._steps.values()), key=lambda e: e.global_step)
        run.evals = sorted((Placed(e, g_of(e)) for e in self._evals.values()), key=lambda p: p.g)
        run.stage_begins = {s: Placed(e, run.offset(s)) for s, e in self._stage_begins.items()}
        run.expansions = [e for _, (_, ops) in sorted(self._stage_ops.items()) for e in ops]
        run.growths = sorted((Placed(e, g_of(e)) for e in self._growths.values()), key=lambda p: p.g)
        return run


def curves_from_events(label: str, events: Sequence[EventRecord]) -> RunCurves:
    """Sort a run's events into curves (see ``CurveFolder``)."""
    folder = CurveFolder(label)
    folder.add(events)
    return folder.curves()


def downsample(points: Sequence[Point], max_points: int) -> list[Point]:
    """At most `max_points` of `points` (sorted by x), keeping the shape: the points are cut into
    max_points // 2 buckets of consecutive points and each bucket keeps its lowest and highest y
    (in x order), so spikes and dips survive. The first and last points are always kept."""
    points = list(points)
    if max_points <= 0:
        return []
    if len(points) <= max_points:
        return points
    if max_points < 4:
        return [points[0], points[-1]][:max_points]
    buckets = (max_points - 2) // 2
    ys = [p[1] for p in points]
    out = [points[0]]
    size = (len(points) - 2) / buckets
    for b in range(buckets):
        start, stop = 1 + int(b * size), 1 + int((b + 1) * size)
        if start >= stop:
            continue
        lo = min(range(start, stop), key=ys.__getitem__)
        hi = max(range(start, stop), key=ys.__getitem__)
        out.extend(points[i] for i in sorted({lo, hi}))
    out.append(points[-1])
    return out


def matrix_from_events(events: Sequence[EventRecord]) -> dict | None:
    """The evaluation matrix so far, from a run's events (before results.json exists): the
    initial evaluation, then the evaluations at each finished stage's end (step == its steps).
    Besides rows/tasks/loss/ppl/bpb it has "trained": the task each row's stage trained.
    Only the latest segment counts (a resumed run's voided stage ends are not finished)."""
    events = latest_segment(events)
    c = curves_from_events("", events)
    ends = dict(c.stage_steps)
    stages = [e for e in events if isinstance(e, StageEvent)]
    finished = sorted({e.stage for e in stages if e.phase == "end"})
    stage_tasks = {e.stage: e.task for e in stages}
    rows: list[tuple[str, dict[str, EvalEvent]]] = []
    trained: list[str | None] = []
    for stage in [-1] + finished:
        cells = {p.event.task: p.event for p in c.evals
                 if p.event.stage == stage and (stage < 0 or p.event.step == ends.get(stage))}
        if cells:
            rows.append(("initial" if stage < 0 else f"after {c.stage_names.get(stage, stage + 1)}", cells))
            trained.append(stage_tasks.get(stage))
    if not rows:
        return None
    tasks = list(dict.fromkeys(t for _, cells in rows for t in cells))
    out: dict = {"rows": [label for label, _ in rows], "tasks": tasks, "trained": trained}
    for metric in ("loss", "ppl", "bpb"):
        out[metric] = [[getattr(cells[t], metric) if t in cells else None for t in tasks] for _, cells in rows]
    return out
