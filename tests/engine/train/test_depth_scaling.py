"""Depth-µP residual scaling (engine.train.depth_scaling, ``[train] residual_scaling = "depth_mup"``):
the folded form trains exactly as the explicit multiplier does, a growth under it stays exact, the
initial fold, the refusals (at run start and in `plan check`), the optimizer's groups through
set_learning_rate, FSDP's shards and a real run with a resume."""

from __future__ import annotations

import copy
import functools
import math
import textwrap

import pytest
import torch
from torch import nn

from engine.grow.apply import apply_stage
from engine.grow.growth import carry_optimizer_state
from engine.model.families import family_named, residual_scaling_refusal
from engine.model.view import ArchView, get_submodule
from engine.plan import ExpandSpec, StageSpec, TrainSpec, check_model_fields, load_plan
from engine.runs.events import read_all
from engine.train import depth_scaling
from engine.train.depth_scaling import DepthScalingError, branch_ends, fold_initial_scale, multiplier, param_groups
from engine.train.loop import Trainer
from engine.train.optim import make_optimizer, set_learning_rate
from tests.conftest import run_until_cancelled
from tests.tiny_models import ALL_DECODER_FAMILIES, build, build_t5, token_batch
from widen_tui.launcher import create_run

SCALED_FAMILIES = [name for name in ALL_DECODER_FAMILIES if residual_scaling_refusal(family_named(name)) is None]
REFUSED_FAMILIES = [name for name in ALL_DECODER_FAMILIES if name not in SCALED_FAMILIES]
LR, WD = 1e-2, 0.1
STAGE = StageSpec(task="t", steps=10)


def depth_mup(**fields) -> TrainSpec:
    return TrainSpec(residual_scaling="depth_mup", weight_decay=WD, lr=LR, **fields)


def end_modules(view, block) -> list[nn.Module]:
    """The modules each residual branch of `block` ends with, from the family's data: the
    post-norms where the family has them, else the attention output and FFN down projections."""
    family = view.family
    if family.post_norms:
        return [get_submodule(block, path) for path in family.post_norms]
    return [get_submodule(block, f"{family.attention.module}.{family.attention.out}"),
            get_submodule(block, f"{family.ffn.module}.{family.ffn.down}")]


def explicit_multiplier(model, view, alpha: float, eps: float):
    """The unfolded reference: each branch-end module's output times alpha (forward hooks), the
    weights as they are, the block tensors at lr alpha·LR, everything at eps and WD."""
    for block in view.blocks():
        for module in end_modules(view, block):
            module.register_forward_hook(lambda module, args, out: out * alpha)
    inside = {id(p) for block in view.blocks() for p in block.parameters()}
    groups = [{"params": [p], "lr": LR * (alpha if id(p) in inside else 1.0), "eps": eps,
               "weight_decay": WD if p.ndim >= 2 else 0.0} for p in model.parameters()]
    return torch.optim.AdamW(groups)


def train(model, optimizer, steps: int = 5):
    inputs, targets = token_batch(1)
    for _ in range(steps):
        logits = model(input_ids=inputs).logits
        nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return model(input_ids=token_batch(2)[0]).logits


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def double(family: str, layers: int = 3):
    """A tiny model of `family` in float64, so the two forms agree to rounding (~1e-14; in float32
    its rounding, amplified by Adam's normalised steps, reaches 1e-5). Gemma's norms compute in
    float32 whatever the model's dtype (~1e-6 apart, up to 1e-3 with a large eps): here they
    compute in float64 (the same formula, x / rms(x) · (1 + w))."""
    model, _ = build(family, layers, 2, 4, 12, seed=0)
    model = model.double()
    view = ArchView(model.config, model)
    if view.family.norm_offset:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = functools.partial(offset_norm, module)
    return model, view


def offset_norm(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (norm.weight + 1.0)


# ---------------------------------------------------------------------------------------------
# the rule


def test_multiplier_is_one_at_the_base_depth():
    assert multiplier(8, 8) == 1.0 and multiplier(4, 16) == 0.5 and multiplier(2, 1) == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError):
        multiplier(0, 4)


