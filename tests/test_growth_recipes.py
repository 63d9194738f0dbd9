"""experiments/growth_recipes.toml: every recipe passes plan check and runs, shrunk to 4 steps
with its growths inside them, to the final shape of the scratch arm (8 × 256, the same parameter
count); the exact ones stay exact (the one-layer recipe under depth-µP scaling)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.plan import load_plan, plan_from_dict, validate_file
from engine.plan.load import read_toml
from engine.runs.events import read_all
from engine.train.loop import Trainer
from widen_tui.launcher import create_run

RECIPES = Path(__file__).resolve().parents[1] / "experiments" / "growth_recipes.toml"
STEPS = 4


def shrunk(variant: str):
    """The recipe's plan for `variant`, 4 steps of 2 × 16 bytes, its growth points spread over them
    in the order the recipe has them."""
    raw = read_toml(RECIPES)
    raw["train"].update(batch_size=2, seq_len=16, eval_interval=0, eval_batches=1, warmup_steps=1)
    raw["tasks"]["python"]["max_docs"] = 30
    for v in raw["variants"]:
        for stage in v["stages"]:
            stage["steps"] = STEPS
            grow = stage.get("grow")
            if grow:
                grow["at_steps"] = list(range(1, len(grow["at_steps"]) + 1))
                if "rewarm_steps" in grow:
                    grow["rewarm_steps"] = 1
    return plan_from_dict(raw).for_variant(variant)


def test_the_recipes_pass_plan_check():
    plan, problems = validate_file(RECIPES)
    assert not problems, [str(p) for p in problems]
    names = [v.name for v in plan.variants]
    assert names[0] == "scratch" and {"one-layer", "midas", "gstack", "sparkling"} <= set(names)
    assert load_plan(RECIPES).train.schedule == "wsd"


@pytest.fixture(scope="module")
def scratch_params(tmp_path_factory):
    plan = shrunk("scratch")
    run = create_run(plan, None, tmp_path_factory.mktemp("runs"))
    Trainer(run.path).run_plan()
    return [e for e in read_all(run.events) if e.type == "stage" and e.phase == "end"][-1].params


@pytest.mark.parametrize("variant", [v["name"] for v in read_toml(RECIPES)["variants"] if v["name"] != "scratch"])
def test_each_recipe_runs_four_steps_to_the_final_shape(variant, scratch_params, tmp_path):
    plan = shrunk(variant)
    run = create_run(plan, None, tmp_path)
    Trainer(run.path).run_plan()
    events = list(read_all(run.events))
    assert [e.state for e in events if e.type == "status"][-1] == "done"
    grows = [e for e in events if e.type == "expand" and e.trigger == "at"]
    assert sorted({g.growth for g in grows}) == list(range(len(plan.stages[-1].grow.at_steps)))
    end = [e for e in events if e.type == "stage" and e.phase == "end"][-1]
    assert end.params == scratch_params  # 8 × 256, as the scratch arm
    exact = {"one-layer", "one-layer-plain", "sparkling"}  # insert_identity (depth-µP or not); duplicate, net2net
    if variant in exact:
        assert all(g.max_abs_logit_delta <= 1e-4 for g in grows), [(g.op, g.max_abs_logit_delta) for g in grows]
