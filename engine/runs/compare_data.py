"""What the Compare screen shows, read from run directories in one pass (no torch, no Textual).

`load_runs` reads each run's run.json, status, results and its whole event stream once; the
comparison figures (`comparison`), the curves and the growth lineage are all computed from that
in-memory copy, so opening Compare costs one read of each `events.jsonl`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.runs import compare
from engine.runs.compute_to_target import RunInput, TargetError, compute_to_target
from engine.runs.events import latest_segment, read_all
from engine.runs.records import EventRecord
from engine.runs.rundir import RunDir


@dataclass
class LoadedRun:
    """One run as read from its directory. `events` keeps the latest segment only (a resumed
    run's voided tail is dropped: ``engine.runs.events.latest_segment``)."""

    id: str
    info: dict
    status: dict
    results: dict | None
    events: list[EventRecord] = field(default_factory=list)
    label: str = ""  # unique among the runs compared (legend, table, lineage)

    def __post_init__(self):
        self.events = latest_segment(self.events)

    @property
    def grew(self) -> bool:
        """Whether the model grew mid-way (``engine.runs.compare.model_grew``)."""
        return compare.model_grew(self.events)


@dataclass
class Loaded:
    runs: list[LoadedRun]
    missing: list[str]  # ids with no run directory under the root


def load_runs(root: Path | str, run_ids: list[str]) -> Loaded:
    """Read the runs (in the order given); ids without a run directory are listed as missing."""
    runs, missing = [], []
    for run_id in run_ids:
        run = RunDir(Path(root) / run_id)
        if not run.exists():
            missing.append(run_id)
            continue
        events = read_all(run.events) if run.events.exists() else []
        runs.append(LoadedRun(run.id, run.info(), run.status(), run.results(), events))
    _label(runs)
    return Loaded(runs, missing)


def _label(runs: list[LoadedRun]) -> None:
    """Short unique labels: the variant (or run name), then the seed, then the id's tail."""
    for run in runs:
        run.label = str(run.info.get("variant") or run.info.get("name") or run.id)
    for add in (lambda r: f"s{r.info.get('seed')}", lambda r: r.id[-4:]):
        counts = Counter(r.label for r in runs)
        for run in runs:
            if counts[run.label] > 1:
                run.label = f"{run.label} {add(run)}"


def comparison(runs: list[LoadedRun]) -> dict:
    """`compare_runs`' figures (what `widen compare` prints), from the events already in memory;
    under "target", compute to target as `widen compare --target-loss auto` has it (the default
    baseline: a run that did not grow, else the first; the default task) — a ``TargetReport``, or
    the one line saying why there is none."""
    data = compare.compare_runs([(r.info, r.status, r.results) for r in runs], [r.events for r in runs])
    try:
        data["target"] = compute_to_target([RunInput(r.id, r.info, r.events) for r in runs], labels=[r.label for r in runs])
    except TargetError as e:
        data["target"] = str(e)
    return data