@pytest.mark.parametrize("family", SCALED_FAMILIES)
def test_folded_training_equals_the_explicit_multiplier(family):
    """5 AdamW steps (weight decay 0.1, eps 1e-8) of the folded model with param_groups against the
    same model read through hooks multiplying each branch end by alpha = (1/3)^½: the same logits."""
    model, view = double(family)
    reference = copy.deepcopy(model)
    alpha = fold_initial_scale(model, view, base_depth=1)
    assert alpha == pytest.approx(3 ** -0.5)
    folded = train(model, torch.optim.AdamW(param_groups(model, view, depth_mup(), set(), 1, LR)))
    unfolded = train(reference, explicit_multiplier(reference, ArchView(reference.config, reference), alpha, 1e-8))
    assert relative(folded, unfolded) <= 1e-10


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_the_eps_rule_holds_where_eps_matters(family):
    """With eps 1e-3 (as large as Adam's normalised gradients) the eps of each group shows: the
    branch ends need eps/alpha, the blocks' other tensors the plain eps — they get the very same
    gradient in both forms (the function is the same), so eps/alpha there would not be exact."""
    eps = 1e-3
    model, view = double(family)
    reference = copy.deepcopy(model)
    alpha = fold_initial_scale(model, view, base_depth=1)
    unfolded = train(reference, explicit_multiplier(reference, ArchView(reference.config, reference), alpha, eps))
    groups = param_groups(model, view, depth_mup(), set(), 1, LR, eps=eps)
    wrong = copy.deepcopy(model)
    folded = train(model, torch.optim.AdamW(groups))
    assert relative(folded, unfolded) <= 1e-10
    by_name = {id(p): name for name, p in model.named_parameters()}
    names = [[by_name[id(p)] for p in g["params"]] for g in groups]
    wrong_params = dict(wrong.named_parameters())
    wrong_groups = [{**g, "params": [wrong_params[n] for n in group_names],
                     "eps": eps / alpha if g["lr_scale"] == alpha else g["eps"]} for g, group_names in zip(groups, names)]
    assert relative(train(wrong, torch.optim.AdamW(wrong_groups)), unfolded) > 1e-3


def test_the_groups_split_by_role_and_decay():
    model, view = build("gpt2", 4, 2, 4, 12, seed=0)
    groups = param_groups(model, view, depth_mup(), set(), 1, LR)
    alpha = 0.5
    settings = [(g["lr"], g["lr_scale"], g["eps"], g["weight_decay"]) for g in groups]
    assert settings == [(LR, 1.0, 1e-8, WD), (LR, 1.0, 1e-8, 0.0),                             # embeddings; ln_f
                        (LR * alpha ** 2, alpha ** 2, 1e-8 / alpha, WD / alpha),                 # c_proj weights
                        (LR * alpha ** 2, alpha ** 2, 1e-8 / alpha, 0.0),                        # c_proj biases
                        (LR * alpha, alpha, 1e-8, WD), (LR * alpha, alpha, 1e-8, 0.0)]           # the rest of the blocks
    ends = branch_ends(view)
    assert [len(e) for e in ends] == [4] * 4  # attn.c_proj and mlp.c_proj, weight and bias
    assert {id(p) for e in ends for p in e} == {id(p) for g in groups[2:4] for p in g["params"]}
    counted = [p for g in groups for p in g["params"]]
    assert len(counted) == len({id(p) for p in counted}) == len(list(model.parameters()))
    # frozen tensors are left out, masked ones lose their decay
    model.transformer.wte.weight.requires_grad_(False)
    masked = {id(model.transformer.h[0].mlp.c_fc.weight)}
    groups = param_groups(model, view, depth_mup(), masked, 1, LR)
    assert all(model.transformer.wte.weight is not p for g in groups for p in g["params"])
    assert any(p is model.transformer.h[0].mlp.c_fc.weight for g in groups if g["weight_decay"] == 0 for p in g["params"])


