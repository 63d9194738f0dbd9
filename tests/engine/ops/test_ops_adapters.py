"""LoRA and IA3 through PEFT, over random tiny models of every decoder family and through
``apply_stage`` (the reports are the real ones): exact at init on any roles and layers, one
adapter per virtual twin over shared base weights, the same model as PEFT's own
``layer_replication``, freezing, switching, saving and merging; LoRA on the fused expert tensors
of every MoE family (an upcycled model too), exact, trained and exported."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.grow.apply import Freezer, apply_stage
from engine.model.families import FAMILIES
from engine.model.view import count_params
from engine.ops.adapters import (
    adapted_path,
    adapter_layers,
    adapter_names,
    adapter_state_dict,
    load_adapter_state,
    merge_adapters,
    plain_module_path,
    role_module_names,
    set_active_adapters,
)
from engine.ops.depth import layer_kinds
from engine.ops.params import ADAPTER_ROLES, FFN_ROLES
from engine.plan import ExpandSpec
from tests.tiny_models import ALL_DECODER_FAMILIES, build, build_t5, token_batch, train_steps

examples = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def grow(model, view, *specs, stage=0, seed=0):
    return apply_stage(model, view, stage, [ExpandSpec(**s) for s in specs], token_batch(seed),
                       torch.Generator().manual_seed(seed))


def logits(model, seed=0):
    with torch.no_grad():
        return model(input_ids=token_batch(seed)[0]).logits


def loss(model, seed=0):
    x, y = token_batch(seed)
    return torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())


def train(model, steps=3, seed=0, lr=0.05):
    train_steps(model, token_batch(seed), steps=steps, lr=lr)


def roles_of(view, op: str = "lora") -> list[str]:
    """The roles `op` adapts in the family: on MoE families LoRA takes the experts' 3-D tensors
    too, IA3 (PEFT adapts modules only) the attention roles."""
    if view.moe and op == "ia3":
        return [r for r in ADAPTER_ROLES if r not in FFN_ROLES]
    return [r for r in ADAPTER_ROLES if r != "gate" or view.moe or view.family.ffn.gate]


def adapter_tensors(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n or ".ia3_" in n]


def adapted(model) -> dict:
    """What each PEFT layer adapts (a module path, or an expert tensor's path) -> the layer."""
    return {adapted_path(plain_module_path(path), layer): layer for path, layer in adapter_layers(model)}


def base_tensor(layer) -> torch.nn.Parameter:
    """The tensor a PEFT layer adapts: its base module's weight, or an expert tensor."""
    return getattr(layer.get_base_layer(), getattr(layer, "parameter_name", "weight"))


# random tiny configs: family, depth, heads, head_dim, ffn width, weights seed
tiny_models = st.tuples(st.sampled_from(ALL_DECODER_FAMILIES), st.integers(2, 3), st.integers(1, 3),
                        st.sampled_from([4, 8]), st.integers(4, 16), st.integers(0, 10_000))


# ---------------------------------------------------------------------------------------------
# exact at init, on exactly the modules asked for, and only adapters train


@examples
@given(config=tiny_models, op=st.sampled_from(["lora", "ia3"]), data=st.data())
def test_adapters_are_exact_at_init(config, op, data):
    model, view = build(*config)
    n = config[1]
    roles = data.draw(st.lists(st.sampled_from(roles_of(view, op)), min_size=1, max_size=4, unique=True))
    layers = data.draw(st.one_of(st.just("all"), st.lists(st.integers(0, n - 1), min_size=1, max_size=n,
                                                          unique=True)))
    spec = {"op": op, "modules": roles, "layers": layers}
    if op == "lora":
        spec.update(r=data.draw(st.integers(1, 4)), alpha=data.draw(st.sampled_from([1.0, 8.0, 32.0])))
    else:
        spec["feedforward"] = data.draw(st.lists(st.sampled_from(roles), max_size=2, unique=True))
    before = count_params(model)
    growth = grow(model, view, spec, seed=config[-1])
    report = growth.reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    assert report["loss_before"] == pytest.approx(report["loss_after"], abs=1e-5)

    # adapters sit on exactly the projections the roles name (fused q/k/v: one module; an MoE
    # block's experts: their 3-D tensors, a rank-r pair per expert)
    chosen = list(range(n)) if layers == "all" else layers
    targets = role_module_names(view, chosen, roles)
    layers_found = adapted(model)
    assert set(layers_found) == set(targets)
    assert adapter_names(model) == {f"{op}_stage0": op}
    if op == "lora":
        expected = sum(spec["r"] * getattr(layer, "num_experts", 1) * (layer.in_features + layer.out_features)
                       for layer in layers_found.values())
    else:
        ff = set(spec["feedforward"])
        expected = sum(layer.in_features if ff & set(targets[path]) else layer.out_features
                       for path, layer in layers_found.items())
        assert all(layer.is_feedforward == bool(ff & set(targets[path])) for path, layer in layers_found.items())
    assert report["params_added"] == expected == count_params(model) - before

    # freeze = "base": the adapter tensors, and only they, train
    freezer = Freezer()
    freezer.apply(model, "base", growth)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(trainable) == {n for n, _ in adapter_tensors(model)}
    assert freezer.trainable(model) == expected


def test_frozen_base_stays_put_while_adapters_learn():
    model, view = build("gpt_neox", 2, 2, 4, 12, 0)
    growth = grow(model, view, {"op": "lora", "modules": ["q", "o", "up", "down"], "r": 2},
                  {"op": "ia3", "modules": ["v", "down"]})
    Freezer().apply(model, "base", growth)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in adapter_tensors(model)}
    before = logits(model)
    train(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    changed = [n for n, p in adapter_tensors(model) if not torch.equal(p, adapters[n])]
    assert any("lora_B" in n for n in changed) and any("ia3_l" in n for n in changed)
    assert float((logits(model) - before).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# virtual twins: shared base, own adapters


@pytest.mark.parametrize("family", ALL_DECODER_FAMILIES)
def test_virtual_twins_get_their_own_adapters(family):
    model, view = build(family, 2, 2, 4, 12, 0)
    growth = grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "virtual"},
                  {"op": "lora", "modules": roles_of(view), "r": 2})
    assert layer_kinds(view) == ["real", "real", "virtual"]
    assert growth.reports[1]["exact"] and growth.reports[1]["max_abs_logit_delta"] <= 1e-4
    Freezer().apply(model, "base", growth)
    twin_a, twin_b = view.blocks()[1], view.blocks()[2]
    pairs = list(zip(adapter_layers(twin_a), adapter_layers(twin_b)))
    assert pairs and all(path_a == path_b for (path_a, _), (path_b, _) in pairs)

    base_before = {}
    for (path, a), (_, b) in pairs:
        assert a is not b
        assert base_tensor(a) is base_tensor(b)  # one base tensor
        base_before[path] = base_tensor(a).detach().clone()
        for attr in ("lora_A", "lora_B"):
            wa, wb = getattr(a, attr)["lora_stage0"].weight, getattr(b, attr)["lora_stage0"].weight
            assert wa is not wb and wa.data_ptr() != wb.data_ptr()  # own adapter tensors

    loss(model).backward()  # the two uses of a block get different adapter gradients
    grads = [(a.lora_B["lora_stage0"].weight.grad, b.lora_B["lora_stage0"].weight.grad) for (_, a), (_, b) in pairs]
    assert all(ga is not None and gb is not None and not torch.allclose(ga, gb) for ga, gb in grads)
    model.zero_grad()

    train(model)
    for (path, a), (_, b) in pairs:
        ba, bb = a.lora_B["lora_stage0"].weight, b.lora_B["lora_stage0"].weight
        assert float(ba.detach().abs().max()) > 0 and float(bb.detach().abs().max()) > 0
        assert not torch.allclose(ba, bb), path  # trained apart
        assert base_tensor(a) is base_tensor(b)  # still one tensor ...
        assert torch.equal(base_tensor(a), base_before[path])  # ... frozen


