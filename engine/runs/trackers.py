"""Metrics mirrored to experiment trackers: TensorBoard, MLflow, Weights & Biases (``[train] report_to``).

widen's own ``events.jsonl`` stays the record; a tracker only gets a copy. The worker's
``EventWriter`` (rank 0) calls a ``Mirror`` with every event it writes; the mirror turns each into
typed records (``Scalars`` by global step, ``Note`` text markers, ``Matrix`` tables) and hands them
to every tracker. A tracker that raises is dropped after one ``warning`` event naming it and the
error: a tracker never stops a run. ``widen export-metrics`` feeds a finished run's events to the
same mirror (engine.runs.metrics_export).

Nothing here imports a tracker's package (or torch) until a tracker is opened, so the CLI stays
light. What ``report_to`` takes is engine.plan.schema.TRACKER_NAMES; whether a tracker's package is
installed, the plan check asks importlib (engine.plan.checks.missing_package).
"""

from __future__ import annotations

import atexit
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from engine.names import label_problem, name_problem
from engine.runs.records import (
    EvalEvent,
    EventRecord,
    ExpandEvent,
    ProgressEvent,
    ResumeEvent,
    StageEvent,
    StartEvent,
    StatusEvent,
    StepEvent,
    SystemEvent,
    WarningEvent,
)

# Where a live mirror writes, under the run directory (names every tool's users recognise).
LIVE_DIRS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "wandb": "wandb", "csv": "metrics"}
MATRIX_METRICS = ("loss", "ppl", "bpb", "exact_match", "bleu")  # results.json matrix keys mirrored


def safe_name(value: object) -> str:
    """A task / op name as a metric key part: valid names as they are; anything else (a run file is
    untrusted) reduced to letters, digits, '_' and '-', so it can never become a path segment
    such as '..' in a file store."""
    text = str(value)
    if name_problem(text) is None:
        return text
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64] or "_"


def safe_label(value: object) -> str:
    """A stage label or matrix row ("after 1:prose") as it is when it is a valid label, else
    reduced as ``safe_name`` does."""
    return str(value) if label_problem(value) is None else safe_name(value)


# ---------------------------------------------------------------------------------------------
# what a tracker is given


@dataclass(frozen=True)
class Scalars:
    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class Note:
    """A text marker at a step: an expansion, a growth, a stage boundary, the run's end."""
    step: int
    tag: str
    text: str


@dataclass(frozen=True)
class Matrix:
    """The final evaluation matrix of one metric: rows (initial, after each stage) × tasks."""
    step: int
    metric: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]

    def markdown(self) -> str:
        def cell(v):
            return "–" if v is None else f"{v:.4g}"
        lines = ["| after | " + " | ".join(self.columns) + " |", "|---" * (len(self.columns) + 1) + "|"]
        lines += [f"| {row} | " + " | ".join(cell(v) for v in vals) + " |" for row, vals in zip(self.rows, self.values)]
        return "\n".join(lines)


Record = Scalars | Note | Matrix


@dataclass(frozen=True)
class RunInfo:
    """Who the run is, from its ``start`` event (names a tracker's run)."""
    run: str
    plan: str
    seed: int | None = None
    params: float | None = None
    device: str | None = None
    variant: str | None = None

    @classmethod
    def from_start(cls, event: EventRecord, fallback: str) -> "RunInfo":
        if not isinstance(event, StartEvent):
            return cls(run=safe_name(fallback), plan="widen")
        variant = event.variant
        return cls(run=safe_name(event.run), plan=safe_name(event.plan), seed=event.seed,
                   params=event.params, device=event.device,
                   variant=safe_name(variant) if isinstance(variant, str) else None)

    def config(self) -> dict:
        return {k: v for k, v in (("seed", self.seed), ("params", self.params), ("device", self.device),
                                  ("variant", self.variant), ("plan", self.plan)) if v is not None}


