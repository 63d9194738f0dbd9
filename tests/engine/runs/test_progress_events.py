"""`progress` events: what the worker is busy with while no step comes (loading, tokenizing,
evaluating). The record, the throttle that writes few of them, the fold that shows the latest
until a step, eval or stage event ends it, the trackers leaving them out, and a real tiny run."""

from __future__ import annotations

import pytest

from engine.plan import load_plan
from engine.runs import trackers
from engine.runs.events import ThrottledProgress, read_all
from engine.runs.progress import RunProgress
from engine.runs.records import EventError, ProgressEvent, StartEvent, build_event, parse_event
from engine.train.loop import Trainer
from widen_tui.launcher import create_run


def progress(t: float, phase: str, what: str, done: int = 0, total: int | None = None) -> ProgressEvent:
    return parse_event({"type": "progress", "t": t, "phase": phase, "what": what, "done": done, "total": total})


def step(t: float, n: int):
    return parse_event({"type": "step", "t": t, "stage": 0, "step": n, "global_step": n, "loss": 2.0, "lr": 1e-3,
                        "tokens_per_s": 10.0, "tokens": 8 * n, "flops": 1.0})


def evaluated(t: float, task: str):
    return parse_event({"type": "eval", "t": t, "stage": -1, "step": 0, "task": task, "loss": 2.0, "ppl": 7.4,
                        "bpb": 1.0})


START = {"type": "start", "t": 5.0, "run": "r", "plan": "tiny", "seed": 0, "device": "cpu", "pid": 1,
         "params": 10, "stages": 1, "resumed": False, "stage_steps": [4]}


def test_the_record():
    event = progress(1.0, "evaluate", "prose", 5, 8)
    assert isinstance(event, ProgressEvent) and (event.phase, event.what, event.done, event.total) == \
        ("evaluate", "prose", 5, 8)
    assert event.to_json() == {"type": "progress", "t": 1.0, "phase": "evaluate", "what": "prose", "done": 5,
                               "total": 8}
    loading = build_event("progress", {"type": "progress", "t": 1.0, "phase": "load", "what": "model", "done": 0})
    assert loading.total is None and "total" not in loading.to_json()  # not known: not written
    assert progress(1.0, "compile", "model").phase == "compile"  # a newer engine's phase: kept as written
    with pytest.raises(EventError, match="^progress event lacks what, done$"):
        parse_event({"type": "progress", "t": 1.0, "phase": "load"})
    with pytest.raises(EventError, match="^progress event: done is a string, not an integer$"):
        parse_event({"type": "progress", "t": 1.0, "phase": "evaluate", "what": "prose", "done": "5", "total": 8})


def test_the_fold_shows_the_latest_until_a_step_eval_or_stage_ends_it():
    p = RunProgress()
    p.update(progress(1.0, "load", "tokenizer"))
    assert p.activity.what == "tokenizer" and p.state == "running"  # before `start`: a worker at work
    p.update(progress(2.0, "load", "model"))
    p.update(progress(9.0, "tokenize", "prose", 0, 2))
    assert (p.activity.phase, p.activity_since, p.activity_s(now=12.0)) == ("tokenize", 9.0, 3.0)
    p.update(parse_event(START))
    assert p.activity is None and p.activity_s() is None

    p.update(progress(10.0, "evaluate", "prose", 0, 8))
    p.update(progress(14.0, "evaluate", "prose", 5, 8))
    assert p.activity.done == 5 and p.activity_since == 10.0  # the same evaluation: its start stays
    p.update(evaluated(15.0, "prose"))
    assert p.activity is None  # no stale "evaluating" line once its result is in
    p.update(progress(15.5, "evaluate", "python", 0, 8))
    assert p.activity_since == 15.5  # another task: a new start
    p.update(step(20.0, 1))
    assert p.activity is None
    p.update(progress(21.0, "evaluate", "prose", 0, 8))
    p.update(parse_event({"type": "stage", "t": 22.0, "stage": 0, "name": "s", "task": "prose", "steps": 4,
                          "phase": "end"}))
    assert p.activity is None
    p.update(progress(23.0, "evaluate", "prose", 0, 8))
    p.update(parse_event({"type": "status", "t": 24.0, "state": "failed", "error": "x"}))
    assert p.activity is None and p.state == "failed"
    # a cached prefix's progress (another run's) is not this run's activity
    p.update(progress(25.0, "evaluate", "prose", 0, 8).model_copy(update={"cached": True}))
    assert p.activity is None


def test_the_throttle_writes_a_start_at_once_and_updates_once_a_second():
    written, now = [], [0.0]
    report = ThrottledProgress(lambda kind, **fields: written.append(fields), clock=lambda: now[0])
    report("evaluate", "prose", 0, 100)
    for batch in range(1, 101):  # 100 quick batches in half a second
        now[0] += 0.005
        report("evaluate", "prose", batch, 100)
    assert [w["done"] for w in written] == [0]
    report("evaluate", "python", 0, 100)  # another task: at once
    report("evaluate", "prose", 0, 100)   # a start, even of the same thing: at once
    for batch in range(1, 5):  # slow batches: one each
        now[0] += 1.5
        report("evaluate", "prose", batch, 100)
    assert [(w["what"], w["done"]) for w in written] == \
        [("prose", 0), ("python", 0), ("prose", 0), ("prose", 1), ("prose", 2), ("prose", 3), ("prose", 4)]


def test_trackers_open_with_the_start_not_a_progress_before_it(tmp_path):
    opened = []

    def open_tracker(name, info):
        opened.append(info)
        return trackers.CsvTracker(info, tmp_path)

    mirror = trackers.Mirror(["csv"], open_tracker, lambda source, message: pytest.fail(message))
    mirror(progress(1.0, "load", "model"))
    assert not opened  # live only: never mirrored, and it does not open the trackers
    mirror(parse_event(START))
    assert [(info.run, info.plan) for info in opened] == [("r", "tiny")]
    mirror.close("done")


def test_a_tiny_run_reports_loading_tokenizing_and_evaluating(tiny_plan, widen_home):
    run = create_run(load_plan(tiny_plan), tiny_plan, widen_home)
    Trainer(run.path).run_plan()
    events = read_all(run.events)
    reports = [e for e in events if isinstance(e, ProgressEvent)]
    first_start = next(i for i, e in enumerate(events) if isinstance(e, StartEvent))
    before_start = [(e.phase, e.what) for e in events[:first_start]]
    assert before_start == [("load", "tokenizer"), ("load", "model"), ("tokenize", "prose"), ("tokenize", "python")]
    assert [(e.done, e.total) for e in reports[2:4]] == [(0, 2), (1, 2)]
    evaluations = [e for e in reports if e.phase == "evaluate"]
    evals = [e for e in events if e.type == "eval"]  # 5 evaluations × 2 tasks: initial, every 4 steps, stage ends
    starts = [e for e in evaluations if e.done == 0]
    assert len(starts) == len(evals) == 10 and all(e.total == 1 for e in evaluations)
    # each evaluation's start comes just before its result
    for e in evals:
        before = events[:events.index(e)]
        latest = next(x for x in reversed(before) if isinstance(x, ProgressEvent))
        assert (latest.phase, latest.what) == ("evaluate", e.task)
    # throttled: a start per phase, an update only when a second went by (never per token or step)
    assert len(reports) <= 4 + 2 * len(evals)
    print(f"{len(reports)} progress events among {len(events)}")
