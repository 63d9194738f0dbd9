"""The event stream contract, incremental reading, and the continual-learning figures."""

from __future__ import annotations

import json

import pytest

from engine.runs import forgetting as metrics
from engine.runs.events import EventReader, EventWriter
from engine.runs.records import (
    EVENT_TYPES,
    EventError,
    GenericEvent,
    StatusEvent,
    SystemEvent,
    build_event,
    parse_event,
)
from engine.train.system import SystemMonitor


def test_reader_returns_only_new_events_and_waits_for_whole_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    reader = EventReader(path)
    assert reader.read_new() == []
    writer.emit("status", state="running")
    assert [e.state for e in reader.read_new()] == ["running"]
    assert reader.read_new() == []
    with open(path, "a") as f:  # a line caught half-written
        f.write('{"type": "status", "t": 1, "sta')
    assert reader.read_new() == []
    with open(path, "a") as f:
        f.write('te": "done"}\n')
    assert [e.state for e in reader.read_new()] == ["done"]
    with open(path, "a") as f:  # a torn line from a crash is skipped, reading goes on
        f.write('{"type": \n')
    writer.emit("status", state="failed", error="x")
    assert [e.state for e in reader.read_new()] == ["failed"]


def test_schema_validation():
    assert isinstance(parse_event({"type": "status", "t": 0, "state": "done"}), StatusEvent)
    with pytest.raises(EventError, match="^eval event lacks step, loss, ppl, bpb$"):
        parse_event({"type": "eval", "t": 0, "stage": 0, "task": "x"})
    with pytest.raises(EventError, match="^step event: loss is a string, not a number$"):
        parse_event({"type": "step", "t": 0, "stage": 0, "step": 1, "global_step": 1, "loss": "2.5", "lr": None,
                     "tokens_per_s": None, "tokens": None, "flops": None})
    with pytest.raises(EventError, match="^checkpoint event: stage is a boolean, not an integer$"):
        parse_event({"type": "checkpoint", "t": 0, "stage": True, "step": 1, "path": "x", "reason": "y"})
    # a newer engine's event type is kept as a generic record; the writer knows only its own types
    newer = parse_event({"type": "nope", "t": "whenever", "x": 1})
    assert isinstance(newer, GenericEvent) and newer.x == 1 and newer.to_json() == {"type": "nope", "t": "whenever",
                                                                                     "x": 1}
    with pytest.raises(EventError, match="unknown event type 'nope'"):
        build_event("nope", {"type": "nope", "t": 0})
    assert set(EVENT_TYPES) >= {"start", "step", "eval", "expand", "system", "stage", "checkpoint", "status"}


def test_records_keep_what_was_written(tmp_path):
    """Optional keys are checked when present, unknown keys kept; a record is written back as it
    was read (its keys in their order, no defaults added); ints stay ints."""
    line = {"type": "eval", "t": 1.5, "stage": 0, "step": 4, "task": "prose", "tokens": 128, "global_step": 4,
            "loss": 2, "ppl": None, "bpb": 1.25, "exact_match": 0.5}
    record = parse_event(line)
    assert record.loss == 2 and isinstance(record.loss, int) and record.exact_match == 0.5
    assert record.number("exact_match") == 0.5 and record.number("ppl") is None and record.number("nope") is None
    assert list(record.to_json().items()) == list(line.items())
    with pytest.raises(EventError, match="^eval event: tokens is a string, not a number$"):
        parse_event({**line, "tokens": "many"})
    writer = EventWriter(tmp_path / "e.jsonl")
    with pytest.raises(EventError, match="^step event lacks tokens_per_s, tokens, flops$"):
        writer.emit("step", stage=0, step=1, global_step=1, loss=1.0, lr=1e-3)
    with pytest.raises(EventError, match="^status event: error is an integer, not a string$"):
        writer.emit("status", state="failed", error=3)
    writer.emit("eval", **{k: v for k, v in line.items() if k not in ("type", "t")})
    writer.close()
    written = json.loads((tmp_path / "e.jsonl").read_text())
    assert list(written)[2:] == list(line)[2:] and written["loss"] == 2  # nothing else was written


def test_writer_serialises_numpy_and_torch_scalars(tmp_path):
    import numpy as np
    import torch

    writer = EventWriter(tmp_path / "e.jsonl")
    writer.emit("status", state="running", a=np.float32(1.5), b=torch.tensor(2))
    line = json.loads((tmp_path / "e.jsonl").read_text())
    assert line["a"] == 1.5 and line["b"] == 2


def test_system_sample_without_gpu_is_clean():
    sample = SystemMonitor().sample()
    assert isinstance(parse_event({"type": "system", "t": 0, **sample}), SystemEvent)
    assert sample["rss_mb"] > 0
    if not sample["gpus"]:
        assert sample["gpu_status"].startswith("no GPU")


def row(**losses):
    return {t: {"loss": v, "bpb": v, "ppl": 2.718281828 ** v} for t, v in losses.items()}


def test_forgetting_is_max_based_and_positive_when_worse():
    # initial, after stage 0 (a), after stage 1 (b), after stage 2 (a again)
    matrix = [row(a=5.0, b=5.0), row(a=2.0, b=4.0), row(a=2.5, b=1.5), row(a=1.8, b=2.0)]
    trained_at = {"a": 0, "b": 1}
    f = metrics.forgetting(matrix, trained_at)
    assert f["a"]["absolute"] == pytest.approx(1.8 - 2.0)   # improved: negative forgetting
    assert f["b"]["absolute"] == pytest.approx(2.0 - 1.5)   # worse than its best: positive
    assert f["b"]["relative"] == pytest.approx(0.5 / 1.5)
    # BWT (GEM, on -loss): a: 2.0 - 1.8, b: 1.5 - 2.0 -> mean -0.15 (later stages hurt on balance)
    assert metrics.backward_transfer(matrix, trained_at) == pytest.approx(-0.15)
    # FWT against the base model (row 0): only b is trained after the first stage; before its
    # stage (row 1) its loss was 4.0, the base model's 5.0 -> +1.0 (stage 0 helped b)
    assert metrics.forward_transfer(matrix, trained_at) == pytest.approx(1.0)
    # ACC: mean final loss
    assert metrics.average_final(matrix) == pytest.approx((1.8 + 2.0) / 2)
    summary = metrics.continual_summary(matrix, trained_at)
    assert summary["metric"] == "bpb" and "positive = worse retention" in summary["sign_convention"]


def test_task_trained_last_has_no_forgetting():
    matrix = [row(a=5.0, b=5.0), row(a=2.0, b=4.0), row(a=2.5, b=1.5)]
    f = metrics.forgetting(matrix, {"a": 0, "b": 1})
    assert f["b"] is None and f["a"]["absolute"] == pytest.approx(0.5)