class Tracker:
    """One tool. ``open`` makes it (importing its package); then ``write`` each record, ``close``
    once with the run's final state. Any exception is the mirror's to handle."""

    name: ClassVar[str]

    def __init__(self, info: RunInfo, directory: Path):
        self.info, self.directory = info, directory

    def write(self, record: Record) -> None:
        if isinstance(record, Scalars):
            self.scalars(record)
        elif isinstance(record, Note):
            self.note(record)
        else:
            self.matrix(record)

    def scalars(self, record: Scalars) -> None:
        raise NotImplementedError

    def note(self, record: Note) -> None:
        raise NotImplementedError

    def matrix(self, record: Matrix) -> None:
        raise NotImplementedError

    def close(self, state: str | None) -> None:
        pass


class TensorBoardTracker(Tracker):
    """torch.utils.tensorboard's SummaryWriter (needs the tensorboard package): scalars by global
    step, notes and matrices as text (markdown tables)."""

    name = "tensorboard"

    def __init__(self, info: RunInfo, directory: Path):
        super().__init__(info, directory)
        from torch.utils.tensorboard import SummaryWriter

        # flush_secs: a live `tensorboard --logdir` sees new points within seconds
        self.writer = SummaryWriter(log_dir=str(directory), flush_secs=10)

    def scalars(self, record: Scalars) -> None:
        for tag, value in record.values.items():
            self.writer.add_scalar(tag, value, record.step)

    def note(self, record: Note) -> None:
        self.writer.add_text(record.tag, record.text, record.step)

    def matrix(self, record: Matrix) -> None:
        self.writer.add_text(f"results/{record.metric}", record.markdown(), record.step)

    def close(self, state: str | None) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """MLflow's client: a local file store under the run directory (``mlruns``) unless
    ``MLFLOW_TRACKING_URI`` is set; the experiment is ``MLFLOW_EXPERIMENT_NAME`` or the plan's
    name, the MLflow run is tagged with widen's run id (a resumed run continues it). Notes
    accumulate in the artifact ``expansions.md``, matrices are ``results/matrix_<metric>.json``."""

    name = "mlflow"

    def __init__(self, info: RunInfo, directory: Path, uri: str | None = None, continue_run: bool = True):
        super().__init__(info, directory)
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or directory.resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses a file store unless asked; a run directory's store is ours to choose
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or info.plan
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        found = continue_run and self.client.search_runs([experiment_id], f"tags.`widen.run` = '{info.run}'",
                                                          max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            tags = {"widen.run": info.run, "widen.plan": info.plan, **({"widen.variant": info.variant}
                                                                      if info.variant else {})}
            self.run_id = self.client.create_run(experiment_id, run_name=info.run, tags=tags).info.run_id
            for key, value in info.config().items():
                self.client.log_param(self.run_id, key, value)
        self.notes: list[str] = []

    def scalars(self, record: Scalars) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(tag, value, now, record.step) for tag, value in record.values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)  # one call per event, not per figure

    def note(self, record: Note) -> None:
        self.notes.append(f"- step {record.step} · {record.tag}: {record.text}")
        self.client.log_text(self.run_id, "\n".join(self.notes) + "\n", "expansions.md")

    def matrix(self, record: Matrix) -> None:
        self.client.log_dict(self.run_id, {"metric": record.metric, "rows": record.rows, "tasks": record.columns,
                                           "values": record.values}, f"results/matrix_{record.metric}.json")

    def close(self, state: str | None) -> None:
        status = {"done": "FINISHED", "cancelled": "KILLED"}.get(state or "", "FAILED")
        self.client.set_terminated(self.run_id, status=status)


class WandbTracker(Tracker):
    """Weights & Biases, as ``WANDB_MODE`` says (``offline`` writes under the run directory and needs
    no network; ``wandb sync`` uploads it later). Project: ``WANDB_PROJECT`` or "widen"; the W&B
    run id is widen's (a resumed run continues it). Every figure is plotted against global_step."""

    name = "wandb"

    def __init__(self, info: RunInfo, directory: Path):
        super().__init__(info, directory)
        import wandb

        self._wandb = wandb
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "widen", name=info.run,
                              id=re.sub(r"[^A-Za-z0-9_-]", "-", info.run)[:64], resume="allow",
                              dir=str(directory), group=info.plan, config=info.config(), reinit="create_new")
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")  # steps of a resume may repeat
        self.notes: list[list] = []

    def scalars(self, record: Scalars) -> None:
        self.run.log({**record.values, "global_step": record.step})

    def note(self, record: Note) -> None:
        self.notes.append([record.step, record.tag, record.text])
        table = self._wandb.Table(columns=["global_step", "kind", "text"], data=self.notes)
        self.run.log({"expansions": table, "global_step": record.step})

    def matrix(self, record: Matrix) -> None:
        table = self._wandb.Table(columns=["after", *record.columns],
                                  data=[[row, *vals] for row, vals in zip(record.rows, record.values)])
        self.run.log({f"results/matrix_{record.metric}": table, "global_step": record.step})

    def close(self, state: str | None) -> None:
        self.run.finish(exit_code=0 if state in ("done", "cancelled") else 1)