def test_make_optimizer_without_scaling_is_unchanged_and_set_learning_rate_keeps_the_scales():
    model, view = build("llama", 2, 2, 4, 12, seed=0)
    plain, _ = make_optimizer(model, set(), TrainSpec(lr=LR, weight_decay=WD), STAGE)
    assert [g["weight_decay"] for g in plain.param_groups] == [WD, 0.0] and "lr_scale" not in plain.param_groups[0]
    optimizer, scheduler = make_optimizer(model, set(), depth_mup(residual_base_depth=8), STAGE, view=view)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    assert sorted(set(scales)) == [1.0, 2.0, 4.0]  # alpha = (8/2)^½ = 2
    assert scheduler.base_lrs == [LR * s for s in scales]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    before = [g["lr"] for g in optimizer.param_groups]
    set_learning_rate(optimizer, scheduler, LR)  # the same lr: nothing moves
    assert [g["lr"] for g in optimizer.param_groups] == before
    set_learning_rate(optimizer, scheduler, LR / 2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([b / 2 for b in before])
    assert scheduler.base_lrs == [LR / 2 * s for s in scales]


# ---------------------------------------------------------------------------------------------
# growth and the initial fold


def test_a_growth_under_depth_scaling_stays_exact_and_the_groups_follow_the_new_depth():
    """2 layers (base 1: alpha 1/√2) trained 2 steps, insert_identity to 4: the logits stay, the
    new optimizer's groups are at alpha' = (1/4)^½ = 1/2 and carry the old state."""
    model, view = build("llama", 2, 2, 4, 12, seed=0)
    assert fold_initial_scale(model, view, 1) == pytest.approx(2 ** -0.5)
    optimizer, _ = make_optimizer(model, set(), depth_mup(), STAGE, view=view, base_depth=1)
    train(model, optimizer, steps=2)
    inputs = token_batch(3)[0]
    with torch.no_grad():
        before_logits = model(input_ids=inputs).logits
    before = dict(model.named_parameters())
    growth = apply_stage(model, view, 0, [ExpandSpec(op="insert_identity", layers="all")], None, torch.Generator(),
                         measure=False)
    with torch.no_grad():
        assert (model(input_ids=inputs).logits - before_logits).abs().max() <= 1e-5
    grown, _ = make_optimizer(model, set(), depth_mup(), STAGE, view=view, base_depth=1)
    counts = carry_optimizer_state(optimizer, grown, before, model, growth)
    assert counts["moved"] == len(before) and counts["fresh"] == len(list(model.parameters())) - len(before)
    alpha = 0.5
    assert [(g["lr_scale"], g["eps"]) for g in grown.param_groups] == [
        (1.0, 1e-8), (1.0, 1e-8), (alpha ** 2, 1e-8 / alpha), (alpha, 1e-8), (alpha, 1e-8)]
    assert [g["lr"] for g in grown.param_groups] == pytest.approx([LR, LR, LR / 4, LR / 2, LR / 2])
    assert all(g["weight_decay"] == pytest.approx(WD / alpha) for g in grown.param_groups[2:3])


@pytest.mark.parametrize("family", ["gpt_neo", "gemma2"])
def test_fold_initial_scale_changes_the_branch_ends_only_when_the_depth_is_not_the_base(family):
    model, view = build(family, 2, 2, 4, 12, seed=0)
    original = copy.deepcopy(model.state_dict())
    assert fold_initial_scale(model, view, base_depth=2) == 1.0
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert fold_initial_scale(model, view, base_depth=8) == 2.0
    offset = view.family.norm_offset
    ends = {id(p) for e in branch_ends(view) for p in e}
    names = {name for name, p in model.named_parameters() if id(p) in ends}
    assert names and all(".h." in n or ".layers." in n for n in names)
    for name, p in model.named_parameters():
        expected = (original[name] + offset) * 2 - offset if name in names else original[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    if offset:  # Gemma: the post-norms' gains, stored as 1 + w
        assert all("post_" in n for n in names)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("family", REFUSED_FAMILIES)
def test_mixtures_of_experts_are_refused_in_one_line(family):
    model, view = build(family, 2, 2, 4, 8, seed=0)
    with pytest.raises(DepthScalingError) as e:
        make_optimizer(model, set(), depth_mup(), STAGE, view=view)
    assert str(e.value).startswith("train.residual_scaling:") and "mixture of experts" in str(e.value)
    assert "\n" not in str(e.value) and 'residual_scaling = "none"' in str(e.value)


def test_encoder_decoders_and_mlps_are_refused_in_one_line():
    _, t5 = build_t5()
    mlp = ArchView.of(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 8)))
    for view, words in ((t5, "encoder-decoder"), (mlp, "nn.Sequential")):
        with pytest.raises(DepthScalingError, match=rf"^train\.residual_scaling: .*{words}"):
            depth_scaling.check_supported(view)
    with pytest.raises(DepthScalingError):
        fold_initial_scale(t5.model, t5, 1)


