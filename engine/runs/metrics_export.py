"""`widen export-metrics RUN --to tensorboard|mlflow|csv`: a run's metrics mirrored after the fact.

The run's ``events.jsonl`` is read with engine.runs.events (typed records checked line by line, never unpickled;
what a resume voided is left out) and fed to the same ``Mirror`` a live run uses
(engine.runs.trackers), then its results.json's matrix. Every file written has a name chosen here or
by the tool, inside the output directory: names from the run's files are reduced to safe key
parts (``trackers.safe_name``), never joined into paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import WidenError
from engine.plan.checks import INSTALL_HINT, missing_package
from engine.runs.events import EventReader, latest_segment
from engine.runs.records import StatusEvent
from engine.runs.rundir import RunDir
from engine.runs.trackers import REGISTRY, Mirror, MlflowTracker, RunInfo

EXPORT_TOOLS = ("tensorboard", "mlflow", "csv")


class ExportError(WidenError, ValueError):
    """An export that cannot be done (a missing package, an output directory in use, a run without
    events); one line."""


@dataclass
class ExportSummary:
    run: str
    tool: str
    out: str
    events: int
    problems: list[str] = field(default_factory=list)  # events.jsonl lines skipped

    def line(self) -> str:
        return f"exported {self.events} events of run {self.run} to {self.tool} at {self.out}"


def default_out(run: RunDir, tool: str) -> Path:
    return run.path / f"export-{tool}"


def export_run(run_dir: Path | str, tool: str, out: Path | None = None) -> ExportSummary:
    """Mirror the run in `run_dir` to `tool` under `out` (default: RUN_DIR/export-<tool>; for
    mlflow without --out, ``MLFLOW_TRACKING_URI`` when set)."""
    if tool not in EXPORT_TOOLS:
        raise ExportError(f"--to {tool!r}: use one of {', '.join(EXPORT_TOOLS)}")
    package = missing_package(tool)
    if package:
        raise ExportError(f"--to {tool} needs the {package} package — {INSTALL_HINT}")
    run = RunDir(run_dir)
    reader = EventReader(run.events)
    events = latest_segment(reader.read_rest())
    if reader.read_error:
        raise ExportError(f"run {run.id}: {reader.read_error}")
    if not events:
        raise ExportError(f"run {run.id} has no events to export ({run.events.name} is missing or empty)")
    use_env = tool == "mlflow" and out is None and bool(os.environ.get("MLFLOW_TRACKING_URI"))
    target = None if use_env else _prepare(Path(out) if out is not None else default_out(run, tool), tool)
    failures: list[str] = []

    def open_tracker(name: str, info: RunInfo):
        if name == "mlflow":  # a new MLflow run per export; --out wins over MLFLOW_TRACKING_URI
            return MlflowTracker(info, target or Path("."), uri=target.resolve().as_uri() if target else None,
                                 continue_run=False)
        return REGISTRY[name](info, target)

    mirror = Mirror([tool], open_tracker, lambda source, message: failures.append(message),
                    results=run.results, fallback_run=run.id)
    state = None
    for event in events:
        mirror(event)
        if isinstance(event, StatusEvent):
            state = event.state
        if failures:
            break
    mirror.close(state)
    if failures:
        raise ExportError(f"run {run.id}: {failures[0]}")
    where = os.environ["MLFLOW_TRACKING_URI"] if use_env else str(target)
    return ExportSummary(run.id, tool, where, len(events), reader.problems)


def _prepare(out: Path, tool: str) -> Path:
    """The output directory, made; one in use refused (a second export would repeat every point),
    except an MLflow store, which holds many runs."""
    try:
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out}: a file is in the way — give a directory")
        if tool != "mlflow" and out.is_dir() and any(out.iterdir()):
            raise ExportError(f"--out {out} is not empty — give a new directory (or remove it)")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror or e.__class__.__name__})") from None
    return out
