"""upcycle and add_experts (engine/ops/experts.py, docs/moe.md) on tiny random models of every
family the registry lets them apply to: the exact routes are exact (≤ 1e-5), the others are
measured and reported inexact, an upcycled model exports as its MoE class and reloads in plain
transformers, misfits are one line at plan check, and a mid-run upcycle carries AdamW's state."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.exports.hf_directory import export_model, load_run_model
from engine.grow.apply import Freezer, StageGrowth, apply_stage
from engine.grow.growth import carry_optimizer_state, combine_growth, grow_model, growth_generator
from engine.grow.operator_fit import validate_plan_file
from engine.model.families import FAMILIES, FAMILY_OVERRIDE_ATTR, family_named, upcycle_targets
from engine.model.forward import forward_logits
from engine.model.view import ArchView
from engine.ops.experts import spherical_kmeans
from engine.plan import ExpandSpec, GrowSpec, load_plan
from engine.runs.events import read_all
from engine.train.data import ByteTokenizer
from engine.train.loop import Trainer
from tests.engine.grow.test_growth import adamw_like, lm_loss, one_step
from tests.tiny_models import VOCAB, build, randomize, tiny_config, token_batch
from widen_tui.launcher import create_run

EXACT = 1e-5
# (dense family, model type, MoE family) for every model type the registry upcycles
UPCYCLES = [(f.name, model_type, target) for f in FAMILIES if f.kind == "causal_lm" and f.refusal("upcycle") is None
            for model_type, target in upcycle_targets(f).items()]
MOE_FAMILIES = [f.name for f in FAMILIES if f.moe is not None]
REFUSED = [f.name for f in FAMILIES if f.kind == "causal_lm" and f.moe is None and f.refusal("upcycle")]


def dense_model(family: str, model_type: str, layers: int = 3, seed: int = 0, vocab: int = VOCAB):
    """A tiny random model of `model_type` with the sizes `family`'s entry gives its tiny models."""
    fields = {k: v for k, v in tiny_config(family, layers, 2, 4, 12).to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "_name_or_path")}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**fields, "vocab_size": vocab})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(model)
    return model, ArchView(model.config, model)


def grow(model, view, *specs: dict, batch=None, seed: int = 0) -> list[dict]:
    growth = apply_stage(model, view, 0, [ExpandSpec(**s) for s in specs], batch or token_batch(),
                         torch.Generator().manual_seed(seed))
    return growth.reports


