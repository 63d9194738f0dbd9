"""Mixture-of-experts families (engine.model.families: mixtral, qwen2_moe, qwen3_moe, olmoe,
gpt_oss) under the width operators: widen_ffn grows every expert's units with the dense FFN's
inits (exact where the docs say so, the symmetric inits' failure modes measured per expert),
mid-run with the optimizer state carried through the fused 3-D tensors; widen_hidden grows the
router, the experts and the shared expert exactly; and what does not apply is refused at plan
check, one line on the operator's field (adapters on the experts: tests/engine/ops/test_ops_adapters.py). Tiny random MoE models route by random weights, so
exactness compares the logits of one model before and after (the routing is deterministic)."""

from __future__ import annotations

import json

import pytest
import tomli_w
import torch

from engine.grow.apply import apply_stage
from engine.grow.growth import carry_optimizer_state, grow_model
from engine.grow.operator_fit import validate_plan_file
from engine.model.families import FAMILIES
from engine.ops.expert_units import innermost_experts, read_experts
from engine.ops.health import dead_share, max_pairwise_cosine, max_twin_cosine
from engine.plan import ExpandSpec
from tests.tiny_models import build, tiny_config, token_batch, train_steps

MOE = [f.name for f in FAMILIES if f.moe is not None]
EXACT = 1e-5
SIZE = 8  # a multiple of 4: the experts run through torch's grouped_mm (16-byte strides)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a loaded machine
    yield
    torch.set_num_threads(threads)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def grow(model, view, seed=0, **spec):
    growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_ffn", **spec)], token_batch(seed),
                         torch.Generator().manual_seed(seed))
    return growth.results[0], growth.reports[0]


def experts_of(view, layer):
    return read_experts(innermost_experts(view.experts(layer)), view.moe)


PRESERVING = [dict(init="zero_out"), dict(init="zero_out", mode="inplace"), dict(init="zeros", mode="inplace"),
              dict(init="constant"), dict(init="net2net"), dict(init="copy_halve", symmetry="split"),
              dict(init="net2net", symmetry="noise")]


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("settings", PRESERVING, ids=lambda s: "-".join(map(str, s.values())))
def test_widen_ffn_on_experts_keeps_the_function(family, settings):
    model, view = build(family, 2, 4, 4, 12, 0)
    x = token_batch(1)[0]
    before = logits(model, x)
    old = {i: experts_of(view, i) for i in view.sparse_layers()}
    result, report = grow(model, view, size=SIZE, **settings)
    assert report["exact"] and report["max_abs_logit_delta"] <= EXACT, report
    assert float((logits(model, x) - before).abs().max()) <= EXACT
    inplace = settings.get("mode") == "inplace" or settings["init"] in ("net2net", "copy_halve")
    for layer, weights in old.items():
        grown = experts_of(view, layer)
        assert grown.units == weights.units + (SIZE if inplace else 0)
        if inplace and settings["init"] in ("zero_out", "zeros"):
            assert torch.equal(grown.down[:, :, weights.units:], torch.zeros_like(grown.down[:, :, weights.units:]))
            assert torch.equal(grown.up[:, :weights.units], weights.up)  # the old units as they were
        if settings["init"] in ("net2net", "copy_halve"):  # every expert of a block copies the same units
            gate_up = getattr(innermost_experts(view.experts(layer)), view.moe.gate_up.rpartition(".")[2])
            source = next(u.sources for u in result.units if u.up is gate_up)
            assert torch.equal(grown.gate[:, weights.units:], weights.gate[:, source])
    if inplace:
        assert model.config.to_dict()[view.moe.expert_size_field] == 12 + SIZE
    # one health record per expert of each sparse block (and one per dense FFN)
    assert len(result.units) == len(view.sparse_layers()) * view.num_experts + (
        view.num_layers - len(view.sparse_layers()))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_random_init_is_not_exact_and_says_so(family):
    model, view = build(family, 2, 4, 4, 12, 0)
    _, report = grow(model, view, size=SIZE, init="random")
    assert not report["exact"] and report["max_abs_logit_delta"] > 1e-3


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_symmetric_inits_fail_per_expert_as_on_dense_ffns(family):
    """zeros: every new unit of every expert gets zero gradient (dead); constant: the new units of
    an expert are identical and stay so under training; zero_out: outgoing weights learn and the
    units differ; net2net: copies stay twins of their sources unless symmetry = "noise"."""
    batch = token_batch(2)

    def grown(**settings):
        model, view = build(family, 2, 4, 4, 12, 1)
        result, report = grow(model, view, size=SIZE, mode="inplace", **settings)
        experts = [u for u in result.units if u.expert is not None]
        torch.nn.functional.cross_entropy(model(input_ids=batch[0]).logits.flatten(0, 1),
                                          batch[1].flatten()).backward()
        return model, experts, report

    _, experts, _ = grown(init="zeros")
    assert dead_share(experts) == 1.0
    model, experts, _ = grown(init="constant")
    assert max_pairwise_cosine(experts) == pytest.approx(1.0, abs=1e-6)
    model.zero_grad()
    train_steps(model, batch, steps=3, lr=0.01)
    assert max_pairwise_cosine(experts) == pytest.approx(1.0, abs=1e-5)
    _, experts, _ = grown(init="zero_out")
    assert dead_share(experts) < 1.0 and max_pairwise_cosine(experts) < 0.999
    model, experts, report = grown(init="net2net")
    assert report["max_twin_cosine"] == pytest.approx(1.0, abs=1e-6)
    model.zero_grad()
    train_steps(model, batch, steps=3, lr=0.01)
    assert max_twin_cosine(experts) > 0.999
    _, experts, report = grown(init="net2net", symmetry="noise")
    assert report["exact"] and max_twin_cosine(experts) < 0.999


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("settings", [dict(init="zero_out", mode="inplace"), dict(init="net2net", symmetry="noise"),
                                      dict(init="zero_out")], ids=["mask", "split", "parallel"])