def test_adapter_put_on_before_the_mapping_is_tied_with_the_block():
    """Documented: a virtual repeat of an adapted block shares the adapter too."""
    model, view = build("llama", 2, 2, 4, 12, 0)
    grow(model, view, {"op": "lora", "modules": ["q"], "r": 2})
    grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "virtual"}, stage=1)
    a, b = view.blocks()[1].self_attn.q_proj, view.blocks()[2].self_attn.q_proj
    assert a is not b and a.lora_A["lora_stage0"].weight is b.lora_A["lora_stage0"].weight


# ---------------------------------------------------------------------------------------------
# the same model as PEFT's layer_replication


def _peft_reference(model, layer_replication, target_modules, r, alpha, seed):
    """PEFT's own replicated stack with per-copy LoRA (lora_B made non-zero so it matters)."""
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=target_modules, layer_replication=layer_replication))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    return reference


def _copy_peft_adapters(model, reference, projections):
    """Copy PEFT's adapter weights into widen's, layer by layer and projection by projection."""
    mine_layers, their_layers = model.model.layers, reference.base_model.model.model.layers
    assert len(mine_layers) == len(their_layers)
    pairs = []
    for mine_block, their_block in zip(mine_layers, their_layers):
        for path in projections:
            mine, theirs = mine_block.get_submodule(path), their_block.get_submodule(path)
            assert torch.equal(mine.base_layer.weight, theirs.base_layer.weight)
            with torch.no_grad():
                for attr in ("lora_A", "lora_B"):
                    getattr(mine, attr)["default"].weight.copy_(getattr(theirs, attr)["default"].weight)
            pairs.append((mine, theirs))
    return pairs