def reloaded_delta(model, tmp_path, inputs) -> tuple[object, float]:
    with torch.no_grad():
        expected = forward_logits(model, inputs)
    export_model(model, ByteTokenizer(), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # plain transformers, no widen
    with torch.no_grad():
        return reloaded, float((forward_logits(reloaded, inputs) - expected).abs().max())


def test_the_cases_come_from_the_registry():
    """Every model type with an MoE class upcycles; olmo2 (post-norms, OLMoE pre-norms) refuses."""
    assert {(t, m) for _, t, m in UPCYCLES} == {("llama", "mixtral"), ("mistral", "mixtral"), ("qwen2", "qwen2_moe"),
                                               ("qwen3", "qwen3_moe")}
    assert "olmo2" in REFUSED and "post_feedforward_layernorm" in family_named("olmo2").refusal("upcycle")
    assert "gpt_oss" in MOE_FAMILIES and "olmoe" in MOE_FAMILIES


# ---------------------------------------------------------------------------------------------
# upcycle


@pytest.mark.parametrize("family,model_type,target", UPCYCLES)
def test_upcycle_copy_is_exact_and_exports_as_the_moe_class(family, model_type, target, tmp_path):
    model, view = dense_model(family, model_type, vocab=260)
    batch = token_batch()
    report, = grow(model, view, {"op": "upcycle", "experts": 4, "top_k": 2}, batch=batch)
    assert report["exact"] and report["max_abs_logit_delta"] <= EXACT, report
    assert view.family.name == target and getattr(model.config, FAMILY_OVERRIDE_ATTR) == target
    assert view.sparse_layers() == [0, 1, 2] and view.num_experts == 4 and view.top_k == 2
    # every expert is the dense FFN's parameters once more, plus a router row per expert
    hidden, units = view.hidden_size, 12
    shared = 3 * hidden * units + hidden if view.moe.shared_expert else 0
    assert report["params_added"] == 3 * ((4 - 1) * 3 * hidden * units + 4 * hidden + shared)
    reloaded, delta = reloaded_delta(model, tmp_path, batch[0])
    assert reloaded.config.model_type == (family_named(target).hf_model_type or target)
    assert type(reloaded).__name__.lower().startswith(target.replace("_", ""))
    assert not hasattr(reloaded.config, FAMILY_OVERRIDE_ATTR) and delta <= 1e-4


@pytest.mark.parametrize("family,model_type,target",
                         [c for c in UPCYCLES if family_named(c[2]).moe.dense_layers_field])
def test_upcycle_some_layers_where_the_moe_class_has_dense_blocks(family, model_type, target, tmp_path):
    model, view = dense_model(family, model_type, vocab=260)
    report, = grow(model, view, {"op": "upcycle", "experts": 3, "top_k": 2, "layers": [0, 2]})
    assert report["exact"] and report["max_abs_logit_delta"] <= EXACT
    assert view.sparse_layers() == [0, 2]
    assert getattr(model.config, view.moe.dense_layers_field) == [1]
    report, = grow(model, view, {"op": "add_experts", "experts": 6})  # the upcycled blocks only
    assert report["exact"] and report["max_abs_logit_delta"] <= EXACT and view.top_k == 4
    _, delta = reloaded_delta(model, tmp_path, token_batch(1)[0])
    assert delta <= 1e-4


@pytest.mark.parametrize("mode,init", [("half", "copy"), ("whole", "copy"), ("whole", "drop"), ("half", "drop")])
def test_qwen2_moe_shared_expert_constructions(mode, init):
    """"half": shared = FFN behind σ(0) = 1/2, routed downs halved (exact for copies); "whole":
    shared down doubled, routed downs zero (exact for every init)."""
    model, view = dense_model("llama", "qwen2")
    spec = {"op": "upcycle", "experts": 4, "top_k": 1, "init": init, "shared_expert": mode}
    report, = grow(model, view, spec)
    block = view.moe_block(0)
    assert float(block.shared_expert_gate.weight.detach().abs().max()) == 0
    routed = block.experts.down_proj.detach()
    assert (float(routed.abs().max()) == 0) == (mode == "whole")
    exact = init == "copy" or mode == "whole"
    assert report["exact"] == exact
    assert (report["max_abs_logit_delta"] <= EXACT) == exact, report


@pytest.mark.parametrize("family,model_type,target", UPCYCLES[:1] + UPCYCLES[-1:])
@pytest.mark.parametrize("init", ["drop", "noise"])
def test_drop_and_noise_are_measured_and_reported_inexact(family, model_type, target, init):
    model, view = dense_model(family, model_type)
    dense = [p.detach().clone() for p in (model.model.layers[0].mlp.gate_proj.weight,
                                          model.model.layers[0].mlp.up_proj.weight)]
    report, = grow(model, view, {"op": "upcycle", "experts": 4, "top_k": 2, "init": init})
    assert not report["exact"] and 0 < report["max_abs_logit_delta"] < math.inf, report
    if init == "drop":  # round(0.5 · 12) = 6 units re-drawn per expert, a different subset each
        gate = view.experts(0).gate_up_proj[:, :12].detach()
        kept = [(gate[e] == dense[0]).all(dim=1) for e in range(4)]
        assert all(int(k.sum()) == 6 for k in kept)
        assert len({tuple(k.tolist()) for k in kept}) > 1


def test_routers_random_zero_and_kmeans():
    x = torch.cat([torch.randn(40, 8) * 0.05 + torch.eye(8)[i] * 3 for i in range(3)])
    centres = spherical_kmeans(x, 3, torch.Generator().manual_seed(0))
    assert sorted(centres.argmax(dim=1).tolist()) == [0, 1, 2]  # one per cluster direction
    assert float((centres.norm(dim=1) - 1).abs().max()) < 1e-5 and float(centres.max(dim=1).values.min()) > 0.99
    assert spherical_kmeans(x[:2], 4, torch.Generator()).shape == (4, 8)  # fewer tokens than experts
    model, view = dense_model("llama", "llama")
    grow(model, view, {"op": "upcycle", "experts": 4, "router": "kmeans", "router_std": 0.1})
    rows = view.moe_block(0).gate.weight.detach()
    assert torch.allclose(rows.norm(dim=1), torch.full((4,), 0.1 * math.sqrt(view.hidden_size)))
    model, view = dense_model("llama", "llama")
    report, = grow(model, view, {"op": "upcycle", "experts": 4, "router": "zero"})
    assert float(view.moe_block(0).gate.weight.detach().abs().max()) == 0 and "twins" in report["note"]


# ---------------------------------------------------------------------------------------------
# add_experts


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("symmetry", ["none", "noise"])
def test_add_experts_copies_are_exact_on_every_moe_family(family, symmetry):
    model, view = build(family, 2, 2, 4, 12, 0)
    old, k = view.num_experts, view.top_k
    down = view.experts(view.sparse_layers()[0]).down_proj.detach().clone()
    report, = grow(model, view, {"op": "add_experts", "experts": 2 * old, "symmetry": symmetry})
    assert report["exact"] and report["max_abs_logit_delta"] <= EXACT, report
    assert (view.num_experts, view.top_k) == (2 * old, 2 * k)
    grown = view.experts(view.sparse_layers()[0]).down_proj.detach()
    summed = grown[:old] + grown[old:]  # the copies of expert e: slots e and e + E
    assert torch.allclose(summed, 2 * down, atol=1e-6)
    assert torch.equal(grown[:old], grown[old:]) == (symmetry == "none")  # noise: no longer twins


@pytest.mark.parametrize("family", MOE_FAMILIES[:1] + ["gpt_oss"])
def test_add_experts_off_the_exact_route_is_measured(family):
    model, view = build(family, 2, 2, 4, 12, 0)
    old = view.num_experts
    report, = grow(model, view, {"op": "add_experts", "experts": old + 1})
    assert not report["exact"] and report["max_abs_logit_delta"] > EXACT and "not a multiple" in report["note"]
    model, view = build(family, 2, 2, 4, 12, 0)
    report, = grow(model, view, {"op": "add_experts", "experts": 2 * old, "top_k": view.top_k})
    assert not report["exact"] and report["max_abs_logit_delta"] > EXACT and "not all picked" in report["note"]


def test_upcycled_then_add_experts_exports(tmp_path):
    model, view = dense_model("llama", "mistral", vocab=260)
    grow(model, view, {"op": "upcycle", "experts": 2, "top_k": 1, "init": "noise"})
    report, = grow(model, view, {"op": "add_experts", "experts": 4, "symmetry": "noise"})
    assert report["exact"] and report["max_abs_logit_delta"] <= EXACT
    reloaded, delta = reloaded_delta(model, tmp_path, token_batch(2)[0])
    assert (reloaded.config.num_local_experts, reloaded.config.num_experts_per_tok) == (4, 2) and delta <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_meta_preview_equals_the_build(family, tmp_path, widen_home):
    """The parameter preview runs upcycle and add_experts on the meta device: per operator, per
    stage (freeze = "base") and per growth, its figures are what build_from_plan measures."""
    from tests.engine.grow.test_preview_meta import _model_dir, _plan, assert_preview_matches_the_run

    raw = _plan(str(_model_dir(family, tmp_path)), [("base", [
        {"op": "upcycle", "experts": 4, "top_k": 1, "router": "kmeans", "layers": [0, 2] if family == "qwen3" else "all"},
        {"op": "add_experts", "experts": 8}])])
    raw["stages"][-1]["grow"]["expand"] = [{"op": "add_experts", "experts": 16}]
    assert_preview_matches_the_run(raw, tmp_path)


# ---------------------------------------------------------------------------------------------
# plan check: one line on the field


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259,
         "max_position_embeddings": 64, "tie_word_embeddings": False}