def test_widen_ffn_on_experts_mid_run_carries_the_optimizer_state(family, settings):
    """A growth inside [stages.grow]: AdamW's moments follow the fused 3-D tensors (old entries keep
    theirs, new ones start at zero or as their source's), and training goes on."""
    model, view = build(family, 2, 4, 4, 12, 0)
    batch = token_batch(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(input_ids=batch[0]).logits.flatten(0, 1), batch[1].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    before = dict(model.named_parameters())
    name = f"{view.family.blocks}.1.{view.moe.module}.{view.moe.gate_up}"
    old_state = {k: v.clone() for k, v in optimizer.state[before[name]].items()}
    growth = grow_model(model, view, [ExpandSpec(op="widen_ffn", size=SIZE, **settings)], 0, 0, batch,
                        torch.Generator().manual_seed(0))
    assert growth.reports[0]["exact"] and growth.reports[0]["max_abs_logit_delta"] <= EXACT
    new_optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0)
    counts = carry_optimizer_state(optimizer, new_optimizer, before, model, growth)
    assert counts["unplaced"] == []
    if settings.get("mode") == "parallel" or "mode" not in settings and settings["init"] == "zero_out":
        assert counts["fresh"] > 0 and counts["grown"] == counts["split"] == 0  # the new module: its own state
    else:
        assert counts["split" if "symmetry" in settings else "grown"] == 2 * len(view.sparse_layers()) * (
            1 if view.moe.gate_up_bias is None else 1.5)
        state = new_optimizer.state[dict(model.named_parameters())[name]]
        grown = dict(model.named_parameters())[name]
        assert state["exp_avg"].shape == grown.shape
        if "symmetry" not in settings:  # mask rule: old entries as they were, new ones zero
            old_units = 12
            dim = 2 if view.moe.transposed else 1
            gate = state["exp_avg_sq"].narrow(dim, 0, 2 * old_units) if view.moe.gate_up_interleaved else \
                torch.cat([state["exp_avg_sq"].narrow(dim, 0, old_units),
                           state["exp_avg_sq"].narrow(dim, old_units + SIZE, old_units)], dim)
            assert torch.equal(gate, old_state["exp_avg_sq"])
            assert state["exp_avg_sq"].sum() == pytest.approx(old_state["exp_avg_sq"].sum())
    train_steps(model, batch, steps=1)  # the grown model trains on