class CsvTracker(Tracker):
    """Plain files (export-metrics only): ``scalars.csv`` (global_step, name, value), ``notes.csv``
    (global_step, kind, text), ``matrix_<metric>.csv``. File names are fixed here, never taken
    from a run's files."""

    name = "csv"

    def __init__(self, info: RunInfo, directory: Path):
        import csv

        super().__init__(info, directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._csv = csv
        self._files = {}
        self._writers = {}

    def _writer(self, name: str, header: list[str]):
        if name not in self._writers:
            f = open(self.directory / name, "w", newline="")
            self._files[name], self._writers[name] = f, self._csv.writer(f)
            self._writers[name].writerow(header)
        return self._writers[name]

    def scalars(self, record: Scalars) -> None:
        writer = self._writer("scalars.csv", ["global_step", "name", "value"])
        for tag, value in record.values.items():
            writer.writerow([record.step, tag, repr(value)])

    def note(self, record: Note) -> None:
        self._writer("notes.csv", ["global_step", "kind", "text"]).writerow([record.step, record.tag, record.text])

    def matrix(self, record: Matrix) -> None:
        with open(self.directory / f"matrix_{record.metric}.csv", "w", newline="") as f:
            writer = self._csv.writer(f)
            writer.writerow(["after", *record.columns])
            writer.writerows([[row, *("" if v is None else repr(v) for v in vals)]
                              for row, vals in zip(record.rows, record.values)])

    def close(self, state: str | None) -> None:
        for f in self._files.values():
            f.close()


# The registry `report_to` (and export-metrics --to) names are looked up in.
REGISTRY: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker, "csv": CsvTracker}


# ---------------------------------------------------------------------------------------------
# events -> records


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _figures(source: EventRecord | dict, keys: dict[str, str]) -> dict[str, float]:
    """{tag: value} of the finite numbers of an event (or of one GPU's sample, a dict) under `keys`
    (a NaN loss is written as null: left out)."""
    out = {}
    for key, tag in keys.items():
        value = _num(source.get(key) if isinstance(source, dict) else source.number(key))
        if value is not None:
            out[tag] = value
    return out


STEP_FIGURES = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
                "tokens": "train/tokens", "flops": "train/flops", "params": "model/params"}
EXPAND_FIGURES = {"params_added": "growth/params_added", "max_abs_logit_delta": "growth/max_abs_logit_delta",
                  "params_after": "model/params"}
SYSTEM_FIGURES = {"rss_mb": "system/rss_mb", "cpu_percent": "system/cpu_percent",
                  "torch_peak_mb": "system/torch_peak_mb"}


def _fmt(value, spec: str) -> str:
    number = _num(value)
    return "–" if number is None else format(number if "," not in spec else int(number), spec)


