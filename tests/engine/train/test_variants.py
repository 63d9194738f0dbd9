"""Variants share their common stages (trained once, cached by content hash); seeds multiply runs;
`widen compare` puts them side by side."""

from __future__ import annotations

import json
import textwrap

import pytest

from engine.plan import PlanError, load_plan, plan_from_dict, read_toml
from engine.runs.compare import compare_runs, loss_at

VARIANT_PLAN = textwrap.dedent("""
    name = "tiny-variants"
    seed = 3

    [model]
    source = "builtin:tiny-neo"

    [tasks.prose]
    source = "builtin:pydoc"
    eval_fraction = 0.2

    [tasks.python]
    source = "builtin:stdlib-python"
    max_docs = 40

    [train]
    batch_size = 4
    seq_len = 32
    lr = 3e-3
    eval_interval = 0
    eval_batches = 1
    log_interval = 1
    device = "cpu"

    [[stages]]
    name = "shared"
    task = "prose"
    steps = 4

    [[variants]]
    name = "lora"
    [[variants.stages]]
    task = "python"
    steps = 3
    freeze = "base"
    [[variants.stages.expand]]
    op = "lora"
    r = 4

    [[variants]]
    name = "ffn"
    [[variants.stages]]
    task = "python"
    steps = 3
    freeze = "base"
    [[variants.stages.expand]]
    op = "widen_ffn"
    size = 8
""")


@pytest.fixture
def variant_plan(tmp_path):
    path = tmp_path / "variants.toml"
    path.write_text(VARIANT_PLAN)
    return path


def test_for_variant_appends_the_variants_stages(variant_plan):
    plan = load_plan(variant_plan)
    lora = plan.for_variant("lora")
    assert [s.task for s in lora.stages] == ["prose", "python"]
    assert lora.stages[1].expand[0].op == "lora" and not lora.variants
    with pytest.raises(KeyError):
        plan.for_variant("nope")


def test_prefix_key_covers_what_the_prefix_depends_on(variant_plan):
    plan = load_plan(variant_plan)
    lora, ffn = plan.for_variant("lora"), plan.for_variant("ffn")
    assert lora.prefix_key(1) == ffn.prefix_key(1)          # same shared stage
    assert lora.prefix_key(2) != ffn.prefix_key(2)          # different own stages
    assert load_plan(variant_plan, ["stages.0.steps=5"]).prefix_key(1) != plan.prefix_key(1)
    assert load_plan(variant_plan, seed=4).prefix_key(1) != plan.prefix_key(1)
    assert load_plan(variant_plan, ["tasks.python.max_docs=41"]).prefix_key(1) != plan.prefix_key(1)
    renamed = load_plan(variant_plan, ["stages.0.name=\"other\""])
    assert renamed.prefix_key(1) == plan.prefix_key(1)      # a label is not content


def test_variant_problems_name_their_field(variant_plan):
    raw = read_toml(variant_plan)
    raw["variants"][1]["name"] = "lora"
    raw["variants"][0]["stages"][0]["task"] = "poetry"
    raw["variants"][0]["stages"][0]["expand"][0]["rank"] = 4
    with pytest.raises(PlanError) as e:
        plan_from_dict(raw)
    text = str(e.value)
    assert "variants.0.stages.0.task: unknown task 'poetry'" in text
    assert "variants.1.name: 'lora' names two variants" in text
    assert "variants.0.stages.0.expand.0.rank" in text


def test_a_plan_needs_a_stage_somewhere():
    with pytest.raises(PlanError, match="stages: is required"):
        plan_from_dict({"name": "x", "tasks": {"a": {"source": "builtin:pydoc"}}})


def test_grow_operators_are_checked_against_the_model(variant_plan):
    from engine.plan import validate_file

    _, problems = validate_file(variant_plan, ["variants.0.stages.0.grow={expand=[{op=\"widen_ffn\", size=8, "
                                               "layers=[7]}]}"])
    assert any(p.path == "variants.0.stages.0.grow.expand.0.layers" and "out of range" in p.message
               for p in problems), problems


