"""The mapping sweep on a trained run: a plan's [sweep] scores mappings of the model it trained
(identity == the trained model, exactly), and `widen sweep mapping --model RUN` does it again."""

from __future__ import annotations

import json

import pytest

from engine.plan import load_plan
from engine.train.loop import Trainer
from tests.conftest import widen
from widen_tui.launcher import create_run

pytestmark = pytest.mark.slow


def test_a_plans_sweep_and_the_cli_on_its_run(tiny_plan, widen_home):
    plan = load_plan(tiny_plan, ["stages=[{task=\"prose\", steps=4}]",
                                 "sweep={task=\"prose\", depth=4, limit=6}"])
    run = create_run(plan, tiny_plan, widen_home)
    Trainer(run.path).run_plan()
    sweep = run.results()["sweep"]
    reference = next(r for r in sweep["rows"] if r["reference"])
    identity = next(r for r in sweep["rows"] if r["mapping"] == [0, 1, 2, 3])
    assert identity["ppl"] == pytest.approx(reference["ppl"], rel=1e-6)
    # the reference is the trained model's own held-out perplexity, as in the matrix
    prose = run.results()["matrix"]["tasks"].index("prose")
    assert reference["ppl"] == pytest.approx(run.results()["matrix"]["ppl"][-1][prose], rel=1e-4)
    assert sweep["speedup"] > 0 and len(sweep["rows"]) >= 5

    proc = widen("sweep", "mapping", "--model", run.id, "--depth", "4", "--task", "prose", "--limit", "5",
                 "--json", env_home=widen_home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ref = next(r for r in data["rows"] if r["reference"])
    ident = next(r for r in data["rows"] if r["mapping"] == [0, 1, 2, 3])
    assert ident["ppl"] == pytest.approx(ref["ppl"], rel=1e-6) and data["speedup"] is not None