def problems(tmp_path, source, *stages) -> list[str]:
    import tomli_w

    plan = {"name": "moe", "model": {"source": source, "tokenizer": "bytes"},
            "tasks": {"t": {"source": "builtin:pydoc"}}, "train": {"device": "cpu", "seq_len": 16},
            "stages": [{"task": "t", "steps": 4, "expand": list(ops)} for ops in stages]}
    path = tmp_path / "plan.toml"
    path.write_text(tomli_w.dumps(plan))
    _, found = validate_plan_file(path)
    return [str(p) for p in found]


def config_dir(tmp_path, name: str, **fields) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, **fields}))
    return str(folder)


@pytest.mark.parametrize("stages,field,fragment", [
    ([[{"op": "upcycle", "experts": 2, "top_k": 3}]], "stages.0.expand.0", "top_k = 3 > experts = 2"),
    ([[{"op": "upcycle", "experts": 4, "layers": [0]}]], "stages.0.expand.0.layers", "every layer"),
    ([[{"op": "upcycle", "experts": 4}], [{"op": "upcycle", "experts": 4}]], "stages.1.expand.0.op",
     "mixture of experts already"),
    ([[{"op": "add_experts", "experts": 4}]], "stages.0.expand.0.op", "upcycle"),
    ([[{"op": "upcycle", "experts": 4, "shared_expert": "half"}]], "stages.0.expand.0.shared_expert",
     "no shared expert"),
    ([[{"op": "upcycle", "experts": 4, "drop": 0.2}]], "stages.0.expand.0", 'init = "drop"'),
    ([[{"op": "upcycle", "experts": 4}, {"op": "add_experts", "experts": 4}]], "stages.0.expand.1.experts",
     "experts > 4"),
    # adapters on the upcycled experts: only LoRA (PEFT's ParamWrapper), without dropout
    ([[{"op": "upcycle", "experts": 4}, {"op": "ia3", "modules": ["down"]}]], "stages.0.expand.1.modules",
     "PEFT's IA3 adapts modules only"),
    ([[{"op": "upcycle", "experts": 4}, {"op": "lora", "modules": ["up"], "dropout": 0.1}]],
     "stages.0.expand.1.dropout", "adapts without dropout"),
    ([[{"op": "upcycle", "experts": 4}, {"op": "lora", "modules": ["down"]}, {"op": "add_experts", "experts": 8}]],
     "stages.0.expand.2.op", "experts carry a LoRA adapter"),
])
def test_misfits_are_one_line_at_plan_check(tmp_path, stages, field, fragment):
    found = problems(tmp_path, config_dir(tmp_path, "llama"), *stages)
    assert len(found) == 1 and found[0].startswith(f"{field}: ") and fragment in found[0], found
    assert "\n" not in found[0] and " — " in found[0]