def test_create_runs_chains_variants_and_seeds(variant_plan, widen_home):
    from widen_tui.launcher import create_runs

    runs = create_runs(load_plan(variant_plan), variant_plan, seeds=[0, 1])
    infos = [r.info() for r in runs]
    assert [(i["variant"], i["seed"]) for i in infos] == [("lora", 0), ("ffn", 0), ("lora", 1), ("ffn", 1)]
    assert infos[0].get("after") is None and [i["after"] for i in infos[1:]] == [r.id for r in runs[:-1]]
    assert len({i["group"] for i in infos}) == 1 and all(i["prefix_stages"] == 1 for i in infos)
    assert load_plan(runs[3].plan).seed == 1 and len(load_plan(runs[3].plan).stages) == 2


@pytest.mark.slow
def test_second_variant_starts_from_the_cached_prefix_and_matches_an_uncached_run(variant_plan, widen_home):
    """The cache changes nothing but time: variant B from the cache == variant B trained alone."""
    import shutil

    from engine.runs.events import read_all
    from engine.train.session import run
    from widen_tui.launcher import create_runs

    first, second = create_runs(load_plan(variant_plan), variant_plan)
    assert run(first.path) == 0 and run(second.path) == 0
    a, b = first.results(), second.results()
    assert not a["summary"]["prefix_cached"] and b["summary"]["prefix_cached"]
    assert a["matrix"]["loss"][:2] == b["matrix"]["loss"][:2]   # initial + shared stage rows, copied
    cached = [e for e in read_all(second.events) if e.cached]
    assert any(e.type == "step" for e in cached) and any(e.type == "stage" for e in cached)
    assert not any(e.type == "progress" for e in cached)  # live only: the first run's loading is not replayed
    assert b["stages"][0]["name"] == "shared" and b["stages"][1]["task"] == "python"

    # the same variant with no cache: trains the shared stage itself, same figures
    shutil.rmtree(widen_home / ".cache" / "prefix")
    (alone,) = [r for r in create_runs(load_plan(variant_plan), variant_plan) if r.info()["variant"] == "ffn"]
    json_info = json.loads(alone.run_json.read_text())
    json_info.pop("after", None)
    alone.run_json.write_text(json.dumps(json_info))
    assert run(alone.path) == 0
    c = alone.results()
    assert not c["summary"]["prefix_cached"]
    flat = [x for row in c["matrix"]["loss"] for x in row]
    assert flat == pytest.approx([x for row in b["matrix"]["loss"] for x in row], abs=1e-5)

    data = compare_runs([(r.info(), r.status(), r.results()) for r in (first, second)],
                        [read_all(r.events) for r in (first, second)])
    assert [g["variant"] for g in data["groups"]] == ["lora", "ffn"]
    lora = data["runs"][0]
    assert lora["trainable"] > 0 and lora["forgetting"]["prose"] is not None
    assert lora["loss_at_equal_flops"] is not None


def test_compare_groups_seeds_into_mean_and_std():
    def fake(seed, ppl, forget):
        info = {"id": f"r{seed}", "name": "p-v", "plan_name": "p", "variant": "v", "seed": seed}
        results = {"tasks": ["a"], "summary": {"params": 10, "trainable": 2, "trainable_share": 0.2,
                                               "final_ppl": {"a": ppl}, "forgetting": {"a": forget}}}
        return info, {"state": "done"}, results

    data = compare_runs([fake(0, 10.0, 0.1), fake(1, 12.0, 0.3)])
    (group,) = data["groups"]
    assert group["final_ppl"]["a"]["mean"] == pytest.approx(11.0)
    assert group["final_ppl"]["a"]["std"] == pytest.approx(2 ** 0.5)
    assert group["forgetting"]["a"]["n"] == 2 and data["seeded"]
    assert "positive = worse retention" in data["sign_convention"]


def test_compare_shows_the_parameters_a_token_goes_through_beside_all():
    """A mixture of experts' runs: `active_params` (the top-k experts, not all of them) in the JSON
    and an "active" column; runs where every parameter is active (dense) need no such column."""
    from rich.console import Console

    from widen_tui.views.report import comparison_view

    def fake(variant, seed, params, active):
        info = {"id": f"{variant}{seed}", "name": f"p-{variant}", "plan_name": "p", "variant": variant, "seed": seed}
        summary = {"params": params, "active_params": active, "final_ppl": {"a": 10.0}, "forgetting": {"a": None}}
        return info, {"state": "done"}, {"tasks": ["a"], "summary": summary}

    def table(data):
        console = Console(width=200, record=True)
        console.print(comparison_view(data))
        return console.export_text()

    data = compare_runs([fake("dense", 0, 759_296, 759_296), fake("moe", 0, 2_346_496, 1_289_728),
                         fake("moe", 1, 2_346_496, 1_289_728)])
    assert [g["active_params"]["mean"] for g in data["groups"]] == [759_296, 1_289_728]
    assert data["runs"][1]["active_params"] == 1_289_728
    text = table(data)
    assert "active" in text and "1,289,728±0" in text and "2,346,496±0" in text
    assert "active" not in table(compare_runs([fake("dense", 0, 759_296, 759_296)]))


