"""What the runs table shows for each run, read from disk (in a worker thread, never the UI's).

``RunRowsLoader.load()`` brings the index up to date (``RunIndex.refresh``: unfinished runs are
re-read, so a dead worker shows as ``lost``) and turns every record into a ``RunRow`` of display
strings. It stays cheap when called every few seconds on hundreds of runs:

- finished runs come from the index as they are (their files no longer change);
- things that never change for a run (its stage count, its creation time) are read once;
- unfinished runs get their latest eval perplexity from ``events.jsonl`` through an
  ``EventReader`` kept per run, which reads only the bytes appended since the last call.
"""

from __future__ import annotations

import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.runs.events import EventReader, voided_by
from engine.runs.records import EvalEvent, ExpandEvent, ResumeEvent, StageEvent
from engine.runs.rundir import RunDir
from widen_tui.index import RunIndex

# Seconds the TUI waits for the index lock before it reports a problem (the CLI waits longer).
INDEX_LOCK_TIMEOUT_S = 5.0
NAME_WIDTH = 24
NO_VALUE = "–"


@dataclass(frozen=True)
class RunRow:
    """One run as the table shows it: `cells` line up with ``RunsTable.DATA_COLUMNS``."""

    id: str
    state: str
    cells: tuple[str, ...]
    detail: str = ""  # the line under the table for the run under the cursor
    haystack: str = field(default="", compare=False)  # lower-case text the filter searches

    def matches(self, words: list[str]) -> bool:
        """True when every (lower-case) word of the filter occurs in the run's searchable text."""
        return all(word in self.haystack for word in words)


@dataclass
class _Live:
    """What the events of an unfinished run have told us so far."""

    reader: EventReader
    ppl: dict[str, float] = field(default_factory=dict)
    evals: dict[str, EvalEvent] = field(default_factory=dict)  # task -> the eval event its ppl came from
    trainable_share: float | None = None


class RunRowsLoader:
    """Reads the runs under `root` into ``RunRow``s. `clock` gives "now" for ages (tests freeze it).
    Thread-safe: one load at a time."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.clock = clock
        self._lock = threading.Lock()
        self._stage_counts: dict[str, int | None] = {}
        self._created: dict[str, float | None] = {}
        self._live: dict[str, _Live] = {}

    def load(self) -> list[RunRow]:
        with self._lock:
            records = RunIndex(self.root, lock_timeout=INDEX_LOCK_TIMEOUT_S).refresh()
            now = self.clock()
            rows = [self._row(record, now) for record in records]
            gone = set(self._live) - {r.id for r in rows}
            for run_id in gone:  # deleted runs: drop their readers
                del self._live[run_id]
            return rows

    # -- one run ---------------------------------------------------------------------------------

    def _row(self, record: dict, now: float) -> RunRow:
        run_id = str(record["id"])
        state = str(record.get("state") or "queued")
        summary = record.get("summary") or {}
        ppl = summary.get("final_ppl") or {}
        share = summary.get("trainable_share")
        if ppl:
            self._live.pop(run_id, None)  # finished: its results say it all
        else:  # not finished (or ended without results): the latest evals so far
            live = self._follow(run_id)
            ppl = live.ppl
            share = live.trainable_share if share is None else share
        name = str(record.get("name") or run_id)
        variant = str(record.get("variant") or "")
        plan_path = record.get("plan")
        plan = Path(plan_path).stem if plan_path else ""
        created = self._created_ts(run_id, record)
        cells = (  # in the order of RunsTable.DATA_COLUMNS
            _clip(name, NAME_WIDTH),
            NO_VALUE if record.get("seed") is None else str(record["seed"]),
            self._stage_cell(run_id, record.get("stage")),
            NO_VALUE if record.get("step") is None else str(record["step"]),
            fmt_age(now - created) if created is not None else NO_VALUE,
            " ".join(f"{task} {_ppl(value)}" for task, value in ppl.items()) or NO_VALUE,
            NO_VALUE if share is None else f"{100 * share:.1f}%",
            variant or NO_VALUE,
            plan or NO_VALUE,
        )
        problems = record.get("problems") or []  # unreadable run files
        detail = " · ".join(x for x in (run_id, f"error: {record['error']}" if record.get("error") else "",
                                        f"plan {plan_path}" if plan_path else "", *map(str, problems[:2])) if x)
        haystack = " ".join((run_id, name, variant, plan, state)).casefold()
        return RunRow(run_id, state, cells, detail, haystack)

    def _follow(self, run_id: str) -> _Live:
        """Read the new events of an unfinished run: latest eval ppl per task, trainable share."""
        live = self._live.get(run_id)
        if live is None:
            live = self._live[run_id] = _Live(EventReader(RunDir(self.root / run_id).events))
        for event in live.reader.read_new():
            if isinstance(event, EvalEvent) and event.ppl is not None:
                live.ppl[event.task] = event.ppl
                live.evals[event.task] = event
            elif isinstance(event, ResumeEvent):  # evaluations past the resume point are void
                for task in [t for t, e in live.evals.items() if voided_by(e, event)]:
                    del live.evals[task], live.ppl[task]
            elif isinstance(event, ExpandEvent) and event.trainable_share is not None:
                live.trainable_share = event.trainable_share
            elif isinstance(event, StageEvent) and event.params and event.trainable is not None:
                live.trainable_share = event.trainable / event.params
        return live

    def _stage_cell(self, run_id: str, stage) -> str:
        if run_id not in self._stage_counts:  # the resolved plan never changes: read it once
            self._stage_counts[run_id] = _count_stages(self.root / run_id / "plan.toml")
        total = self._stage_counts[run_id]
        if stage is None:
            return f"–/{total}" if total else NO_VALUE
        return f"{int(stage) + 1}/{total or '?'}"

    def _created_ts(self, run_id: str, record: dict) -> float | None:
        if run_id not in self._created:
            self._created[run_id] = _parse_created(record.get("created"))
        return self._created[run_id]


def _count_stages(plan_toml: Path) -> int | None:
    try:
        with open(plan_toml, "rb") as f:
            return len(tomllib.load(f).get("stages") or [])
    except (OSError, tomllib.TOMLDecodeError):
        return None


def _parse_created(text) -> float | None:
    """run.json's `created` (local time, ISO 8601 to the second) as epoch seconds."""
    if not text:
        return None
    try:
        return time.mktime(time.strptime(str(text)[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _ppl(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return NO_VALUE
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def fmt_age(seconds: float) -> str:
    """A short age: 45s, 12m, 3h05m, 4d."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        h, m = divmod(seconds // 60, 60)
        return f"{h}h{m:02d}m"
    return f"{seconds // 86400}d"
