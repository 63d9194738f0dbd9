"""LoRA and IA3 through PEFT: exact at init on every family, one adapter per virtual twin, the same
model as PEFT's own layer_replication, switching, saving and merging."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.expand import Freezer, apply_stage, count_params
from engine.ops.adapters import (adapter_layers, adapter_names, adapter_state_dict, load_adapter_state,
                                 merge_adapters, set_active_adapters)
from engine.plan import ExpandSpec
from tests.tiny_models import DECODER_FAMILIES, build, token_batch

ROLES = ["q", "k", "v", "o", "up", "down"]


def grow(model, view, *specs, stage=0, seed=0):
    return apply_stage(model, view, stage, [ExpandSpec(**s) for s in specs], token_batch(seed),
                       torch.Generator().manual_seed(seed))


def logits(model, seed=0):
    with torch.no_grad():
        return model(input_ids=token_batch(seed)[0]).logits


def train_steps(model, steps=3, seed=0, lr=0.05):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    x, y = token_batch(seed)
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(DECODER_FAMILIES), op=st.sampled_from(["lora", "ia3"]),
       roles=st.lists(st.sampled_from(ROLES), min_size=1, max_size=4, unique=True),
       all_layers=st.booleans(), seed=st.integers(0, 500))
def test_adapters_are_exact_at_init(family, op, roles, all_layers, seed):
    model, view = build(family, 2, 2, 4, 12, seed)
    growth = grow(model, view, {"op": op, "modules": roles, "layers": "all" if all_layers else [1]}, seed=seed)
    report = growth.reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    assert report["params_added"] > 0
    Freezer().apply(model, "base", growth)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n or "ia3_" in n) for n in trainable)


def test_virtual_twins_get_their_own_adapters():
    model, view = build("llama", 2, 2, 4, 12, 0)
    growth = grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1]},
                  {"op": "lora", "modules": ["q", "v", "down"], "r": 2})
    Freezer().apply(model, "base", growth)
    twin_a, twin_b = model.model.layers[1], model.model.layers[2]
    base_before = twin_a.self_attn.q_proj.base_layer.weight.detach().clone()
    assert twin_a.self_attn.q_proj.base_layer.weight is twin_b.self_attn.q_proj.base_layer.weight
    assert twin_a.self_attn.q_proj.lora_A["lora_stage0"].weight is not twin_b.self_attn.q_proj.lora_A["lora_stage0"].weight
    train_steps(model)
    b_a = twin_a.self_attn.q_proj.lora_B["lora_stage0"].weight
    b_b = twin_b.self_attn.q_proj.lora_B["lora_stage0"].weight
    assert b_a.abs().sum() > 0 and b_b.abs().sum() > 0 and not torch.allclose(b_a, b_b)
    # the shared base stays shared and frozen
    assert twin_a.self_attn.q_proj.base_layer.weight is twin_b.self_attn.q_proj.base_layer.weight
    assert torch.equal(twin_a.self_attn.q_proj.base_layer.weight, base_before)


def test_same_model_as_peft_layer_replication():
    """widen's virtual layers + LoRA == PEFT's LoraConfig(layer_replication=...) on Llama."""
    from peft import LoraConfig, get_peft_model

    model, view = build("llama", 3, 2, 4, 12, 0)
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 3]]))
    torch.manual_seed(1)
    for name, p in reference.named_parameters():
        if "lora_B" in name:  # non-zero so the adapters matter
            torch.nn.init.normal_(p, std=0.3)
    grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1, 2], "kinds": "virtual"},
         {"op": "lora", "modules": ["q", "v"], "r": 2, "alpha": 4, "name": "default"})
    assert len(model.model.layers) == len(reference.base_model.model.model.layers) == 4
    ref_layers = reference.base_model.model.model.layers
    for i, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "v_proj"):
            mine, theirs = getattr(layer.self_attn, proj), getattr(ref_layers[i].self_attn, proj)
            assert torch.equal(mine.base_layer.weight, theirs.base_layer.weight)
            with torch.no_grad():
                mine.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
                mine.lora_B["default"].weight.copy_(theirs.lora_B["default"].weight)
    # both share the base of layers 1 and 2
    assert model.model.layers[1].mlp.up_proj.weight is model.model.layers[2].mlp.up_proj.weight
    delta = (logits(model) - logits(reference)).abs().max()
    assert delta <= 1e-5, delta
    assert (logits(model) - logits(build("llama", 3, 2, 4, 12, 0)[0])).abs().max() > 1e-3  # not trivial


def test_switching_saving_and_loading_adapters():
    model, view = build("gpt2", 2, 2, 4, 12, 0)
    original = logits(model)
    growth = grow(model, view, {"op": "lora", "modules": ["q", "up"], "r": 2})
    Freezer().apply(model, "base", growth)
    train_steps(model)
    after_first = logits(model)
    growth = grow(model, view, {"op": "ia3", "modules": ["k", "down"]}, stage=1)
    Freezer().apply(model, "base", growth)
    train_steps(model, seed=1)
    assert adapter_names(model) == {"lora_stage0": "lora", "ia3_stage1": "ia3"}
    set_active_adapters(model, ["lora_stage0"])
    assert torch.allclose(logits(model), after_first, atol=1e-6)  # task 0's modules only
    set_active_adapters(model, [])
    assert torch.allclose(logits(model), original, atol=1e-6)  # the shared base is untouched
    set_active_adapters(model)
    both = logits(model)

    saved = adapter_state_dict(model, "lora_stage0")
    assert saved and all(".lora_" in k for k in saved)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if "lora_stage0" in getattr(layer, "lora_B", {}):
                layer.lora_B["lora_stage0"].weight.zero_()
    assert not torch.allclose(logits(model), both)
    load_adapter_state(model, "lora_stage0", saved)
    assert torch.allclose(logits(model), both, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(model, "lora_stage0", {"nope": torch.zeros(1)})


def test_merging_keeps_the_function_of_twins_with_different_adapters():
    model, view = build("llama", 2, 2, 4, 12, 0)
    growth = grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1]},
                  {"op": "lora", "modules": ["q", "o", "up"], "r": 2},
                  {"op": "ia3", "modules": ["v", "down"]})
    Freezer().apply(model, "base", growth)
    train_steps(model)
    before, params_before = logits(model), count_params(model)
    merge_adapters(model)
    assert not adapter_layers(model) and not adapter_names(model)
    assert (logits(model) - before).abs().max() <= 1e-4
    # the twins' adapted projections now own different merged tensors
    a, b = model.model.layers[1], model.model.layers[2]
    assert a.self_attn.q_proj.weight is not b.self_attn.q_proj.weight
    assert count_params(model) < params_before + sum(p.numel() for p in a.parameters())
