"""Growth schedules from the literature: the `at` and `budget` triggers (unit tests and real
runs, a resume after an `at` growth), depth stacking (G_stack) as a mid-run growth, the exact
symmetry breaking of a growth's width copies (and the warning when copies stay twins), and
LEMON's rewarm schedule."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoConfig

from engine.grow.apply import Freezer, apply_stage
from engine.grow.growth import AtTrigger, BudgetTrigger, PlateauDetector, Progress, make_trigger
from engine.model.view import ArchView
from engine.ops import health
from engine.plan import ExpandSpec, GrowSpec, PlanError, load_plan, plan_from_dict
from engine.runs.events import read_all
from engine.train.loop import Trainer
from engine.train.optim import LrSchedule
from tests.conftest import run_until_cancelled
from tests.tiny_models import train_steps
from widen_tui.launcher import create_run

# ---------------------------------------------------------------------------------------------
# the trigger classes


def fired(trigger, points) -> list[int]:
    return [i for i, p in enumerate(points) if trigger.update(p)]


def test_at_steps_fires_after_each_point_once():
    trigger = AtTrigger([3, 5], "steps")
    assert trigger.max_growths == 2
    assert fired(trigger, [Progress(step=s) for s in range(1, 10)]) == [2, 4]  # after steps 3 and 5
    assert trigger.exhausted


def test_at_tokens_fires_once_per_update_when_points_crowd():
    """Points closer than one step's tokens fire on successive updates, in order."""
    trigger = AtTrigger([100, 150, 160], "tokens")
    progress = [Progress(step=s, tokens=64 * s) for s in range(1, 8)]   # 64, 128, 192, ...
    assert fired(trigger, progress) == [1, 2, 3]                        # 128 >= 100; 192 >= 150; then 160


def test_budget_fires_at_each_share_of_the_flops():
    trigger = BudgetTrigger(1000.0, [0.25, 0.5])
    flops = [Progress(step=s, flops=110.0 * s) for s in range(1, 10)]  # 110, 220, 330, ...
    assert fired(trigger, flops) == [2, 4]                             # 330 >= 250, 550 >= 500
    with pytest.raises(ValueError, match="fractions"):
        BudgetTrigger(1000.0, [0.5, 1.0])
    with pytest.raises(ValueError, match="increase"):
        AtTrigger([5, 5])


@pytest.mark.parametrize("make,points", [
    (lambda: AtTrigger([2, 4, 7], "steps"), [Progress(step=s) for s in range(1, 12)]),
    (lambda: BudgetTrigger(50.0, [0.2, 0.3, 0.9]), [Progress(step=s, flops=4.0 * s) for s in range(1, 15)]),
    (lambda: PlateauDetector(1, 0.5, "rel", 1, 1, 3), [Progress(step=s, loss=None if s % 2 else 3.0 - 0.01 * s)
                                                      for s in range(1, 30)]),
])
def test_every_trigger_resumes_exactly(make, points):
    """Cut anywhere, state through JSON (as a checkpoint keeps it): the same updates fire."""
    straight = fired(make(), points)
    assert straight  # the sequences do fire
    for cut in range(len(points) + 1):
        first = make()
        hits = fired(first, points[:cut])
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert hits + [cut + i for i in fired(resumed, points[cut:])] == straight


def test_make_trigger_from_the_plan_and_plateau_reads_progress():
    expand = [ExpandSpec(op="widen_ffn", size=4)]
    at = make_trigger(GrowSpec(trigger="at", at_tokens=[10, 20], expand=expand))
    assert (type(at), at.unit, at.points, at.max_growths) == (AtTrigger, "tokens", [10, 20], 2)
    budget = make_trigger(GrowSpec(trigger="budget", budget_flops=1e9, at_fractions=[0.5], expand=expand))
    assert type(budget) is BudgetTrigger and budget.points == [5e8]
    plateau = make_trigger(GrowSpec(patience=1, warmup_checks=0, cooldown=0, expand=expand), {"checks": 0,
                           "best": math.inf, "num_bad": 0, "cooldown_counter": 0, "growths": 0})
    assert isinstance(plateau, PlateauDetector)
    assert not plateau.update(Progress(step=1, loss=None)) and plateau.checks == 0  # between checks: nothing
    assert [plateau.update(Progress(step=s, loss=1.0)) for s in range(3)] == [False, False, True]


