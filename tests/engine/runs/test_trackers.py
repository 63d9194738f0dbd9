"""Metrics mirrored to trackers (engine.runs.trackers, engine.runs.metrics_export): a real tiny run with
report_to = ["tensorboard", "mlflow"], read back with each tool's own reader; a tracker that
fails; `widen export-metrics` through the real CLI; W&B offline, read back from its run file."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.plan import load_plan, validate_file
from engine.runs import trackers
from engine.runs.events import read_all
from engine.runs.records import GenericEvent, StatusEvent, parse_event
from engine.train.loop import Trainer
from tests.conftest import ROOT, TINY_PLAN, widen
from widen_tui.launcher import create_run
from widen_tui.views.event_text import describe_event

pytestmark = pytest.mark.slow

ONE_STAGE = textwrap.dedent("""
    name = "solo"
    seed = 1
    [tasks.prose]
    source = "builtin:pydoc"
    eval_fraction = 0.2
    [train]
    batch_size = 2
    seq_len = 16
    eval_interval = 0
    eval_batches = 1
    log_interval = 1
    device = "cpu"
    [[stages]]
    task = "prose"
    steps = 3
""")


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """One tiny two-stage run (an expansion in stage 2) mirrored live to TensorBoard and MLflow."""
    root = tmp_path_factory.mktemp("trackers")
    path = root / "tiny.toml"
    path.write_text(TINY_PLAN)
    plan = load_plan(path, ["stages.0.steps=3", "stages.1.steps=3", "train.eval_interval=2", "train.seq_len=16",
                            'train.report_to=["tensorboard", "mlflow"]'])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        run = create_run(plan, path, root / "runs")
        Trainer(run.path).run_plan()
    return run


def _steps(run) -> dict[int, float]:
    return {int(e.global_step): e.loss for e in read_all(run.events) if e.type == "step"}


def _mlflow_client(store: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it on a file store
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store.resolve().as_uri())


def test_report_to_in_the_plan(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(ONE_STAGE)
    _, problems = validate_file(path, ['train.report_to=["tensorboard", "comet"]'])
    assert [str(p) for p in problems] == [
        "train.report_to.1: must be 'tensorboard', 'mlflow' or 'wandb', got 'comet' — use one of those"]
    plan, problems = validate_file(path, ['train.report_to="mlflow"'])  # one name, as Hugging Face takes it
    assert problems == [] and plan.train.report_to == ["mlflow"]
    _, problems = validate_file(path, ['train.report_to=["wandb", "wandb"]'])
    assert [str(p) for p in problems] == ["train.report_to: names a tracker twice — list each once"]
    assert load_plan(path).train.report_to == []
    # where the metrics go changes no result: a variant's shared prefix stays shared
    assert load_plan(path).prefix_key(1) == load_plan(path, ['train.report_to=["tensorboard"]']).prefix_key(1)


def test_plan_check_names_a_missing_tracker_package(tmp_path):
    """`widen plan check` where mlflow cannot be imported (an import hook hides it): one line."""
    path = tmp_path / "p.toml"
    path.write_text(ONE_STAGE.replace('device = "cpu"', 'device = "cpu"\nreport_to = ["tensorboard", "mlflow"]'))
    hide = ("import sys\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'mlflow': raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "sys.argv = ['widen', 'plan', 'check', sys.argv[1]]\n"
            "from widen_tui.cli import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", hide, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"{path}: train.report_to: 'mlflow' needs the mlflow package — "
                                   "pip install 'widen[trackers]'")


def test_a_live_run_mirrored_to_tensorboard(mirrored):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = read_all(mirrored.events)
    assert [e for e in events if isinstance(e, GenericEvent)] == []  # every event of a known type
    assert [e for e in events if e.type == "warning"] == [] and events[-1].state == "done"
    acc = EventAccumulator(str(mirrored.path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    losses = {s.step: s.value for s in acc.Scalars("train/loss")}
    assert losses == pytest.approx(_steps(mirrored), rel=1e-6) and len(losses) == 6
    evals = {int(e.global_step): e.bpb for e in events if e.type == "eval" and e.task == "prose"}
    assert {s.step: s.value for s in acc.Scalars("eval/prose/bpb")} == pytest.approx(evals, rel=1e-6)
    assert sorted(evals) == [0, 2, 3, 5, 6]  # the initial evaluation, every 2 steps, each stage's end

    def text(tag: str) -> list[tuple[int, str]]:
        return [(t.step, t.tensor_proto.string_val[0].decode()) for t in acc.Tensors(f"{tag}/text_summary")]

    (expand,) = [e for e in events if e.type == "expand"]
    ((step, note),) = text("expansions")
    assert step == 3 and "widen_ffn" in note and f"+{expand.params_added:,} params" in note
    assert f"max |Δlogits| {expand.max_abs_logit_delta:.2e}" in note
    results = mirrored.results()
    ((_, table),) = text("results/bpb")
    assert all(row in table for row in results["matrix"]["rows"])
    forgetting = {s.step: s.value for s in acc.Scalars("forgetting/prose")}
    assert forgetting == {6: pytest.approx(results["summary"]["forgetting"]["prose"], rel=1e-6)}


def test_a_live_run_mirrored_to_mlflow(mirrored, tmp_path):
    client = _mlflow_client(mirrored.path / "mlruns")
    experiment = client.get_experiment_by_name("tiny")
    (found,) = client.search_runs([experiment.experiment_id], f"tags.`widen.run` = '{mirrored.id}'")
    assert found.info.status == "FINISHED" and found.info.run_name == mirrored.id
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(_steps(mirrored), rel=1e-9)
    assert found.data.metrics["model/params"] == mirrored.results()["expansions"][0]["params_after"]
    notes = Path(client.download_artifacts(found.info.run_id, "expansions.md", str(tmp_path))).read_text()
    assert "widen_ffn" in notes
    matrix = json.loads(Path(client.download_artifacts(found.info.run_id, "results/matrix_bpb.json",
                                                       str(tmp_path))).read_text())
    results = mirrored.results()
    assert matrix["rows"] == results["matrix"]["rows"] and matrix["values"] == results["matrix"]["bpb"]
    assert found.data.metrics["forgetting/prose"] == pytest.approx(results["summary"]["forgetting"]["prose"])


class BreaksOnThirdWrite(trackers.TensorBoardTracker):
    """The real TensorBoard tracker whose writes fail from the third record on (a full disk)."""

    def scalars(self, record):
        self.count = getattr(self, "count", 0) + 1
        if self.count >= 3:
            raise OSError(28, "No space left on device")
        super().scalars(record)


def test_a_failing_tracker_is_dropped_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.REGISTRY, "tensorboard", BreaksOnThirdWrite)  # the registry report_to uses
    path = tmp_path / "solo.toml"
    path.write_text(ONE_STAGE)
    run = create_run(load_plan(path, ['train.report_to=["tensorboard", "mlflow"]']), path, tmp_path / "runs")
    (run.path / "mlruns").write_text("a file where the MLflow store would go")  # its start fails for real
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Trainer(run.path).run_plan()
    events = read_all(run.events)
    warnings = [e for e in events if e.type == "warning"]
    assert [w.source for w in warnings] == ["mlflow", "tensorboard"]
    assert warnings[0].message.startswith("tracker mlflow could not start (")
    assert "tracker tensorboard failed (OSError: [Errno 28] No space left on device)" in warnings[1].message
    assert describe_event(warnings[1]).startswith("warning (tensorboard): tracker tensorboard failed")
    assert [e for e in events if isinstance(e, GenericEvent)] == []
    assert run.status()["state"] == "done" and isinstance(events[-1], StatusEvent) and events[-1].state == "done"
    assert len([e for e in events if e.type == "step"]) == 3


def test_export_metrics_to_csv_and_tensorboard(mirrored, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    home = mirrored.path.parent
    out = tmp_path / "csv"
    proc = widen("export-metrics", str(mirrored.path), "--to", "csv", "--out", str(out), env_home=home, check=True)
    assert proc.stdout.startswith(f"exported {len(read_all(mirrored.events))} events of run {mirrored.id} to csv")
    with open(out / "scalars.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["global_step"]): float(r["value"]) for r in rows if r["name"] == "train/loss"} == _steps(mirrored)
    with open(out / "matrix_bpb.csv", newline="") as f:
        header, *table = list(csv.reader(f))
    results = mirrored.results()
    assert header == ["after", *results["matrix"]["tasks"]]
    assert [[r[0], *map(float, r[1:])] for r in table] == [
        [label, *values] for label, values in zip(results["matrix"]["rows"], results["matrix"]["bpb"])]
    with open(out / "notes.csv", newline="") as f:
        assert any(r["kind"] == "expansions" and "widen_ffn" in r["text"] for r in csv.DictReader(f))

    board = tmp_path / "tb"
    widen("export-metrics", str(mirrored.path), "--to", "tensorboard", "-o", str(board), env_home=home, check=True)
    acc = EventAccumulator(str(board), size_guidance={"scalars": 0})
    acc.Reload()
    assert {s.step: s.value for s in acc.Scalars("train/loss")} == pytest.approx(_steps(mirrored), rel=1e-6)
    again = widen("export-metrics", str(mirrored.path), "--to", "tensorboard", "-o", str(board), env_home=home)
    assert again.returncode == 1 and "is not empty" in again.stderr  # never the same points twice


def test_export_metrics_of_a_bad_run_is_one_line(tmp_path):
    script = Path(sys.executable).parent / "widen"  # the installed entry point
    env = dict(os.environ, WIDEN_HOME=str(tmp_path / "runs"))
    for args in (["no-such-run", "--to", "csv"], [str(tmp_path), "--to", "csv"]):
        proc = subprocess.run([str(script), "export-metrics", *args], capture_output=True, text=True, env=env,
                              timeout=60)
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([str(script), "export-metrics", "x", "--to", "comet"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_export_refuses_names_that_would_leave_the_output(tmp_path):
    """A run directory is untrusted: task names and labels from its events become safe key parts."""
    assert trackers.safe_name("../../etc") == "______etc"
    assert trackers.safe_name("prose") == "prose" and trackers.safe_label("after 1:prose") == "after 1:prose"
    assert trackers.safe_label("../x\n") == "___x_"


def _wandb_records(path: Path):
    """The records of a W&B run file: LevelDB-log blocks of protobuf records (wandb's own format)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, block = path.read_bytes(), 7, b"", 32768  # 7: the W&B file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline(mirrored, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    warnings = []
    mirror = trackers.Mirror(["wandb"], lambda name, info: trackers.WandbTracker(info, tmp_path),
                             lambda source, message: warnings.append(message), results=mirrored.results)
    for event in read_all(mirrored.events):
        mirror(event)
    assert warnings == [] and mirror.closed
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    logged = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                logged[items["global_step"]] = items["train/loss"]
    assert logged == pytest.approx(_steps(mirrored))


def test_a_variant_mirrors_the_stages_it_took_from_the_prefix_cache(tmp_path):
    """Cached events are written before the trainer's first event: the mirror sends them first."""
    cached = [parse_event({"type": "step", "t": 1.0, "stage": 0, "step": s, "global_step": s, "loss": 2.0 / s,
                           "lr": 1e-3, "tokens_per_s": 1.0, "tokens": s, "flops": s, "cached": True}) for s in (1, 2)]
    start = parse_event({"type": "start", "t": 2.0, "run": "v1", "plan": "p", "seed": 0, "device": "cpu", "pid": 1,
                         "params": 10, "stages": 2, "resumed": False, "prefix_cached": True})
    step = cached[0].model_copy(update={"stage": 1, "step": 1, "global_step": 3, "loss": 0.5, "cached": False})
    mirror = trackers.Mirror(["csv"], lambda name, info: trackers.CsvTracker(info, tmp_path),
                             lambda source, message: pytest.fail(message), cached=lambda: cached)
    for event in (start, step, parse_event({"type": "status", "t": 3.0, "state": "done"})):
        mirror(event)
    with open(tmp_path / "scalars.csv", newline="") as f:
        losses = {int(r["global_step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}
    assert losses == {1: 2.0, 2: 1.0, 3: 0.5}
