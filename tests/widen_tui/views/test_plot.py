"""`widen plot` and widen_tui/views/plot.py: PNG figures from hand-written run directories (events and
results.json in the documented shapes; no engine, no torch)."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import pytest

from engine.runs import curves as curve_model
from engine.runs.events import EventWriter
from engine.runs.records import EventRecord, ExpandEvent, StageEvent, StartEvent, StepEvent, parse_event
from engine.runs.rundir import RunDir, write_json_atomic
from tests.conftest import widen
from widen_tui.index import RunIndex
from widen_tui.views import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ("prose", "python")


def assert_png(path: Path, min_bytes: int = 8_000) -> None:
    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


def fake_events(*, steps=(20, 20), params=(900_000, 1_030_000), batch_tokens=128, eval_interval=5,
                growth_at: int | None = None, legacy: bool = False, seed: int = 0) -> list[EventRecord]:
    """The events of a two-stage run (prose, then widen+python), written the way engine/train/loop.py
    writes them; `growth_at`: a plateau growth mid stage 2; `legacy`: no tokens/flops (older runs;
    null in the step events, which carry the keys)."""
    events: list[EventRecord] = []
    t = [1000.0]

    def emit(kind, **fields):
        t[0] += 1
        if legacy:
            for key in ("tokens", "flops"):
                if kind == "step":
                    fields[key] = None
                else:
                    fields.pop(key, None)
        events.append(parse_event({"type": kind, "t": t[0], **fields}))

    emit("start", run="r", plan="tiny", seed=seed, device="cpu", pid=1, params=params[0], stages=2,
         resumed=False, task_names=list(TASKS), stage_steps=list(steps))
    tokens, flops, g = 0, 0.0, 0
    base = {"prose": 5.5 + 0.1 * seed, "python": 5.6}

    def evaluate(stage, step, trained):
        for task in TASKS:
            loss = base[task] - (1.8 if task in trained else 0.4) * (1 - math.exp(-g / 15))
            if task == "prose" and "python" in trained:
                loss += 0.15  # forgetting
            emit("eval", stage=stage, step=step, task=task, loss=loss, ppl=math.exp(loss),
                 bpb=loss / math.log(2), tokens=tokens)

    evaluate(-1, 0, ())
    for stage, (task, n) in enumerate(zip(TASKS, steps)):
        name = "prose" if stage == 0 else "widen+python"
        emit("stage", stage=stage, name=name, task=task, steps=n, phase="begin")
        model = params[stage]
        if stage == 1:
            emit("expand", stage=1, op="widen_ffn", params_before=params[0], params_after=params[1],
                 params_added=params[1] - params[0], trainable=params[1] - params[0], exact=True,
                 max_abs_logit_delta=0.0, loss_before=3.9, loss_after=3.9)
        trained = TASKS[:stage + 1]
        for step in range(1, n + 1):
            g += 1
            tokens += batch_tokens
            flops += batch_tokens * 6 * model
            loss = 5.5 - 2.0 * (1 - math.exp(-g / 12)) + (0.6 if stage == 1 and step < 4 else 0.0)
            emit("step", stage=stage, step=step, global_step=g, loss=loss + 0.05 * math.sin(g), lr=1e-3,
                 tokens_per_s=5000.0, tokens=tokens, flops=flops)
            if growth_at is not None and stage == 1 and step == growth_at:
                model += 65_000
                emit("expand", stage=1, op="widen_ffn", params_before=model - 65_000, params_after=model,
                     params_added=65_000, trainable=65_000, exact=True, max_abs_logit_delta=0.0,
                     loss_before=loss, loss_after=loss, trigger="plateau", growth=1, step=step,
                     global_step=g, tokens=tokens, flops=flops)
            if step % eval_interval == 0 and step < n:
                evaluate(stage, step, trained)
        evaluate(stage, n, trained)
        emit("stage", stage=stage, name=name, task=task, steps=n, phase="end", params=model, trainable=model)
    emit("status", state="done")
    return events


def fake_results(events: list[EventRecord], with_sweep: bool = False) -> dict:
    matrix = curve_model.matrix_from_events(events)
    matrix.pop("trained")
    results = {"run": "r", "plan": "tiny", "state": "done", "tasks": list(TASKS), "matrix": matrix,
               "stages": [{"stage": 0, "name": "prose", "task": "prose", "total": 900_000, "trainable": 900_000,
                           "trainable_share": 1.0},
                          {"stage": 1, "name": "widen+python", "task": "python", "total": 1_030_000,
                           "trainable": 130_000, "trainable_share": 0.126}],
               "expansions": [], "summary": {"final_ppl": {}}}
    if with_sweep:
        results["sweep"] = SWEEP
    return results


SWEEP = {"task": "prose", "depth": 8, "rows": [
    {"mapping": [0, 1, 2, 3], "ppl": 14.2, "reference": True},
    {"mapping": [0, 1, 2, 3, 0, 1, 2, 3], "ppl": 31.8, "reference": False},
    {"mapping": [0, 1, 1, 1, 2, 2, 2, 3], "ppl": 19.4, "reference": False},
    {"mapping": [0, 0, 1, 1, 2, 2, 3, 3], "ppl": 17.9, "reference": False},
    {"mapping": [0, 1, 2, 2, 2, 2, 2, 3], "ppl": 22.5, "reference": False},
    {"mapping": [0, 1, 1, 2, 2, 1, 2, 3], "ppl": 26.0, "reference": False},
]}


def make_run(root: Path, run_id: str, events: list[EventRecord], results: dict | None = None, name: str = "tiny",
             created: str = "2025-01-01T00:00:00") -> RunDir:
    """A run directory as the launcher and the worker leave it."""
    run = RunDir(root / run_id)
    write_json_atomic(run.run_json, {"id": run_id, "name": name, "seed": 0, "plan_path": None,
                                     "created": created, "created_ts": time.time()})
    writer = EventWriter(run.events)
    for e in events:
        writer.emit(e.type, **{k: v for k, v in e.to_json().items() if k not in ("type", "t")})
    writer.close()
    state = "done" if events else "queued"
    write_json_atomic(run.status_json, {"state": state, "pid": None, "host": socket.gethostname(),
                                        "heartbeat": time.time()})
    if results is not None:
        write_json_atomic(run.results_json, results)
    return run


# ---------------------------------------------------------------------------------------------
# the figure functions


@pytest.mark.parametrize("x", ["steps", "tokens", "flops"])
def test_two_runs_overlay_on_each_x_axis(tmp_path, x):
    a = fake_events()
    b = fake_events(params=(900_000, 1_400_000), seed=1, growth_at=10)
    warnings: list[str] = []
    path = plot.loss_figure([("tiny zero-init", a), ("tiny wide", b)], tmp_path / f"loss-{x}.png", x=x,
                            warn=warnings.append)
    assert path == tmp_path / f"loss-{x}.png"
    assert_png(path, 30_000)
    assert warnings == []


def test_plateau_growth_event_is_placed_by_its_own_step(tmp_path):
    events = fake_events(growth_at=7)
    curves = curve_model.curves_from_events("grown", events)
    assert [p.g for p in curves.growths] == [20 + 7]
    assert [e.stage for e in curves.expansions] == [1]
    # a stage-end eval (step == the stage's steps) sits at the end of its stage, by tokens too
    end = [p for p in curves.evals if p.event.stage == 0 and p.event.step == 20]
    assert {p.g for p in end} == {20}
    assert curves.x_of(end[0], "tokens") == 20 * 128
    assert curves.x_of(curves.growths[0], "flops") == curves.growths[0].event.flops
    assert curves.at(20, "flops") == pytest.approx(20 * 128 * 6 * 900_000)
    assert_png(plot.loss_figure([("grown", events)], tmp_path / "loss.png", x="flops"), 30_000)


def test_resumed_run_events_are_deduplicated():
    events = fake_events()
    cut = next(i for i, e in enumerate(events) if isinstance(e, StepEvent) and e.stage == 1 and e.step == 6)
    # the worker died after stage 2 step 6; the resume re-emits start, stage begin and the expansion
    replay = [e for e in events[:cut + 1] if isinstance(e, StartEvent)
              or (isinstance(e, StageEvent | ExpandEvent) and e.stage == 1)]
    resumed = events[:cut + 1] + replay + [e for e in events if isinstance(e, StepEvent) and e.stage == 1
                                           and 4 <= e.step <= 6] + events[cut + 1:]
    curves = curve_model.curves_from_events("resumed", resumed)
    assert len(curves.steps) == 40
    assert len(curves.expansions) == 1
    assert [e.global_step for e in curves.steps] == list(range(1, 41))


def test_older_events_without_tokens_fall_back_to_steps(tmp_path):
    warnings: list[str] = []
    path = plot.loss_figure([("new", fake_events()), ("old", fake_events(legacy=True))], tmp_path / "loss.png",
                            x="tokens", warn=warnings.append)
    assert_png(path)
    assert len(warnings) == 1 and "old" in warnings[0] and "global step" in warnings[0]


def test_forgetting_heatmap(tmp_path):
    events = fake_events()
    matrix = curve_model.matrix_from_events(events)
    assert matrix["rows"] == ["initial", "after prose", "after widen+python"]
    assert matrix["trained"] == [None, "prose", "python"]
    assert len(matrix["bpb"]) == 3 and all(len(r) == 2 for r in matrix["bpb"])
    path = plot.forgetting_figure(fake_results(events)["matrix"], tmp_path / "forgetting-r.png", run="tiny",
                                  trained=matrix["trained"])
    assert_png(path)
    # loss only (no bits per byte, e.g. a generation task): still drawn
    loss_only = {k: v for k, v in matrix.items() if k not in ("bpb", "ppl")}
    assert_png(plot.forgetting_figure(loss_only, tmp_path / "forgetting-loss.png"))
    with pytest.raises(plot.PlotError):
        plot.forgetting_figure({"rows": ["initial"], "tasks": ["a"]}, tmp_path / "bad.png")


def test_mapping_heatmap_from_a_json_file(tmp_path):
    source = tmp_path / "sweep.json"
    source.write_text(json.dumps(SWEEP))
    path = plot.mapping_figure(json.loads(source.read_text()), tmp_path / "mapping-sweep.png", title="sweep")
    assert_png(path)
    # a bare list of rows, "perplexity" spelled out, a reference row without a mapping
    rows = [{"mapping": "reference", "perplexity": 10.0, "reference": True}] + SWEEP["rows"][1:]
    assert_png(plot.mapping_figure(rows, tmp_path / "mapping-bare.png"))
    with pytest.raises(plot.PlotError):
        plot.mapping_figure({"rows": []}, tmp_path / "empty.png")


def test_human_numbers():
    assert curve_model.human(131_584) == "132k"
    assert curve_model.human(2_500_000) == "2.5M"
    assert curve_model.human(65_000) == "65k"
    assert curve_model.human(12) == "12"


# ---------------------------------------------------------------------------------------------
# through the real CLI


def test_widen_plot_cli(widen_home, tmp_path):
    first = fake_events()
    second = fake_events(params=(900_000, 1_400_000), seed=1, growth_at=10)
    make_run(widen_home, "20250101-000000-tiny-aaaa", first, fake_results(first), name="tiny")
    make_run(widen_home, "20250101-000100-tiny-wide-bbbb", second, fake_results(second, with_sweep=True),
             name="tiny-wide", created="2025-01-01T00:01:00")
    make_run(widen_home, "20250101-000200-empty-cccc", [], name="empty", created="2025-01-01T00:02:00")
    assert RunIndex(widen_home).rebuild() == 3
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(SWEEP))
    out = tmp_path / "figs"

    proc = widen("plot", "20250101-000000", "tiny-wide", str(sweep), "--x", "flops", "--out", str(out),
                 env_home=widen_home, check=True)
    written = [Path(line) for line in proc.stdout.split()]
    assert {p.name for p in written} == {"loss.png", "forgetting-20250101-000000-tiny-aaaa.png",
                                         "forgetting-20250101-000100-tiny-wide-bbbb.png",
                                         "mapping-20250101-000100-tiny-wide-bbbb.png", "mapping-sweep.png"}
    for path in written:
        assert path.parent == out
        assert_png(path)

    # one run (by its directory): figures/ inside the run directory
    run_dir = widen_home / "20250101-000000-tiny-aaaa"
    proc = widen("plot", str(run_dir), env_home=widen_home, check=True)
    assert sorted(Path(p).name for p in proc.stdout.split()) == ["forgetting-20250101-000000-tiny-aaaa.png",
                                                                 "loss.png"]
    assert_png(run_dir / "figures" / "loss.png")

    # errors: one line on stderr, non-zero exit
    proc = widen("plot", "last", env_home=widen_home)
    assert proc.returncode == 1 and "no events yet" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = widen("plot", "tiny-wide", "--x", "bananas", env_home=widen_home)
    assert proc.returncode == 1 and "--x must be one of" in proc.stderr
    proc = widen("plot", "nosuchrun", env_home=widen_home)
    assert proc.returncode == 1 and "no run 'nosuchrun'" in proc.stderr
    proc = widen("plot", str(tmp_path / "missing.json"), env_home=widen_home)
    assert proc.returncode == 1 and "no such file" in proc.stderr