# ---------------------------------------------------------------------------------------------
# the plan


def plan_raw(grow: dict, steps: int = 20) -> dict:
    return {"name": "x", "tasks": {"t": {"source": "builtin:pydoc"}}, "stages": [{"task": "t", "steps": steps,
                                                                                "grow": grow}]}


NET2NET = [{"op": "widen_ffn", "size": 4, "init": "net2net"}]


@pytest.mark.parametrize("grow,path,words", [
    ({"trigger": "at", "expand": NET2NET}, "stages.0.grow.at_tokens", "needs at_steps"),
    ({"trigger": "at", "at_steps": [4], "at_tokens": [9], "expand": NET2NET}, "stages.0.grow.at_tokens", "not both"),
    ({"trigger": "at", "at_steps": [8, 4], "expand": NET2NET}, "stages.0.grow.at_steps", "increase strictly"),
    ({"trigger": "at", "at_steps": [4, 20], "expand": NET2NET}, "stages.0.grow.at_steps", "not inside the stage"),
    ({"trigger": "at", "at_steps": [4], "max_growths": 2, "expand": NET2NET}, "stages.0.grow.max_growths",
     "one growth per point"),
    ({"trigger": "budget", "at_fractions": [0.5], "expand": NET2NET}, "stages.0.grow.budget_flops", "required"),
    ({"trigger": "plateau", "at_steps": [4], "expand": NET2NET}, "stages.0.grow.at_steps", 'trigger = "at"'),
])
def test_plan_errors_name_the_field(grow, path, words):
    with pytest.raises(PlanError) as e:
        plan_from_dict(plan_raw(grow))
    assert any(p.path == path and words in p.message for p in e.value.problems), e.value.problems


def test_plan_growth_counts_and_symmetry_defaults():
    plan = plan_from_dict(plan_raw({"trigger": "budget", "budget_flops": 1e12, "at_fractions": [0.2, 0.6],
                                    "expand": NET2NET + [{"op": "widen_ffn", "size": 2, "init": "net2net",
                                                          "symmetry": "none"}]}))
    grow = plan.stages[0].grow
    assert grow.max_growths == 2 and grow.schedule_after == "continue"
    # inside a growth a copying init breaks its symmetry by default; an explicit choice stays
    assert [s.params().symmetry for s in grow.expand] == ["noise", "none"]
    assert ExpandSpec(op="widen_ffn", size=4, init="net2net").params().symmetry == "none"  # a stage's own ops
    assert plan_from_dict(plan.model_dump(mode="json")).stages[0].grow == grow  # the dump round-trips


# ---------------------------------------------------------------------------------------------
# symmetry of a growth's copies

VOCAB = 40


def grown_and_trained(spec: ExpandSpec, steps: int):
    """A tiny GPT-Neo widened by `spec` (measured), then `steps` AdamW steps (lr 1e-2) of
    everything: (the expansion's report, its units' figures after training)."""
    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                          attention_types=[[["global", "local"], 1]], intermediate_size=16,
                          max_position_embeddings=32, window_size=8)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    data = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(1))
    batch = (data[:, :-1], data[:, 1:])
    growth = apply_stage(model, ArchView(model.config, model), 0, [spec], batch, torch.Generator().manual_seed(2))
    Freezer().apply(model, "none", growth)
    train_steps(model, batch, steps=steps, lr=1e-2)
    report = growth.reports[0] | {"stage": 0, "growth": 0}
    return report, health.similarity_report(growth.results[0].units)