def test_families_without_an_moe_class_refuse_at_plan_check(tmp_path):
    mixtral = config_dir(tmp_path, "mixtral", model_type="mixtral", architectures=["MixtralForCausalLM"],
                         num_local_experts=4, num_experts_per_tok=2)
    olmo2 = config_dir(tmp_path, "olmo2", model_type="olmo2", architectures=["Olmo2ForCausalLM"])
    for source, fragment in (("builtin:tiny-neo", "no mixture-of-experts class"), (mixtral, "already"),
                             (olmo2, "olmoe blocks their inputs")):
        found = problems(tmp_path, source, [{"op": "upcycle", "experts": 4}])
        assert len(found) == 1 and found[0].startswith("stages.0.expand.0.op: ") and fragment in found[0], found
    assert problems(tmp_path, mixtral, [{"op": "add_experts", "experts": 8}]) == []
    assert problems(tmp_path, config_dir(tmp_path, "plain"), [{"op": "upcycle", "experts": 4, "router": "kmeans"},
                                                              {"op": "add_experts", "experts": 8}]) == []


# ---------------------------------------------------------------------------------------------
# inside [stages.grow]: the optimizer state follows


def trained_dense(model_type: str, steps: int = 5):
    model, view = dense_model("llama", model_type, layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        one_step(model, optimizer, token_batch(step, rows=4))
    return model, view, optimizer


@pytest.mark.parametrize("model_type,init", [("llama", "drop"), ("qwen2", "copy")])
def test_mid_run_upcycle_carries_adamw_state_into_the_experts(model_type, init):
    model, view, optimizer = trained_dense(model_type)
    spec = GrowSpec(trigger="at", at_steps=[1], expand=[ExpandSpec(op="upcycle", experts=4, top_k=2, init=init)])
    before = dict(model.named_parameters())
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in before.items()}
    grown = grow_model(model, view, spec.expand, 0, 0, token_batch(9, rows=4), growth_generator(0, 0, 0))
    stage = combine_growth(StageGrowth(), grown, before, model)
    freezer = Freezer()
    freezer.apply(model, "base", stage)  # base: what the growth made trains (the MoE blocks)
    new_optimizer = adamw_like(optimizer, [p for p in model.parameters() if p.requires_grad])
    counts = carry_optimizer_state(optimizer, new_optimizer, before, model, grown, masked=freezer.masked)
    shared = 3 if view.moe.shared_expert else 0
    assert counts["copied"] == 2 * (2 + shared) and counts["fresh"] == 2 * (1 + (1 if shared else 0))
    experts = view.experts(0)
    moments = new_optimizer.state[experts.gate_up_proj]
    old = state["model.layers.0.mlp.gate_proj.weight"]
    for e in range(4):
        placed = (experts.gate_up_proj[e, :12].detach() == before["model.layers.0.mlp.gate_proj.weight"]).all(1)
        assert torch.equal(moments["exp_avg"][e, :12][placed], old["exp_avg"][placed])
        assert not moments["exp_avg"][e, :12][~placed].any()  # re-drawn units: zero moments
        assert int(placed.sum()) == (12 if init == "copy" else 6)
    assert float(moments["step"]) == float(old["step"]) == 5
    with torch.no_grad():
        loss = float(lm_loss(model, token_batch(10, rows=4)))
    for _ in range(3):
        one_step(model, new_optimizer, token_batch(10, rows=4))
    with torch.no_grad():
        assert float(lm_loss(model, token_batch(10, rows=4))) < loss