LLAMA_PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def test_same_model_as_peft_layer_replication():
    """widen's virtual layers + LoRA == PEFT's LoraConfig(layer_replication=[[0, 2], [1, 3]]) on
    Llama: PEFT's ranges are half-open, so 3 blocks become [0, 1, 1, 2], every copy sharing its
    source's weights and holding its own LoRA."""
    model, view = build("llama", 3, 2, 4, 12, 0)
    original = logits(model)
    projections = list(LLAMA_PROJECTIONS.values())
    reference = _peft_reference(model, [[0, 2], [1, 3]], [p.rsplit(".", 1)[1] for p in projections],
                                r=2, alpha=4, seed=1)
    ref_layers = reference.base_model.model.model.layers
    assert ref_layers[1].mlp.up_proj.base_layer.weight is ref_layers[2].mlp.up_proj.base_layer.weight

    grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1, 2], "kinds": "virtual"},
         {"op": "lora", "modules": list(LLAMA_PROJECTIONS), "r": 2, "alpha": 4, "name": "default"})
    assert model.config.num_hidden_layers == reference.config.num_hidden_layers == 4
    assert layer_kinds(view) == ["real", "real", "virtual", "real"]
    pairs = _copy_peft_adapters(model, reference, projections)

    delta = float((logits(model) - logits(reference)).abs().max())
    assert delta <= 1e-5, delta
    assert float((logits(model) - original).abs().max()) > 1e-2  # the adapters matter: not trivial

    # training sees the same model: equal gradients on every adapter tensor
    loss(model).backward()
    loss(reference).backward()
    for mine, theirs in pairs:
        for attr in ("lora_A", "lora_B"):
            g_mine, g_theirs = getattr(mine, attr)["default"].weight.grad, getattr(theirs, attr)["default"].weight.grad
            assert torch.allclose(g_mine, g_theirs, rtol=1e-4, atol=1e-6)

    # and decoding with a KV cache gives the same tokens
    prompt = token_batch(5)[0][:, :5]
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        theirs = reference.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ranges=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)).filter(lambda r: r[0] < r[1]),
                       min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_any_layer_replication_matches(ranges, seed):
    """Any PEFT layer_replication = [[start, end), ...] is widen's mapping of the concatenated ranges."""
    model, view = build("llama", 3, 2, 4, 12, seed)
    reference = _peft_reference(model, [list(r) for r in ranges], ["q_proj", "down_proj"], r=2, alpha=2, seed=seed)
    mapping = [i for start, end in ranges for i in range(start, end)]
    grow(model, view, {"op": "map_layers", "mapping": mapping, "kinds": "virtual"},
         {"op": "lora", "modules": ["q", "down"], "r": 2, "alpha": 2, "name": "default"})
    _copy_peft_adapters(model, reference, ["self_attn.q_proj", "mlp.down_proj"])
    assert float((logits(model) - logits(reference)).abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------------
# switching, saving, loading


def test_switching_saving_and_loading_adapters(tmp_path):
    from safetensors.torch import load_file, save_file

    model, view = build("gpt2", 2, 2, 4, 12, 0)
    original = logits(model)
    growth = grow(model, view, {"op": "lora", "modules": ["q", "up"], "r": 2})
    Freezer().apply(model, "base", growth)
    train(model)
    after_first = logits(model)
    growth = grow(model, view, {"op": "ia3", "modules": ["k", "down"]}, stage=1)
    Freezer().apply(model, "base", growth)
    train(model, seed=1)
    both = logits(model)
    assert adapter_names(model) == {"lora_stage0": "lora", "ia3_stage1": "ia3"}
    assert float((both - after_first).abs().max()) > 1e-3

    set_active_adapters(model, ["lora_stage0"])  # stage 1's adapter off: back to before it trained
    assert float((logits(model) - after_first).abs().max()) <= 1e-6
    set_active_adapters(model, [])
    assert float((logits(model) - original).abs().max()) <= 1e-6  # the shared base is untouched
    set_active_adapters(model)
    assert float((logits(model) - both).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="no adapter 'lora_stage9' in the model — adapters: "):
        set_active_adapters(model, ["lora_stage9"])

    for name in ("lora_stage0", "ia3_stage1"):  # a safetensors file round trip
        saved = adapter_state_dict(model, name)
        assert saved and all((".lora_" in k) if name.startswith("lora") else k.endswith(".ia3_l") for k in saved)
        save_file(saved, str(tmp_path / f"{name}.safetensors"))
    with torch.no_grad():
        for _, p in adapter_tensors(model):
            p.zero_()
    assert float((logits(model) - both).abs().max()) > 1e-3
    for name in ("lora_stage0", "ia3_stage1"):
        load_adapter_state(model, name, load_file(str(tmp_path / f"{name}.safetensors")))
    assert float((logits(model) - both).abs().max()) <= 1e-6

    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(model, "lora_stage0", {"nope": torch.zeros(1)})
    key = next(iter(saved))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, "ia3_stage1", {**saved, key: torch.zeros(3)})
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        adapter_state_dict(model, "nope")