def test_a_growths_default_copies_diverge_and_twins_get_a_warning():
    """Net2WiderNet inside [stages.grow]: the default (symmetry = "noise", paired outgoing noise
    that cancels) is exact and its copies diverge; symmetry = "none" stays at twin cosine 1.000
    and gets the warning. Measured max twin cosine at expansion -> after 40 steps: 0.988 -> 0.946
    (noise, the default), 0.989 -> 0.993 (split, scale 0.5: under Adam the copies' incoming steps
    stay equal while their outgoing columns are proportional), 1.000 -> 1.000 (none)."""
    default = GrowSpec(trigger="at", at_steps=[1], expand=NET2NET).expand[0]
    twins = ExpandSpec(op="widen_ffn", size=6, init="net2net", symmetry="none")
    report, after = grown_and_trained(ExpandSpec(**(default.model_dump() | {"size": 6})), steps=40)
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4
    assert after["max_twin_cosine"] < 0.97, after
    assert health.twin_warning(report, after) is None
    report, after = grown_and_trained(twins, steps=40)
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4
    assert after["max_twin_cosine"] > 1 - 1e-5
    warning = health.twin_warning(report, after)
    assert warning and "growth 0 (widen_ffn)" in warning and "1.0000" in warning and 'symmetry = "noise"' in warning


@pytest.mark.parametrize("symmetry, fix", [("none", 'set symmetry = "noise"'), ("split", "use symmetry = \"noise\""),
                                          ("noise", "raise symmetry_scale")])
def test_the_twin_warning_asks_for_what_the_operator_does_not_have_yet(symmetry, fix):
    """Copies still twins after training: the fix named is the one the operator lacks (noise
    already set: only a larger symmetry_scale is left to ask for, never noise again)."""
    report = {"stage": 0, "growth": 0, "op": "widen_ffn", "settings": {"symmetry": symmetry}}
    warning = health.twin_warning(report, {"max_twin_cosine": 0.995})
    assert fix in warning
    if symmetry == "noise":
        assert 'symmetry = "noise"' not in warning


def test_tiny_neo_small_grows_to_tiny_neos_shape():
    """builtin:tiny-neo-small (2 x 64, 2 heads, FFN 256) grown as experiments/progressive_growth.toml
    grows it (widen_hidden duplicate, widen_ffn net2net, map_layers repeat = 2) has builtin:tiny-neo's
    config and parameter count, and the width steps keep the function."""
    from types import SimpleNamespace

    from engine.model.sources import load_model

    model, view = load_model(SimpleNamespace(source="builtin:tiny-neo-small", revision=None, family=None), seed=0)
    full, _ = load_model(SimpleNamespace(source="builtin:tiny-neo", revision=None, family=None), seed=0)
    specs = [ExpandSpec(op="widen_hidden", size=64, init="duplicate", symmetry="noise"),
             ExpandSpec(op="widen_ffn", size=256, init="net2net", mode="inplace", symmetry="noise"),
             ExpandSpec(op="map_layers", repeat=2, kinds="real")]
    x = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    probe = (x, torch.roll(x, -1, 1))
    growth = apply_stage(model, view, 0, specs, probe, torch.Generator().manual_seed(0), measure=True)
    assert [r["exact"] for r in growth.reports] == [True, True, False]
    for field in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "attention_layers"):
        assert getattr(model.config, field) == getattr(full.config, field), field
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("symmetry", ["split", "noise"])
def test_symmetry_routes_are_exact_and_the_split_shares_sum_to_one(symmetry):
    from engine.ops.width import outgoing_shares

    report, _ = grown_and_trained(ExpandSpec(op="widen_ffn", size=12, init="net2net", symmetry=symmetry), steps=0)
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4
    source = torch.tensor([0, 0, 2])
    shares = outgoing_shares(source, 3, "split", 0.5)  # unit 0: 3 slots, unit 2: 2 slots, unit 1: alone
    slots = torch.tensor([0, 1, 2, 0, 0, 2])
    assert torch.allclose(torch.zeros(3).index_add_(0, slots, shares), torch.ones(3))
    assert shares.tolist() == pytest.approx([0.5 / 3, 1.0, 0.25, 1 / 3, 1.5 / 3, 0.75])


