"""The event stream: ``events.jsonl`` is append-only, one JSON object per line.

The worker writes (``EventWriter``); the CLI and TUI read only the bytes they have not seen yet
(``EventReader``), so following a long run costs nothing per refresh. The contract is one typed
record per event type (``engine.runs.records``): the writer builds the record, so a wrong field
fails there; the reader gives records, and drops (and reports, ``EventReader.problems``) a line
that is not UTF-8, not JSON, not an object, or lacks a key or has one of the wrong type — so
whoever folds events can trust the attributes of the records it gets.

**Segments.** A resumed run appends a ``resume`` event: "continuing from stage S step K (global
step G); anything logged earlier at a later position is void". ``latest_segment(events)`` keeps
what still holds; ``voided_by(event, resume)`` is the rule, for readers that fold live.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.runs.records import (
    EventError,
    EventRecord,
    ExpandEvent,
    GenericEvent,
    HealthEvent,
    ProgressPhase,
    ResumeEvent,
    StageEvent,
    StartEvent,
    StatusEvent,
    SweepEvent,
    SystemEvent,
    build_event,
    parse_event,
)
from engine.runs.rundir import dumps_json, strict_json


class EventWriter:
    """Appends events as strict JSON (a NaN loss is written as null); flushes every line so readers
    see it at once, fsyncs the important ones. `listener` (engine.runs.trackers' mirror) is called
    with every emitted record once it is written."""

    DURABLE = frozenset({"start", "stage", "expand", "checkpoint", "status", "resume"})

    def __init__(self, path: Path | str, listener: Callable[[EventRecord], None] | None = None):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)
        self.listener = listener

    def emit(self, kind: str, **fields) -> EventRecord:
        """Write one event of a known type; a missing or wrong field raises ``EventError`` here,
        before anything is written. Numpy / torch scalars become numbers, non-finite ones null."""
        record = build_event(kind, strict_json({"type": kind, "t": round(time.time(), 3), **fields}))
        self.write_raw(record)
        if kind in self.DURABLE:
            os.fsync(self._file.fileno())
        if self.listener is not None:
            self.listener(record)
        return record

    def write_raw(self, record: EventRecord) -> None:
        """Append a record as it is (events copied from a cached prefix keep their times)."""
        self._file.write(dumps_json(record.to_json()) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# what the slow parts of a run (loading, tokenizing, evaluating) call, when asked to, to say how far
# they are: (phase, what, done, total or None); engine.runs.records.ProgressEvent says what each means
ReportProgress = Callable[[ProgressPhase, str, int, int | None], None]


class ThrottledProgress:
    """A ``ReportProgress`` that writes `progress` events through `emit` (``Trainer.emit``), few
    of them: a phase's start (done 0, or another `what`) at once — a reader shows what begins even
    if the last event was a moment ago — and its updates at most once every `every_s`, so an
    evaluation of many quick batches writes one or two lines, a slow one about one a batch."""

    EVERY_S = 1.0

    def __init__(self, emit: Callable[..., object], every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.emit, self.every_s, self.clock = emit, every_s, clock
        self._last: tuple[str, str] | None = None   # the (phase, what) written last
        self._last_at = -math.inf

    def __call__(self, phase: ProgressPhase, what: str, done: int, total: int | None = None) -> None:
        now = self.clock()
        if done != 0 and (phase, what) == self._last and now - self._last_at < self.every_s:
            return
        self._last, self._last_at = (phase, what), now
        self.emit("progress", phase=phase, what=what, done=done, total=total)


MAX_PROBLEMS = 20  # a reader keeps this many problem lines (and counts the rest)


class EventReader:
    """Reads events incrementally: each `read_new()` returns only events appended since the last
    call. A half-written last line is kept until its newline arrives.

    Lines that cannot be events (not UTF-8, not JSON, not an object, a known type lacking keys or
    with wrong types) are dropped; ``problems`` lists them ("events.jsonl line 12: not an object
    but a list"), ``new_problems()`` returns those not yet taken, so a CLI can warn once."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.offset = 0
        self._partial = b""
        self.lines = 0            # complete lines read so far
        self.problems: list[str] = []
        self.problem_count = 0    # all of them, also those past MAX_PROBLEMS
        self._taken = 0
        self._counted = 0
        self.read_error: str | None = None

    def read_new(self) -> list[EventRecord]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:  # a directory in its place, permissions, an I/O error
            problem = f"{self.path.name} unreadable: {e.strerror or e}"
            if self.read_error != problem:
                self.read_error = problem
                self._problem(problem)
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        events = []
        for line in lines:
            self.lines += 1
            if not line.strip():
                continue
            event, problem = _parse_line(line)
            if problem:
                self._problem(f"{self.path.name} line {self.lines}: {problem}")
            else:
                events.append(event)
        return events

    def read_rest(self) -> list[EventRecord]:
        """``read_new()``, then the last line even without its newline — for a run that has ended
        (nothing more will come): a torn last line is reported, not waited for."""
        events = self.read_new()
        if self._partial.strip():
            self.lines += 1
            event, problem = _parse_line(self._partial)
            self._partial = b""
            if problem:
                self._problem(f"{self.path.name} line {self.lines}: {problem} (the last line, without a newline)")
            else:
                events.append(event)
        return events

    def _problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def new_problems(self) -> list[str]:
        """Problems not returned before (at most MAX_PROBLEMS are kept; ``new_problem_count``
        counts them all)."""
        fresh = self.problems[self._taken:]
        self._taken = len(self.problems)
        return fresh

    def new_problem_count(self) -> int:
        """How many problems (kept or not) came since the last call."""
        count = self.problem_count - self._counted
        self._counted = self.problem_count
        return count


def _parse_line(line: bytes) -> tuple[EventRecord | None, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start})"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None, "not valid JSON (a line torn by a crash, or garbage)"
    try:
        return parse_event(data), None
    except EventError as e:
        return None, str(e)


def read_all(path: Path | str) -> list[EventRecord]:
    return EventReader(path).read_new()


# ---------------------------------------------------------------------------------------------
# segments: a resumed run voids what was logged past its resume point


def resume_point(resume: ResumeEvent) -> tuple[int, int]:
    return resume.stage, resume.step


def voided_by(event: EventRecord, resume: ResumeEvent) -> bool:
    """Whether `event`, logged before the ``resume`` event `resume`, no longer holds.

    The resume point is (stage S, step K): steps, evals, checkpoints and plateau growths at a
    later (stage, step) are void; a stage's end (and the health of its new units, measured after
    it) is void from its own stage on; a stage's begin and its stage-start operators from the
    next stage on (at (S, 0) the operators are void when the resume says ``ops_applied: false``;
    without that key, a re-applied set replaces them — see ``latest_segment``); an earlier final
    ``status`` and a ``sweep`` are void (the run went on). A resume that did not come from a
    checkpoint (``from_checkpoint: false``) starts over: everything positional is void. ``start``,
    ``system`` and earlier ``resume`` events stay, and so do events without a stage (warnings) and
    events of unknown types."""
    if isinstance(event, (StartEvent, SystemEvent, ResumeEvent, GenericEvent)):
        return False
    if isinstance(event, (StatusEvent, SweepEvent)):
        return True
    stage = getattr(event, "stage", None)
    if stage is None:
        return False
    if resume.from_checkpoint is False:
        return True  # from the very start: the initial evaluation is redone too
    s, k = resume_point(resume)
    if isinstance(event, ExpandEvent) and not event.trigger:
        return stage > s or (stage == s and k == 0 and resume.ops_applied is False)
    if isinstance(event, StageEvent):
        return stage >= s if event.phase == "end" else stage > s
    if isinstance(event, HealthEvent):
        return stage >= s
    step = getattr(event, "step", None)
    if step is not None:
        return (stage, step) > (s, k)
    g, rg = getattr(event, "global_step", None), resume.global_step
    if g is not None and math.isfinite(g):
        return g > rg
    return stage > s


def _stage_start_op(event: EventRecord, stage: int) -> bool:
    return isinstance(event, ExpandEvent) and not event.trigger and event.stage == stage


def latest_segment(events: Iterable[EventRecord]) -> list[EventRecord]:
    """The events that still hold after every ``resume``: each resume drops what was logged before
    it at a later position (``voided_by``). Stage-start operators of the resume's own stage, at
    step 0, that the resumed worker applies again replace the earlier set. The resume events stay
    (a log can say where the run resumed). Idempotent; a stream without resumes is returned as is."""
    events = list(events)
    if not any(isinstance(e, ResumeEvent) for e in events):
        return events
    out: list[EventRecord] = []
    pending: dict[int, int] = {}  # stage -> index in `out` before which its stage-start ops may be void
    for e in events:
        if isinstance(e, ResumeEvent):
            out = [x for x in out if not voided_by(x, e)]
            s, k = resume_point(e)
            pending = {s: len(out)} if k == 0 and "ops_applied" not in e.model_fields_set else {}
        elif isinstance(e, ExpandEvent) and not e.trigger and e.stage in pending:
            cut = pending.pop(e.stage)
            out = [x for i, x in enumerate(out) if i >= cut or not _stage_start_op(x, e.stage)]
        out.append(e)
    return out
