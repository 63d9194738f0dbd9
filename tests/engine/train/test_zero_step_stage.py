"""A stage of 0 steps that grows nothing (a plan's "score the pretrained model" stage) leaves the
model as the initial evaluation measured it: its row is that row, emitted without evaluating again
(minutes on a real model)."""

from __future__ import annotations

from engine.plan import load_plan
from engine.train.evaluation import Evaluator
from engine.train.loop import Trainer
from widen_tui.launcher import create_run


def test_a_zero_step_stage_reuses_the_row_before_it(tiny_plan, widen_home, monkeypatch):
    overrides = ["stages.0.steps=0", "stages.1.steps=1", "train.eval_interval=0"]
    run = create_run(load_plan(tiny_plan, overrides), tiny_plan, widen_home)
    evaluated = []
    real = Evaluator.__call__
    monkeypatch.setattr(Evaluator, "__call__",
                        lambda self, m, task, score=False: evaluated.append(task) or real(self, m, task, score))
    Trainer(run.path).run_plan()
    matrix = run.results()["matrix"]
    assert matrix["rows"] == ["initial", "after 1:prose", "after 2:python"]
    assert matrix["ppl"][0] == matrix["ppl"][1]  # the same numbers, in the events and the results
    assert matrix["ppl"][2] != matrix["ppl"][1]  # stage 2 grew and trained: measured anew
    assert evaluated == ["prose", "python", "prose", "python"]  # initial, then after stage 2 only