def test_real_repeats_start_with_their_sources_state_and_virtual_ones_share_it():
    """map_layers repeat = 2 on a trained tiny model: each real copy's AdamW moments and step are
    its source's (copies, not the same tensors); a virtual repeat's Parameter is its source's, so
    its state is simply moved."""
    from engine.grow.growth import carry_optimizer_state
    from tests.engine.grow.test_growth import adamw_like, trained

    for kinds in ("real", "virtual"):
        model, view, optimizer, _ = trained("gpt_neo", steps=3)
        before = dict(model.named_parameters())
        growth = apply_stage(model, view, 0, [ExpandSpec(op="map_layers", repeat=2, kinds=kinds)], None,
                             torch.Generator().manual_seed(0), measure=False)
        assert view.num_layers == 4
        new_optimizer = adamw_like(optimizer, model.parameters())
        counts = carry_optimizer_state(optimizer, new_optimizer, before, model, growth)
        assert counts["fresh"] == 0 and not counts["unplaced"]
        pairs = growth.results[0].copies
        assert counts["copied"] == len(pairs) == (len(list(view.blocks()[0].parameters())) * 2 if kinds == "real" else 0)
        for copy, source in pairs:
            new, old = new_optimizer.state[copy], optimizer.state[source]
            assert new["exp_avg"] is not old["exp_avg"] and torch.equal(new["exp_avg"], old["exp_avg"])
            assert torch.equal(new["exp_avg_sq"], old["exp_avg_sq"]) and float(new["step"]) == 3
        assert counts["moved"] == len(before)


# ---------------------------------------------------------------------------------------------
# LEMON's rewarm schedule


def lr_factor(schedule: str, step: int, steps: int, warmup: int, restarts=()) -> float:
    return LrSchedule(schedule, steps, warmup, tuple(restarts)).factor(step)


def test_rewarm_goes_back_to_the_peak_and_decays_over_the_steps_left():
    steps, warmup = 20, 4
    plain = [lr_factor("linear", s, steps, warmup) for s in range(steps)]
    rewarmed = [lr_factor("linear", s, steps, warmup, restarts=[10]) for s in range(steps)]
    assert rewarmed[:10] == plain[:10]
    assert rewarmed[10:] == pytest.approx([1 - k / 10 for k in range(10)])  # peak, then 10 steps to zero
    assert plain[10:] == pytest.approx([1 - (s - warmup) / 16 for s in range(10, 20)])  # the slower decay
    cosine = [lr_factor("cosine", s, steps, 0, restarts=[5, 15]) for s in (5, 10, 15, 19)]
    assert cosine == pytest.approx([1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 3)), 1.0,
                                    0.1 + 0.45 * (1 + math.cos(math.pi * 0.8))])
    assert lr_factor("constant", 12, steps, warmup, restarts=[10]) == 1.0


# ---------------------------------------------------------------------------------------------
# real runs

RUN_PLAN = textwrap.dedent("""
    name = "tiny-schedule"
    seed = 7

    [model]
    source = "builtin:tiny-neo"

    [tasks.python]
    source = "builtin:stdlib-python"
    max_docs = 30

    [train]
    batch_size = 4
    seq_len = 32
    lr = 3e-3
    schedule = "linear"
    eval_interval = 0
    eval_batches = 1
    log_interval = 1
    device = "cpu"

    [[stages]]
    task = "python"
    steps = 14
""")

AT_GROW = textwrap.dedent("""
    [stages.grow]
    trigger = "at"
    at_steps = [4, 9]
    schedule_after = "rewarm"

    [[stages.grow.expand]]
    op = "widen_ffn"
    size = 16
    init = "net2net"
""")

STACK_GROW = textwrap.dedent("""
    [stages.grow]
    trigger = "budget"
    budget_flops = {budget}
    at_fractions = [0.3]

    [[stages.grow.expand]]
    op = "map_layers"
    repeat = 2
    kinds = "real"
""")


def events_of(run, kind: str) -> list:
    return [e for e in read_all(run.events) if e.type == kind]


@pytest.fixture(scope="module")
def at_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("at") / "at.toml"
    path.write_text(RUN_PLAN + AT_GROW)
    return path


@pytest.fixture(scope="module")
def straight_at(at_plan, tmp_path_factory):
    run = create_run(load_plan(at_plan), at_plan, tmp_path_factory.mktemp("runs"))
    Trainer(run.path).run_plan()
    return run


