"""The run monitor's view-model: everything it shows of one run, folded from its records,
status.json and results.json (no Textual here; widen_tui.tui.screens.monitor draws it).

``LiveRun.fold`` takes what the follower (``engine.runs.follow``) read and returns the new event
log lines; ``forgetting()`` is the Forgetting tab's table (``engine.runs.forgetting.matrix_for``:
results.json's matrix at the end, the stage-end evaluations while the run goes on),
``expansion_rows()`` the Expansions tab's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.runs.curves import CurveFolder, is_number
from engine.runs.forgetting import matrix_for
from engine.runs.progress import RunProgress
from engine.runs.records import (
    EvalEvent,
    EventRecord,
    ExpandEvent,
    ExpertsEvent,
    ProgressEvent,
    RanksEvent,
    ResumeEvent,
    StageEvent,
    StepEvent,
    SystemEvent,
)
from widen_tui.views.event_text import describe_event
from widen_tui.views.report import fmt_duration

STEP_LOG_EVERY_S = 5.0  # step lines in the log: one per this much run time (and each stage's last)


@dataclass(frozen=True)
class ForgettingTable:
    """The Forgetting tab: `values[row][task]` of `metric` (bits per byte when the matrix has them,
    else loss), the task each row's stage trained, absolute forgetting per task."""

    source: str                       # "results.json" | "evaluations so far"
    metric: str
    rows: list[str]
    tasks: list[str]
    values: list[list]
    trained: list[str | None]
    forgetting: dict[str, float | None]
    continual: dict = field(default_factory=dict)   # results.json's ACC / BWT / FWT


@dataclass(frozen=True)
class ExpansionRow:
    """One row of the Expansions tab: an operator at a stage start, or one of a growth."""

    event: ExpandEvent
    g: float          # the global step it happened at
    growth: bool      # a growth mid-stage (a trigger fired), not a stage's operators


class LiveRun:
    """Everything the monitor shows, folded from events, status.json and results.json."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.info: dict = {}
        self.progress = RunProgress()
        self.curves = CurveFolder(run_id)
        self.status: dict = {"state": "queued"}
        self.results: dict | None = None
        self.events_read = 0
        self._matrix_events: list[EventRecord] = []  # eval, stage and resume events: all the forgetting table needs
        self.matrix_version = 0
        self._last_step_logged: float | None = None

    @property
    def state(self) -> str:
        return str(self.status.get("state") or self.progress.state)

    @property
    def label(self) -> str:
        return str(self.info.get("name") or self.run_id)

    def fold(self, events: list[EventRecord], status: dict | None = None, results: dict | None = None,
             info: dict | None = None) -> list[str]:
        """Take in what the follower read; returns the new event-log lines."""
        if info:
            self.info = info
            self.curves.label = self.label
        if status:
            self.status = status
        if results:
            self.results = results
            self.matrix_version += 1
        lines = []
        for e in events:
            self.events_read += 1
            try:
                self.progress.update(e)
            except (KeyError, TypeError, IndexError):
                pass  # an event from another version of the engine: show what can be shown
            self.curves.add([e])
            if isinstance(e, EvalEvent | StageEvent | ResumeEvent):  # a resume voids rows past its point
                self._matrix_events.append(e)
                # rows appear when a stage begins (the initial evaluation) or ends: redraw then only
                self.matrix_version += isinstance(e, StageEvent)
            line = self._log_line(e)
            if line:
                lines.append(line)
        return lines

    def _log_line(self, e: EventRecord) -> str | None:
        if isinstance(e, SystemEvent | RanksEvent | ExpertsEvent):
            return None  # the System and Experts tabs show them
        if isinstance(e, ProgressEvent):
            return None  # the summary's activity line shows the latest: a log line each would drown the rest
        if isinstance(e, StepEvent):
            t = e.t or 0.0
            last_of_stage = e.stage < len(self.progress.stage_steps) and e.step == self.progress.stage_steps[e.stage]
            if not last_of_stage and self._last_step_logged is not None \
                    and t - self._last_step_logged < STEP_LOG_EVERY_S:
                return None
            self._last_step_logged = t
        try:
            text = describe_event(e)
        except (KeyError, TypeError, ValueError):
            text = f"{e.type} event"
        when = e.t
        started = self.progress.started
        # cached prefix events keep their original (earlier) times: clamp, never a negative stamp
        stamp = f"+{fmt_duration(max(when - started, 0))}" if is_number(when) and started else "       "
        return f"{stamp} {'(cached) ' if e.cached else ''}{text}"

    # -- views ------------------------------------------------------------------------------------
    def forgetting(self) -> ForgettingTable | None:
        """The forgetting table: from results.json at the end, from the stage-end evaluations while
        the run goes on; None before the first row."""
        matrix = matrix_for(self.results, self._matrix_events)
        if matrix is None:
            return None
        metric = matrix.metric()
        results = self.results or {}
        return ForgettingTable(matrix.source, metric, matrix.rows, matrix.tasks, matrix.values(metric),
                               matrix.trained, matrix.forgetting(metric),
                               (results.get("continual") or {}) if isinstance(results, dict) else {})

    def expansion_rows(self) -> list[ExpansionRow]:
        """Stage-start expansions then plateau growths, in the order they happened."""
        curves = self.curves.curves()
        rows = [ExpansionRow(e, curves.offset(e.stage), False) for e in curves.expansions]
        rows += [ExpansionRow(p.event, p.g, True) for p in curves.growths]
        return sorted(rows, key=lambda r: (r.g, r.growth))