def test_mid_run_add_experts_splits_the_moments():
    """Each copy of an expert gets 1/m of its gradient: m/m, v/m² (the Split rule)."""
    model, view, optimizer = trained_dense("llama")
    grow(model, view, {"op": "upcycle", "experts": 2, "top_k": 1, "init": "noise"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        one_step(model, optimizer, token_batch(step, rows=4))
    before = dict(model.named_parameters())
    old = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in before.items()}
    spec = GrowSpec(trigger="at", at_steps=[1], expand=[ExpandSpec(op="add_experts", experts=4)])
    assert spec.expand[0].symmetry == "noise"  # a growth's default: the copies do not stay twins
    grown = grow_model(model, view, spec.expand, 0, 0, token_batch(9, rows=4), growth_generator(0, 0, 0))
    assert grown.reports[0]["exact"] and grown.reports[0]["max_abs_logit_delta"] <= EXACT
    new_optimizer = adamw_like(optimizer, model.parameters())
    counts = carry_optimizer_state(optimizer, new_optimizer, before, model, grown)
    assert counts["split"] == 2 * 3 and counts["fresh"] == 0 and not counts["unplaced"]
    name = "model.layers.1.mlp.experts.gate_up_proj"
    moments = new_optimizer.state[dict(model.named_parameters())[name]]
    for half in (slice(0, 2), slice(2, 4)):
        assert torch.allclose(moments["exp_avg"][half], old[name]["exp_avg"] / 2)
        assert torch.allclose(moments["exp_avg_sq"][half], old[name]["exp_avg_sq"] / 4)


def test_add_experts_copies_take_the_small_models_adam_step():
    """With the moments split (m/m, v/m²) each copy's AdamW update is its source's (its gradient
    is 1/m of the source's: Adam's step does not see the scale), router rows included, so the
    grown model after one step computes what the small model does after the same step (up to
    Adam's eps, tiny here; symmetry = "none": noise would make the copies' gradients differ)."""
    from tests.engine.grow.test_growth import twin

    model, view, _ = trained_dense("llama")
    # top_k 2 of 3: a renormalized top-1 router gets no gradient, and Adam would turn rounding into steps
    grow(model, view, {"op": "upcycle", "experts": 3, "top_k": 2, "init": "noise", "noise": 0.5})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-14)
    for step in range(4):
        one_step(model, optimizer, token_batch(step, rows=4))
    small, small_optimizer = twin(model, optimizer)
    before = dict(model.named_parameters())
    grown = grow_model(model, view, [ExpandSpec(op="add_experts", experts=6, symmetry="none")], 0, 0, None,
                       growth_generator(0, 0, 0))
    new_optimizer = adamw_like(optimizer, model.parameters())
    carry_optimizer_state(optimizer, new_optimizer, before, model, grown)
    probe, batch = token_batch(99, rows=4)[0], token_batch(4, rows=4)
    with torch.no_grad():
        start = small(input_ids=probe).logits
    one_step(small, small_optimizer, batch)
    one_step(model, new_optimizer, batch)
    with torch.no_grad():
        moved = float((small(input_ids=probe).logits - start).abs().max())
        apart = float((model(input_ids=probe).logits - small(input_ids=probe).logits).abs().max())
    assert moved > 1e-2 and apart < 1e-4 * moved, (moved, apart)  # measured: 0.033 and 6e-8