def test_named_adapters_join_only_with_the_same_settings():
    model, view = build("llama", 3, 2, 4, 12, 0)
    grow(model, view, {"op": "lora", "modules": ["q"], "layers": [0], "r": 2, "name": "task_a"})
    grow(model, view, {"op": "lora", "modules": ["q"], "layers": [1], "r": 2, "name": "task_a"}, stage=1)
    assert adapter_names(model) == {"task_a": "lora"} and len(adapter_layers(model)) == 2
    with pytest.raises(ValueError, match="already has r = 2"):
        grow(model, view, {"op": "lora", "modules": ["q"], "layers": [2], "r": 4, "name": "task_a"}, stage=2)
    with pytest.raises(ValueError, match="already a lora adapter"):
        grow(model, view, {"op": "ia3", "modules": ["k"], "layers": [2], "name": "task_a"}, stage=2)
    with pytest.raises(ValueError, match="already exists on model.layers.0.self_attn.q_proj"):
        grow(model, view, {"op": "lora", "modules": ["q"], "layers": [0], "r": 2, "name": "task_a"}, stage=2)
    with pytest.raises(ValueError, match="layers: layer 3 out of range"):
        grow(model, view, {"op": "lora", "layers": [3]}, stage=2)


def test_one_adapter_name_across_the_stacks_of_t5():
    model, view = build_t5()
    report = grow(model, view, {"op": "lora", "modules": ["q", "v"], "r": 2}).reports[0]
    assert adapter_names(model) == {"lora_stage0": "lora"}
    assert {path.split(".")[0] for path, _ in adapter_layers(model)} == {"encoder", "decoder"}
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4


# ---------------------------------------------------------------------------------------------
# merging


def test_merging_keeps_the_function_of_twins_with_different_adapters():
    model, view = build("llama", 2, 2, 4, 12, 0)
    growth = grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "virtual"},
                  {"op": "lora", "modules": ["q", "o", "up"], "r": 2},
                  {"op": "ia3", "modules": ["v", "down"]})
    Freezer().apply(model, "base", growth)
    train(model)
    a, b = view.blocks()[1], view.blocks()[2]
    assert not torch.allclose(a.self_attn.q_proj.lora_B["lora_stage0"].weight,
                              b.self_attn.q_proj.lora_B["lora_stage0"].weight)
    adapted = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "self_attn.v_proj", "mlp.down_proj"]
    shared_adapted = sum(a.get_submodule(p).get_base_layer().weight.numel() for p in adapted)
    adapters = sum(p.numel() for _, p in adapter_tensors(model))
    before, params_before = logits(model), count_params(model)

    merge_adapters(model)
    delta = float((logits(model) - before).abs().max())
    assert delta <= 1e-4, delta
    assert not adapter_layers(model) and not adapter_names(model) and "peft_config" not in model.__dict__
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())
    # as documented: each twin's merged projection owns its tensor (different merged weights) ...
    for path in adapted:
        wa, wb = a.get_submodule(path).weight, b.get_submodule(path).weight
        assert wa is not wb and not torch.equal(wa, wb), path
    # ... the projections without adapters stay shared, and nothing else was copied
    assert a.self_attn.k_proj.weight is b.self_attn.k_proj.weight and a.mlp.gate_proj.weight is b.mlp.gate_proj.weight
    assert layer_kinds(view) == ["real", "real", "virtual"]
    assert count_params(model) == params_before - adapters + shared_adapted