# ---------------------------------------------------------------------------------------------
# widen_hidden: the router, every expert and the shared expert follow d_model


@pytest.mark.parametrize("family", MOE)
def test_widen_hidden_grows_router_experts_and_shared_expert_exactly(family):
    model, view = build(family, 2, 4, 4, 12, 0)
    growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_hidden", size=16, init="duplicate",
                                                     symmetry="noise")], token_batch(), torch.Generator().manual_seed(0))
    assert growth.reports[0]["exact"] and growth.reports[0]["max_abs_logit_delta"] <= 1e-4, growth.reports[0]
    for layer in view.sparse_layers():
        block = view.moe_block(layer)
        assert getattr(block, view.moe.router).weight.shape == (view.num_experts, 32)
        weights = experts_of(view, layer)
        assert weights.up.shape == (view.num_experts, 12, 32) and weights.down.shape == (view.num_experts, 32, 12)
        if weights.down_b is not None:
            assert weights.down_b.shape == (view.num_experts, 32)
        if view.moe.shared_expert:
            shared = getattr(block, view.moe.shared_expert.module)
            assert shared.up_proj.weight.shape[1] == 32 and shared.down_proj.weight.shape[0] == 32
            assert getattr(block, view.moe.shared_expert_gate).weight.shape == (1, 32)


# ---------------------------------------------------------------------------------------------
# refusals: at plan check, one line each on the operator's field


def _plan_file(tmp_path, family: str, ops: list[dict]):
    config = tiny_config(family, 2, 4, 4, 12)
    config.vocab_size = 259
    source = tmp_path / family
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config.to_dict()))
    plan = {"name": "moe", "model": {"source": str(source)}, "tasks": {"t": {"source": "builtin:pydoc"}},
            "train": {"seq_len": 16}, "stages": [{"task": "t", "steps": 4, "expand": ops}]}
    path = tmp_path / "plan.toml"
    path.write_bytes(tomli_w.dumps(plan).encode())
    return path


REFUSALS = [
    ("mixtral", {"op": "concat_linear", "size": 4}, "op", "concat_linear does not apply to mixtral models — its FFN"),
    ("qwen2_moe", {"op": "lora", "modules": ["q", "down"], "dropout": 0.1}, "dropout",
     "a fused 3-D expert tensor, which PEFT's LoRA adapts without dropout"),
    ("gpt_oss", {"op": "ia3", "modules": ["k", "up", "gate"]}, "modules",
     "'up/gate' (model.layers.0.mlp.experts.gate_up_proj) is a fused 3-D expert tensor of gpt_oss"),
    ("mixtral", {"op": "lora", "modules": ["mlp.gate"]}, "modules", "is a MixtralTopKRouter, not a Linear"),
    ("qwen3_moe", {"op": "parallel_linear", "modules": ["gate"]}, "modules", "fused in 3-D tensors"),
    ("mixtral", {"op": "widen_ffn", "size": 3}, "size", "grouped_mm, which needs widths in multiples of 4"),
    ("olmoe", {"op": "add_heads", "size": 4}, "op", "add_heads does not apply to olmoe models — OLMoE's q_norm"),
    ("olmoe", {"op": "widen_hidden", "size": 8, "init": "lossless"}, "size", "use init = \"duplicate\" with size = 16"),
    ("gpt_oss", {"op": "widen_hidden", "size": 2, "init": "lossless"}, "size", "d_model 18"),
] + [(family, {"op": "ia3", "modules": ["down"]}, "modules", "PEFT's IA3 adapts modules only") for family in MOE]


