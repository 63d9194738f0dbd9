"""One follower of a run, live or not: what is new in its files since the last look.

``Follower(run_dir).poll()`` reads the records appended to ``events.jsonl`` since the last poll
(``EventReader``: only the new bytes), the effective state from ``status.json`` and, once the run
has ended (``rundir.ENDED_STATES``), its ``results.json`` and the last line of ``events.jsonl``
even without its newline. `widen watch`, `widen logs -f` and the TUI monitor all follow runs
with it, so they agree on when a run is over. Torch-free, no Textual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.runs.events import EventReader
from engine.runs.records import EventRecord
from engine.runs.rundir import ENDED_STATES, RunDir


@dataclass
class FollowUpdate:
    """What one poll found."""

    records: list[EventRecord]
    state: str                          # the effective state (status.json, or `lost`, `stale`)
    ended: bool                         # state in ENDED_STATES: nothing more will come
    status: dict | None = None          # status.json when it changed since the last poll (the first: always)
    results: dict | None = None         # results.json, once, when the run has ended and it is there
    skipped: list[str] = field(default_factory=list)        # events.jsonl lines dropped ("events.jsonl line 12: …")
    skipped_count: int = 0              # how many were dropped, also those past the reader's MAX_PROBLEMS
    file_problems: list[str] = field(default_factory=list)  # run files unreadable, each said once


class Follower:
    """Follows the run in `run` (a ``RunDir`` or its path). ``status`` is the latest status.json
    read (with its effective state)."""

    def __init__(self, run: RunDir | Path | str):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.reader = EventReader(self.run.events)
        self.status: dict | None = None
        self._results_seen = False
        self._said: set[str] = set()

    def poll(self) -> FollowUpdate:
        # status first: when it says the run ended, every event is already written
        status = self.run.status()
        state = status["state"]
        ended = state in ENDED_STATES
        records = self.reader.read_rest() if ended else self.reader.read_new()
        update = FollowUpdate(records, state, ended, status=status if status != self.status else None)
        self.status = status
        if ended and not self._results_seen:
            update.results = self.run.results()
            self._results_seen = update.results is not None
        elif not ended:
            self._results_seen = False  # resumed: a new results.json will come
        update.skipped_count, update.skipped = self.reader.new_problem_count(), self.reader.new_problems()
        update.file_problems = [p for p in self.run.problems() if p not in self._said]
        self._said.update(update.file_problems)
        return update