def plan_raw(source: str, stages: list | None = None) -> dict:
    return {"name": "x", "model": {"source": source}, "tasks": {"t": {"source": "builtin:pydoc"}},
            "train": {"residual_scaling": "depth_mup"}, "stages": stages or [{"task": "t", "steps": 2}]}


def test_plan_check_refuses_what_depth_scaling_cannot_scale():
    [problem] = [p for p in check_model_fields(plan_raw("builtin:mlp")) if p.path == "train.residual_scaling"]
    assert "nn.Sequential MLP" in problem.message and "\n" not in str(problem)
    upcycle = [{"task": "t", "steps": 2, "expand": [{"op": "upcycle", "experts": 4}]}]
    [problem] = [p for p in check_model_fields(plan_raw("builtin:tiny-llama", upcycle))
                 if p.path == "train.residual_scaling"]
    assert "upcycle makes the blocks a mixture of experts" in problem.message
    assert not [p for p in check_model_fields(plan_raw("builtin:tiny-llama")) if p.path == "train.residual_scaling"]
    # a variant's own [train] turning it on is checked on that variant's model and stages
    raw = plan_raw("builtin:tiny-llama")
    raw["train"] = {}
    raw["variants"] = [{"name": "plain", "stages": [{"task": "t", "steps": 2}]},
                       {"name": "mlp", "model": {"source": "builtin:mlp"}, "train": {"residual_scaling": "depth_mup"},
                        "stages": [{"task": "t", "steps": 2}]}]
    [problem] = [p for p in check_model_fields(raw) if "residual_scaling" in p.path]
    assert problem.path == "variants.1.train.residual_scaling" and "nn.Sequential MLP" in problem.message
    raw["variants"][1] = {"name": "moe", "train": {"residual_scaling": "depth_mup"}, "stages": upcycle}
    [problem] = [p for p in check_model_fields(raw) if "residual_scaling" in p.path]
    assert problem.path == "variants.1.train.residual_scaling" and "upcycle" in problem.message
    raw["variants"][1]["train"] = {}
    assert not [p for p in check_model_fields(raw) if "residual_scaling" in p.path]


# ---------------------------------------------------------------------------------------------
# FSDP: the same groups over the shards