RUN = """
    name = "upcycle-mid-run"
    seed = 3
    [model]
    source = "{source}"
    [tasks.code]
    source = "{corpus}"
    [train]
    batch_size = 2
    seq_len = 16
    lr = 3e-3
    eval_interval = 0
    eval_batches = 1
    log_interval = 1
    device = "cpu"
    [[stages]]
    task = "code"
    steps = 6
    [stages.grow]
    trigger = "at"
    at_steps = [3]
    [[stages.grow.expand]]
    op = "upcycle"
    experts = 4
    top_k = 2
    router = "kmeans"
"""


@pytest.mark.slow
def test_a_run_upcycles_mid_stage_and_exports_the_moe_class(tmp_path):
    """A real run: [stages.grow] upcycles at step 3 (k-means router on the probe batch), trains on;
    its checkpoint rebuilds (the growth replayed) and exports as Mixtral."""
    model, _ = dense_model("llama", "llama", layers=2, vocab=260)
    model.save_pretrained(tmp_path / "dense")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)))
    plan = tmp_path / "plan.toml"
    plan.write_text(textwrap.dedent(RUN.format(source=tmp_path / "dense", corpus=corpus)))
    run = create_run(load_plan(plan), plan, tmp_path / "runs")
    Trainer(run.path).run_plan()
    (growth,) = [e for e in read_all(run.events) if e.type == "expand" and e.trigger == "at"]
    assert growth.op == "upcycle" and growth.step == 3 and growth.exact and growth.max_abs_logit_delta <= EXACT
    losses = [e.loss for e in read_all(run.events) if e.type == "step"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert run.results()["state"] == "done"
    # the run's weights, rebuilt as a resume does (the growth replayed, the checkpoint loaded over it)
    model, view, _, _ = load_run_model(run.path)
    assert view.family.name == "mixtral" and float(view.moe_block(0).gate.weight.detach().abs().max()) > 0
    reloaded, delta = reloaded_delta(model, tmp_path, token_batch(3)[0])
    assert type(reloaded).__name__ == "MixtralForCausalLM" and delta <= 1e-4