def test_loss_at_interpolates_between_logged_points():
    curve = [(10.0, 4.0), (20.0, 2.0)]
    assert loss_at(curve, 15.0) == pytest.approx(3.0)
    assert loss_at(curve, 5.0) is None and loss_at(curve, 25.0) is None


def test_compare_cli_prints_the_table(variant_plan, widen_home, tmp_path):
    """compare reads run directories alone: fake two finished runs and compare them."""
    from conftest import widen

    from widen_tui.launcher import create_runs

    runs = create_runs(load_plan(variant_plan), variant_plan)
    for run, ppl in zip(runs, (9.0, 11.0)):
        run.results_json.write_text(json.dumps({
            "tasks": ["prose", "python"], "state": "done",
            "summary": {"params": 100, "params_added": 7, "trainable": 7, "trainable_share": 0.07,
                        "final_ppl": {"prose": ppl, "python": ppl}, "forgetting": {"prose": 0.01, "python": None},
                        "bwt": -0.01, "wall_s": 3.0}}))
        run.status_json.write_text(json.dumps({"state": "done"}))
    proc = widen("compare", runs[0].id, runs[1].id, env_home=widen_home)
    assert proc.returncode == 0, proc.stderr
    assert "lora" in proc.stdout and "ffn" in proc.stdout and "forget" in proc.stdout
    proc = widen("compare", runs[0].id, runs[1].id, "--json", env_home=widen_home)
    data = json.loads(proc.stdout)
    assert data["groups"][1]["final_ppl"]["prose"]["mean"] == 11.0


def test_task_modules_need_a_frozen_base_and_switchable_ops(variant_plan):
    raw = read_toml(variant_plan)
    raw["task_modules"] = True
    raw["variants"][1]["stages"][0]["expand"][0]["mode"] = "inplace"
    raw["variants"][0]["stages"][0]["freeze"] = "none"
    raw["variants"][0]["stages"][0]["expand"].append({"op": "insert_identity", "layers": [0]})
    with pytest.raises(PlanError) as e:
        plan_from_dict(raw)
    text = str(e.value)
    assert 'variants.0.stages.0.freeze: task_modules keeps the shared base frozen' in text
    assert "variants.0.stages.0.expand.1.op: insert_identity changes the shared base" in text
    assert 'variants.1.stages.0.expand.0.mode: task_modules needs mode = "parallel"' in text


@pytest.mark.slow
def test_a_variant_waiting_for_its_turn_is_queued_and_can_be_cancelled(variant_plan, widen_home):
    """The second run of a group waits (state `queued`, heartbeat fresh) while the first runs;
    `widen cancel` ends it as `cancelled` without training anything."""
    import os
    import socket
    import time

    from engine.runs.rundir import write_json_atomic
    from tests.conftest import widen
    from widen_tui.launcher import create_runs, start_worker

    first, second = create_runs(load_plan(variant_plan), variant_plan)
    # the first run "runs" as this test process: alive, same host
    write_json_atomic(first.status_json, {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                          "heartbeat": time.time()})
    start_worker(second)
    deadline = time.time() + 60
    while second.status().get("waiting_for") != first.id:
        assert time.time() < deadline, second.status()
        time.sleep(0.3)
    assert second.status()["state"] == "queued"
    assert widen("cancel", second.id, env_home=widen_home).returncode == 0
    while second.status()["state"] == "queued":
        assert time.time() < deadline, second.status()
        time.sleep(0.3)
    assert second.status()["state"] == "cancelled" and not second.results_json.exists()


def test_plan_show_builds_every_variant(variant_plan, widen_home):
    from tests.conftest import widen

    proc = widen("plan", "show", str(variant_plan), "--json", env_home=widen_home)
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)
    assert sorted(reports) == ["ffn", "lora"]
    assert reports["lora"][0]["op"] == "lora" and reports["ffn"][0]["op"] == "widen_ffn"
    assert all(r["exact"] for rs in reports.values() for r in rs)