def test_the_groups_of_a_sharded_model_match_the_whole_models(tmp_path):
    """One process (gloo, world size 1): the sharded model's groups (DTensors) hold the same
    tensors in the same order with the same settings, and the whole model's optimizer state loads
    into them and comes back unchanged (shard and gather build their optimizers so)."""
    import torch.distributed as dist

    from engine.train import fsdp

    model, view = build("llama", 2, 2, 4, 12, seed=0)
    fold_initial_scale(model, view, 1)
    plain = copy.deepcopy(model)
    plain_view = ArchView(plain.config, plain)
    optimizer, _ = make_optimizer(plain, set(), depth_mup(), STAGE, view=plain_view, base_depth=1)
    train(plain, optimizer, steps=1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fsdp.shard(model, view)
        sharded, _ = make_optimizer(model, set(), depth_mup(), STAGE, view=view, base_depth=1)
        names = [{id(p): n for n, p in m.named_parameters()} for m in (plain, model)]
        layout = [[([names[i][id(p)] for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
                   for g in opt.param_groups] for i, opt in enumerate((optimizer, sharded))]
        assert layout[0] == layout[1]
        fsdp.load_optimizer_state(sharded, optimizer.state_dict())
        again = fsdp.full_optimizer_state(sharded)
        for key, entry in optimizer.state_dict()["state"].items():
            assert all(torch.equal(again["state"][key][k], v) for k, v in entry.items())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# a real run

RUN_PLAN = textwrap.dedent("""
    name = "depth-mup"
    seed = 7

    [model]
    source = "builtin:tiny-neo-small"

    [tasks.python]
    source = "builtin:stdlib-python"
    max_docs = 20

    [train]
    batch_size = 2
    seq_len = 32
    lr = 3e-3
    weight_decay = 0.1
    schedule = "linear"
    eval_interval = 0
    eval_batches = 1
    log_interval = 1
    device = "cpu"
    residual_scaling = "depth_mup"
    residual_base_depth = 1

    [[stages]]
    task = "python"
    steps = 6

    [stages.grow]
    trigger = "at"
    at_steps = [2]

    [[stages.grow.expand]]
    op = "insert_identity"
    layers = "all"
""")


def steps_of(run) -> dict[int, tuple]:
    """step -> (loss, lr), the last logged (a resumed run logs its steps after the cut again)."""
    return {e.step: (e.loss, e.lr) for e in read_all(run.events) if e.type == "step"}


@pytest.fixture(scope="module")
def run_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("depth") / "depth.toml"
    path.write_text(RUN_PLAN)
    return path


def test_a_run_folds_the_loaded_model_once_at_its_start(run_plan, tmp_path):
    from engine.model.sources import load_model

    trainer = Trainer(create_run(load_plan(run_plan), run_plan, tmp_path).path)
    trainer.setup()
    loaded, view = load_model(trainer.plan.model, trainer.plan.seed)
    alpha = 2 ** -0.5  # base 1, 2 layers as loaded
    assert trainer.m.base_depth == 1
    ends = {name for name, p in loaded.named_parameters() if id(p) in {id(q) for e in branch_ends(view) for q in e}}
    assert ends == {f"transformer.h.{i}.{m}.{t}" for i in (0, 1) for m in ("attn.attention.out_proj", "mlp.c_proj")
                    for t in ("weight", "bias")}
    for name, p in trainer.model.named_parameters():
        assert torch.allclose(p, dict(loaded.named_parameters())[name] * (alpha if name in ends else 1.0)), name


@pytest.mark.slow
def test_a_depth_scaled_run_grows_exactly_and_resumes_identically(run_plan, tmp_path):
    straight = create_run(load_plan(run_plan), run_plan, tmp_path / "a")
    trainer = Trainer(straight.path)
    trainer.run_plan()
    assert straight.results()["state"] == "done"
    [grow] = [e for e in read_all(straight.events) if e.type == "expand"]
    assert grow.step == 2 and grow.exact and grow.max_abs_logit_delta <= 1e-5
    assert len(trainer.m.view.blocks()) == 4 and trainer.m.base_depth == 1  # 2 layers as loaded, base 1
    scales = {g["lr_scale"] for g in trainer.m.make_optimizer(trainer.plan.stages[0])[0].param_groups}
    assert scales == {1.0, 0.5, 0.25}  # alpha' = (1/4)^½
    interrupted = create_run(load_plan(run_plan), run_plan, tmp_path / "b")
    # cancelled (a mid-stage checkpoint, its groups' lr_scale saved with it) after step 4: past the growth at 2
    run_until_cancelled(Trainer(interrupted.path), lambda kind, e: kind == "step" and e["step"] == 4)
    resumed = Trainer(interrupted.path, resume=True)
    resumed.run_plan()
    assert resumed.m.base_depth == 1
    a, b = straight.results(), interrupted.results()
    assert b["state"] == "done" and a["matrix"] == b["matrix"]
    for step, logged in steps_of(straight).items():
        assert steps_of(interrupted)[step] == pytest.approx(logged, abs=1e-6), step