@pytest.mark.parametrize("family", ALL_DECODER_FAMILIES)
def test_merging_nested_adapters_then_growing_again(family):
    """LoRA then IA3 on the same projections nest (o; down where it is a Linear — an MoE block's
    down is an expert tensor, LoRA only); identity insertion over them stays exact (the inner
    LoRA is zeroed too, an expert tensor's as well), and merging keeps the function."""
    model, view = build(family, 2, 2, 4, 12, 0)
    growth = grow(model, view, {"op": "lora", "modules": ["o", "down"], "r": 2})
    Freezer().apply(model, "base", growth)
    train(model)
    growth = grow(model, view, {"op": "ia3", "modules": ["o"] if view.moe else ["o", "down"]}, stage=1)
    Freezer().apply(model, "base", growth)
    train(model, seed=1)
    assert any(".base_layer" in path for path, _ in adapter_layers(model))  # nested
    saved = adapter_state_dict(model, "lora_stage0")
    assert not any("base_layer" in key for key in saved)  # plain module paths, as PEFT names them

    report = grow(model, view, {"op": "insert_identity", "layers": [0, 1]}, stage=2).reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-5, report
    before = logits(model)
    merge_adapters(model)
    assert not adapter_layers(model)
    assert float((logits(model) - before).abs().max()) <= 1e-4


# ---------------------------------------------------------------------------------------------
# LoRA on the experts of MoE families (PEFT's ParamWrapper on the fused 3-D tensors)


MOE = [f.name for f in FAMILIES if f.moe is not None]


def _expert_lora_trains_and_exports(model, view, tmp_path):
    """LoRA on up/down: exact at creation, only adapters train (every expert tensor's B moves,
    each expert's update of rank <= r), and the export reloads in plain transformers to the
    trained model's logits. Returns (max |Δlogits| at creation, after export)."""
    from transformers import AutoModelForCausalLM

    from engine.exports.hf_directory import export_model
    from engine.model.forward import forward_logits
    from engine.train.data import ByteTokenizer

    r = 2
    growth = grow(model, view, {"op": "lora", "modules": ["up", "down"], "r": r, "name": "e"}, stage=1)
    report = growth.reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-5, report
    assert "one low-rank pair per expert" in report["note"], report["note"]
    moe = view.moe
    experts = {path: layer for path, layer in adapted(model).items() if hasattr(layer, "parameter_name")}
    sparse = view.sparse_layers()
    assert set(experts) == {f"{view.family.blocks}.{i}.{moe.module}.{leaf}" for i in sparse
                            for leaf in (moe.gate_up, moe.down)}
    for layer in experts.values():  # PEFT reads [E, in, out] where the experts module says so
        assert layer.get_base_layer().is_transposed == moe.transposed
        assert layer.lora_A["e"].weight.shape[0] == r * view.num_experts

    Freezer().apply(model, "base", growth)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in adapter_tensors(model)}
    frozen = {path: base_tensor(layer).detach().clone() for path, layer in experts.items()}
    train(model)
    for path, layer in experts.items():
        assert torch.equal(base_tensor(layer), frozen[path]), path
        assert float(layer.lora_B["e"].weight.detach().abs().max()) > 0, path  # the experts' adapters learned
    trained = logits(model)

    inputs = token_batch(0)[0]
    export_model(model, ByteTokenizer(), tmp_path / "out")  # materialize: merged into the tensors
    for path, layer in experts.items():
        update = (base_tensor(layer) - frozen[path]).float()
        assert float(update.abs().max()) > 0 and all(int(torch.linalg.matrix_rank(u, rtol=1e-4)) <= r for u in update), path
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # plain transformers, no widen
    with torch.no_grad():
        exported = float((forward_logits(reloaded, inputs) - trained).abs().max())
    assert exported <= 1e-4, exported
    return report["max_abs_logit_delta"], exported