@pytest.mark.slow
def test_at_steps_grow_where_asked_with_the_rewarmed_lr(straight_at):
    grows = [e for e in events_of(straight_at, "expand") if e.trigger == "at"]
    assert [(g.growth, g.step) for g in grows] == [(0, 4), (1, 9)]
    assert all(g.exact and g.max_abs_logit_delta <= 1e-4 for g in grows)
    assert all(g.settings["symmetry"] == "noise" for g in grows)  # the growth default
    # the lr logged after step k is step k+1's, read before a growth at k restarts the schedule
    lrs = {e.step: e.lr for e in events_of(straight_at, "step")}
    expected = {k: 3e-3 * lr_factor("linear", k, 14, 0, restarts=[r for r in (4, 9) if r < k]) for k in range(1, 15)}
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[5] == pytest.approx(3e-3 * (1 - 1 / 10))  # peak at 4, 10 steps left (continue: 1 - 5/14)
    assert lrs[10] == pytest.approx(3e-3 * (1 - 1 / 5))  # peak again at 9, 5 steps left
    assert straight_at.results()["summary"]["growths"] == 2


@pytest.mark.slow
def test_resume_after_an_at_growth_continues_identically(at_plan, straight_at, tmp_path):
    interrupted = create_run(load_plan(at_plan), at_plan, tmp_path / "runs")
    # cancelled after step 6: past the first growth (at 4), before the second (at 9)
    run_until_cancelled(Trainer(interrupted.path), lambda kind, e: kind == "step" and e["step"] == 6)
    Trainer(interrupted.path, resume=True).run_plan()
    a, b = straight_at.results(), interrupted.results()
    assert b["state"] == "done" and a["matrix"] == b["matrix"]
    timeless = lambda growths: [{k: v for k, v in g.items() if k != "seconds"} for g in growths]  # noqa: E731
    assert timeless(a["growths"]) == timeless(b["growths"])
    losses = [[(e.step, e.loss, e.lr) for e in events_of(r, "step")] for r in (straight_at, interrupted)]
    assert losses[0][-1] == pytest.approx(losses[1][-1], abs=1e-6)  # the final step: the same loss and lr


@pytest.mark.slow
def test_budget_triggered_depth_stacking_mid_run(tmp_path):
    """G_stack as one growth: at 30% of the compute budget the 4-block stack is repeated (8
    blocks, real copies carrying their sources' AdamW state). Not function-preserving: the
    change of the logits is measured and logged (measured: max |Δlogits| 0.085 at step 5, probe
    loss 3.725 -> 3.732), and training goes on — the loss finite and falling."""
    probe_plan = tmp_path / "probe.toml"
    probe_plan.write_text(RUN_PLAN.replace("steps = 14", "steps = 1"))
    probe = create_run(load_plan(probe_plan), probe_plan, tmp_path / "probe")
    Trainer(probe.path).run_plan()
    budget = 14 * events_of(probe, "step")[0].flops  # the stage's FLOPs without growth: 30% at step 5
    path = tmp_path / "stack.toml"
    path.write_text(RUN_PLAN + STACK_GROW.format(budget=budget))
    run = create_run(load_plan(path), path, tmp_path / "runs")
    Trainer(run.path).run_plan()
    (grow,) = [e for e in events_of(run, "expand") if e.trigger == "budget"]
    steps = events_of(run, "step")
    first_over = next(e.step for e in steps if e.flops >= 0.3 * budget)
    assert grow.step == first_over and grow.op == "map_layers"
    assert grow.params_added == 4 * sum(p.numel() for p in _block_params())
    assert not grow.exact and math.isfinite(grow.max_abs_logit_delta) and grow.max_abs_logit_delta > 0
    assert run.results()["summary"]["params"] == steps[0].params + grow.params_added
    after = [e.loss for e in steps if e.step > grow.step]
    assert all(math.isfinite(x) for x in after) and sum(after[-3:]) / 3 < after[0]


def _block_params():
    from engine.model.sources import load_model
    from engine.plan import ModelSpec

    model, view = load_model(ModelSpec(), 0)
    return list(view.blocks()[0].parameters())