class Translator:
    """Turns widen events into records, keeping the global step that events without one (system
    samples, stage-start expansions) are placed at."""

    def __init__(self):
        self.global_step = 0

    def _at(self, event: EventRecord) -> int:
        g = event.number("global_step")
        if g is not None:
            self.global_step = int(g)
        return self.global_step

    def records(self, event: EventRecord) -> list[Record]:
        stage = getattr(event, "stage", None)
        label = f"stage {stage + 1}" if isinstance(stage, int) and stage >= 0 else "initial"
        if isinstance(event, StepEvent):
            return [Scalars(self._at(event), _figures(event, STEP_FIGURES))]
        if isinstance(event, EvalEvent):
            task = safe_name(event.task)
            keys = {k: f"eval/{task}/{k}" for k in ("loss", "ppl", "bpb", "exact_match", "bleu")}
            return [Scalars(self._at(event), _figures(event, keys))]
        if isinstance(event, ExpandEvent):
            step = self._at(event)
            what = f"growth {event.growth + 1} ({safe_name(event.trigger)})" if event.growth is not None else "expand"
            text = (f"{label} {what} {safe_name(event.op)}: +{_fmt(event.params_added, ',')} params "
                    f"({_fmt(event.params_before, ',')} → {_fmt(event.params_after, ',')}), "
                    f"max |Δlogits| {_fmt(event.max_abs_logit_delta, '.2e')}, "
                    f"loss {_fmt(event.loss_before, '.4f')} → {_fmt(event.loss_after, '.4f')}")
            return [Scalars(step, _figures(event, EXPAND_FIGURES)), Note(step, "expansions", text)]
        if isinstance(event, StageEvent):
            step = self._at(event)
            return [Note(step, "stages", f"{label} {safe_name(event.phase)}: {safe_label(event.name)} on "
                                         f"{safe_name(event.task)}, {event.steps} steps")]
        if isinstance(event, SystemEvent):
            values = _figures(event, SYSTEM_FIGURES)
            for gpu in event.gpus:
                index = gpu.get("index")
                if isinstance(index, int) and not isinstance(index, bool):
                    values.update(_figures(gpu, {"mem_used_mb": f"system/gpu{index}/mem_used_mb",
                                                 "util_percent": f"system/gpu{index}/util_percent"}))
            return [Scalars(self.global_step, values)] if values else []
        if isinstance(event, ResumeEvent):
            step = self._at(event)
            return [Note(step, "stages", f"resumed from {label} step {event.step}")]
        if isinstance(event, StatusEvent):
            error = event.error
            return [Note(self.global_step, "stages", f"run {safe_name(event.state)}"
                                                      + (f": {error[:300]}" if isinstance(error, str) else ""))]
        return []

    def final(self, results: dict | None) -> list[Record]:
        """The forgetting matrix and figures of results.json (untrusted: only well-formed parts)."""
        if not isinstance(results, dict):
            return []
        out: list[Record] = []
        matrix = results.get("matrix")
        if isinstance(matrix, dict):
            rows, tasks = matrix.get("rows"), matrix.get("tasks")
            if _strings(rows) and _strings(tasks):
                for metric in MATRIX_METRICS:
                    values = matrix.get(metric)
                    if (isinstance(values, list) and len(values) == len(rows)
                            and all(isinstance(r, list) and len(r) == len(tasks) for r in values)):
                        out.append(Matrix(self.global_step, metric, [safe_label(r) for r in rows],
                                          [safe_name(t) for t in tasks], [[_num(v) for v in r] for r in values]))
        summary = results.get("summary") if isinstance(results.get("summary"), dict) else {}
        figures = {}
        forgetting = summary.get("forgetting")
        if isinstance(forgetting, dict):
            figures.update({f"forgetting/{safe_name(t)}": v for t, v in forgetting.items() if _num(v) is not None})
        figures.update({f"continual/{k}": summary[k] for k in ("acc", "bwt", "fwt") if _num(summary.get(k)) is not None})
        if figures:
            out.append(Scalars(self.global_step, {k: float(v) for k, v in figures.items()}))
        return out


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# ---------------------------------------------------------------------------------------------
# the mirror