@pytest.mark.parametrize("family", MOE)
def test_lora_on_experts_is_exact_trains_and_exports(family, tmp_path):
    """roles up (= gate: the fused gate_up tensor) and down adapt every expert of each sparse block;
    Qwen's dense blocks (mlp_only_layers) get Linear adapters as before."""
    model, view = build(family, 2, 2, 4, 12, 0)
    _expert_lora_trains_and_exports(model, view, tmp_path)
    if view.family.moe.dense_layers_field:  # block 0 of the tiny Qwen2-MoE is dense
        dense = [i for i in range(view.num_layers) if not view.is_sparse(i)]
        assert all(type(model.get_submodule(f"model.layers.{i}.mlp.down_proj")).__name__ == "Linear" for i in dense)


def test_lora_on_upcycled_experts_exports(tmp_path):
    """A Llama whose FFNs became MixtralSparseMoeBlocks: the same adapters, exported as Mixtral."""
    from tests.engine.ops.test_ops_experts import dense_model

    model, view = dense_model("llama", "llama", layers=2)
    grow(model, view, {"op": "upcycle", "experts": 4, "top_k": 2})
    assert view.family.name == "mixtral" and type(model).__name__ == "LlamaForCausalLM"
    _expert_lora_trains_and_exports(model, view, tmp_path)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_expert_adapters_join_nest_and_refuse_growth():
    """A later stage adds a second adapter to the same expert tensor (one ParamWrapper, two
    adapters) and another tensor (a nested wrapper); task-module keys tell the tensors apart;
    growing the adapted experts is refused in one line."""
    model, view = build("mixtral", 2, 2, 4, 12, 0)
    grow(model, view, {"op": "lora", "modules": ["down"], "r": 2, "name": "a"})
    grow(model, view, {"op": "lora", "modules": ["mlp.experts.down_proj", "gate"], "r": 2, "name": "b"}, stage=1)
    found = adapted(model)
    down, gate_up = found["model.layers.0.mlp.experts.down_proj"], found["model.layers.0.mlp.experts.gate_up_proj"]
    assert set(down.lora_A) == {"a", "b"} and set(gate_up.lora_A) == {"b"}
    # task-module keys name the tensor: the nested wrappers of one experts module stay apart
    from engine.grow.task_modules import adapter_parameters

    keys = adapter_parameters(model, "b")
    assert len(keys) == len([n for n, _ in adapter_tensors(model) if ".b." in n]) == 2 * 2 * 2
    assert "model.layers.0.mlp.experts.gate_up_proj.lora_A.b.weight" in keys
    for spec in ({"op": "widen_ffn", "size": 4}, {"op": "add_experts", "experts": 8}):
        with pytest.raises(ValueError, match="experts carry a LoRA adapter on their tensors") as caught:
            grow(model, view, spec, stage=2)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_adapters_save_in_peft_layout(family):
    """adapter_state_dict keys an expert tensor's adapter as PEFT nests its ParamWrappers: PEFT's
    own model with the same target_parameters takes the tensors and computes the same logits."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    model, view = build(family, 2, 2, 4, 12, 0)
    reference = copy.deepcopy(model)
    grow(model, view, {"op": "lora", "modules": ["q", "up", "down"], "r": 2, "alpha": 4, "name": "default"})
    with torch.no_grad():
        for _, p in adapter_tensors(model):
            p.normal_(std=0.3)  # B != 0: the adapters matter
    saved = adapter_state_dict(model, "default")
    moe = view.moe
    tensors = [f"model.layers.{i}.{moe.module}.{leaf}" for i in range(2) for leaf in (moe.gate_up, moe.down)]
    reference = get_peft_model(reference, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                     target_parameters=tensors))
    theirs = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(reference).items()}
    assert set(saved) == set(theirs) and any(".experts.base_layer.lora_A" in k for k in saved)
    set_peft_model_state_dict(reference, {f"base_model.model.{k}": v for k, v in saved.items()})
    assert float((logits(model) - logits(reference)).abs().max()) <= 1e-5


def test_meta_preview_counts_expert_adapters_as_the_build(tmp_path, widen_home):
    """The parameter preview (operators on the meta device) counts LoRA on expert tensors and on
    Qwen's dense blocks as build_from_plan measures them; a growth copies an adapted block."""
    from tests.engine.grow.test_preview_meta import _model_dir, _plan, assert_preview_matches_the_run

    raw = _plan(str(_model_dir("qwen2_moe", tmp_path)), [("base", [{"op": "lora", "modules": ["q", "up", "down"]}])],
                [{"op": "insert_identity", "layers": [1]}])
    assert_preview_matches_the_run(raw, tmp_path)