@pytest.mark.parametrize("family, op, field, fragment", REFUSALS, ids=[f"{f}-{o['op']}" for f, o, _, _ in REFUSALS])
def test_what_does_not_apply_is_refused_at_plan_check_in_one_line(tmp_path, family, op, field, fragment):
    _, problems = validate_plan_file(_plan_file(tmp_path, family, [op]))
    lines = [str(p) for p in problems]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"stages.0.expand.0.{field}: ") and "\n" not in lines[0], lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("family", MOE)
def test_the_operators_that_apply_pass_plan_check(tmp_path, family):
    ops = [{"op": "widen_ffn", "size": SIZE}, {"op": "lora", "modules": ["q", "o", "up", "down"]},
           {"op": "lora", "modules": ["mlp.experts.down_proj"], "layers": [1], "name": "by_path"},
           {"op": "insert_identity", "layers": [0]}, {"op": "map_layers", "mapping": [0, 1, 1, 2]}]
    _, problems = validate_plan_file(_plan_file(tmp_path, family, ops))
    assert problems == []


@pytest.mark.parametrize("family", MOE)
def test_gguf_export_refuses_moe_models_in_one_line(tmp_path, family):
    from engine.exports.gguf import GgufExportError, export_gguf
    from engine.train.data import ByteTokenizer

    model, _ = build(family, 1, 4, 4, 12, 0)
    with pytest.raises(GgufExportError) as caught:
        export_gguf(model, ByteTokenizer(), tmp_path / "no.gguf", "f32")
    message = str(caught.value)
    assert "\n" not in message and f"{model.config.model_type} models are not supported" in message
    assert "use --format hf" in message and not (tmp_path / "no.gguf").exists()


def test_parallel_expert_units_switch_off_as_task_modules():
    """A parallel widen_ffn on experts is a switchable module: off, the block computes its base."""
    from engine.grow.task_modules import switchable_modules

    model, view = build("mixtral", 2, 4, 4, 12, 0)
    x = token_batch(1)[0]
    before = logits(model, x)
    result, _ = grow(model, view, size=SIZE, init="random", mode="parallel")
    modules = switchable_modules(model)
    assert len(modules) == 2 and all(key.endswith("mlp.experts[1]") for key in modules)
    assert float((logits(model, x) - before).abs().max()) > 1e-3  # random outgoing weights: a new function
    for module in modules.values():
        module.active = False
    assert float((logits(model, x) - before).abs().max()) <= EXACT


def test_depth_operators_keep_qwen_dense_blocks_described(tmp_path):
    """Qwen2-MoE's config lists its dense blocks: after a mapping every block keeps its source's
    kind and the list (with step 1) says so, so the model reloads as it is."""
    from transformers import AutoModelForCausalLM

    model, view = build("qwen2_moe", 2, 4, 4, 12, 0)
    assert view.sparse_layers() == [1]  # tiny_config: block 0 dense
    x = token_batch(1)[0]
    apply_stage(model, view, 0, [ExpandSpec(op="map_layers", mapping=[0, 1, 0, 1], kinds="real")], token_batch(),
                torch.Generator())
    assert model.config.mlp_only_layers == [0, 2] and model.config.decoder_sparse_step == 1
    assert view.sparse_layers() == [1, 3]
    mapped = logits(model, x)
    growth = apply_stage(model, view, 0, [ExpandSpec(op="insert_identity", layers=[1])], token_batch(),
                         torch.Generator())
    assert growth.reports[0]["max_abs_logit_delta"] <= EXACT  # the copy's experts write zero
    assert model.config.mlp_only_layers == [0, 3] and view.sparse_layers() == [1, 2, 4]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert float((logits(reloaded, x) - mapped).abs().max()) <= 1e-4