@dataclass
class Mirror:
    """Forwards events to the trackers named in `names`, each opened (``open_tracker(name, info)``)
    at the first event. `warn(source, message)` is told once per tracker that fails; that tracker
    is then dropped. `results` gives results.json at the run's end; `cached` the events a variant
    took from the prefix cache (written before the trainer's first event). Never raises."""

    names: list[str]
    open_tracker: Callable[[str, RunInfo], Tracker]
    warn: Callable[[str, str], None]
    results: Callable[[], dict | None] = lambda: None
    cached: Callable[[], list[EventRecord]] = lambda: []
    fallback_run: str = "run"
    trackers: list[Tracker] = field(default_factory=list)
    opened: bool = False
    closed: bool = False
    final_sent: bool = False
    translator: Translator = field(default_factory=Translator)

    def _warn(self, source: str, message: str) -> None:
        try:
            self.warn(source, message)
        except Exception:  # noqa: BLE001 - the warning cannot be written (a full disk): the run decides
            pass

    def __call__(self, event: EventRecord) -> None:
        try:
            self._mirror(event)
        except Exception as e:  # noqa: BLE001 - the mirror's own bug must not stop the run either
            self._warn("mirror", f"an event was not mirrored to the trackers ({_error(e)})")

    def _mirror(self, event: EventRecord) -> None:
        if self.closed or isinstance(event, WarningEvent):  # a failing tracker's warning is not sent to the others
            return
        if isinstance(event, ProgressEvent):  # live only, and it comes before `start`, which opens the trackers
            return
        if not self.opened:
            self._open(RunInfo.from_start(event, self.fallback_run))
            if isinstance(event, StartEvent) and event.prefix_cached:
                self._forward(self._quietly(self.cached) or [])
        self._forward([event])
        if isinstance(event, StatusEvent):
            self.close(event.state)

    def _forward(self, events: list[EventRecord]) -> None:
        records = []
        for event in events:
            try:
                records += self.translator.records(event)
            except Exception as e:  # noqa: BLE001 - a malformed event is skipped, the run goes on
                self._warn("mirror", f"an event was not mirrored to the trackers ({_error(e)})")
        self._send(records)

    def _quietly(self, read: Callable):
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - a run file that cannot be read is not mirrored
            self._warn("mirror", f"a run file was not mirrored to the trackers ({_error(e)})")
            return None

    def _open(self, info: RunInfo) -> None:
        self.opened = True
        for name in self.names:
            try:
                self.trackers.append(self.open_tracker(name, info))
            except Exception as e:  # noqa: BLE001 - a missing package, a store that cannot be written
                self._warn(name, f"tracker {name} could not start ({_error(e)})")
        atexit.register(self.close, None)  # a worker that dies of an exception still flushes

    def _send(self, records: list[Record]) -> None:
        for tracker in list(self.trackers):
            try:
                for record in records:
                    tracker.write(record)
            except Exception as e:  # noqa: BLE001 - a tracker never stops a run
                self.trackers.remove(tracker)
                self._warn(tracker.name, f"tracker {tracker.name} failed ({_error(e)})")
                _quiet_close(tracker)

    def close(self, state: str | None) -> None:
        """Send results.json's matrix once, then close every tracker."""
        if self.closed:
            return
        if not self.final_sent and self.trackers:
            self.final_sent = True
            try:
                records = self.translator.final(self._quietly(self.results))
            except Exception as e:  # noqa: BLE001
                self._warn("mirror", f"the final results were not mirrored ({_error(e)})")
                records = []
            self._send(records)
        self.closed = True
        for tracker in self.trackers:
            try:
                tracker.close(state)
            except Exception as e:  # noqa: BLE001
                self._warn(tracker.name, f"tracker {tracker.name} failed to close ({_error(e)})")
        self.trackers = []


def _error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text[:200]}" if text else e.__class__.__name__


def _quiet_close(tracker: Tracker) -> None:
    try:
        tracker.close("failed")
    except Exception:  # noqa: BLE001 - it failed already; its warning is out
        pass


def attach(writer, names: list[str], run_dir: Path) -> None:
    """Mirror what `writer` (rank 0's EventWriter) emits to the trackers `names`, under `run_dir`;
    nothing when there are none (or this rank writes no events)."""
    if writer is None or not names:
        return
    from engine.runs.events import read_all
    from engine.runs.rundir import RunDir

    run = RunDir(run_dir)
    writer.listener = Mirror(
        list(names), lambda name, info: REGISTRY[name](info, run.path / LIVE_DIRS[name]),
        lambda source, message: writer.emit("warning", source=source, message=f"{message} — left out, the run goes on"),
        results=run.results, cached=lambda: [e for e in read_all(run.events) if e.cached], fallback_run=run.id)
