"""Depth operators over random tiny models of every decoder family: identity insertion and the
identity mapping are exact, splits are measured, virtual layers really share their tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.expand import Freezer, apply_stage, count_params
from engine.ops.depth import layer_kinds
from engine.ops.params import MapLayersParams
from engine.plan import ExpandSpec
from tests.tiny_models import DECODER_FAMILIES, build, token_batch

quick = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def grow(model, view, *specs, seed=0):
    return apply_stage(model, view, 0, [ExpandSpec(**s) for s in specs], token_batch(seed),
                       torch.Generator().manual_seed(seed)).reports


def depth_field(model, view):
    return getattr(model.config, view.family.num_layers_field)


@quick
@given(family=st.sampled_from(DECODER_FAMILIES), layers=st.integers(2, 4), seed=st.integers(0, 500),
       data=st.data())
def test_exact_depth_ops_keep_logits(family, layers, seed, data):
    model, view = build(family, layers, 2, 4, 12, seed)
    after = data.draw(st.lists(st.integers(0, layers - 1), min_size=1, max_size=layers, unique=True))
    reports = grow(model, view, {"op": "insert_identity", "layers": sorted(after)},
                   {"op": "map_layers", "mapping": list(range(layers + len(after)))}, seed=seed)
    for report in reports:
        assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    assert len(view.blocks()) == depth_field(model, view) == layers + len(after)
    assert reports[0]["params_added"] == len(after) * sum(p.numel() for p in view.blocks()[0].parameters())
    model.generate(token_batch(seed)[0][:, :4], max_new_tokens=2, do_sample=False)  # KV cache slots right


@quick
@given(family=st.sampled_from(DECODER_FAMILIES), k=st.integers(2, 3), seed=st.integers(0, 500))
def test_split_residual_and_remapping_are_measured(family, k, seed):
    model, view = build(family, 3, 2, 4, 12, seed)
    split_depth = 3 + k - 1
    reports = grow(model, view, {"op": "split_residual", "layers": [1], "k": k},
                   {"op": "map_layers", "mapping": [*range(split_depth), 1]}, seed=seed)
    for report in reports:
        assert not report["exact"]
        assert 0 <= report["max_abs_logit_delta"] < float("inf")
    assert reports[0]["max_abs_logit_delta"] > 0  # F(x)/k applied k times is not F(x)
    assert depth_field(model, view) == len(view.blocks()) == split_depth + 1
    model.generate(token_batch(seed)[0][:, :4], max_new_tokens=2, do_sample=False)


def test_gpt_neo_attention_types_follow_the_mapping():
    model, view = build("gpt_neo", 4, 2, 4, 12, 0)  # global, local, global, local (TinyStories-33M style)
    grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1, 1, 2, 2, 2, 3]})
    expected = ["global", "local", "local", "local", "global", "global", "global", "local"]
    assert model.config.attention_layers == expected
    assert [b.attn.attention_type for b in view.blocks()] == expected
    assert [b.attn.layer_id for b in view.blocks()] == list(range(8))
    reloaded = type(model.config).from_dict(model.config.to_dict())  # attention_types describes it too
    assert reloaded.attention_layers == expected


def test_virtual_layers_share_storage_and_gradients():
    model, view = build("llama", 2, 2, 4, 12, 0)
    real, real_view = copy.deepcopy(model), None
    before = count_params(model)
    report = grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "virtual"})[0]
    assert report["params_added"] == 0 and count_params(model) == before
    assert layer_kinds(view) == ["real", "real", "virtual"]
    a, b = view.blocks()[1], view.blocks()[2]
    assert a is not b and a.self_attn.layer_idx == 1 and b.self_attn.layer_idx == 2
    assert a.mlp.up_proj.weight is b.mlp.up_proj.weight  # one tensor in memory
    assert a.mlp.up_proj.weight.data_ptr() == b.mlp.up_proj.weight.data_ptr()

    from tests.tiny_models import build as rebuild  # the same stack with a real copy
    real, real_view = rebuild("llama", 2, 2, 4, 12, 0)
    grow(real, real_view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "real"})
    x, y = token_batch(1)
    for m in (model, real):
        torch.nn.functional.cross_entropy(m(input_ids=x).logits.flatten(0, 1), y.flatten()).backward()
    shared_grad = model.model.layers[1].mlp.up_proj.weight.grad
    summed = real.model.layers[1].mlp.up_proj.weight.grad + real.model.layers[2].mlp.up_proj.weight.grad
    assert torch.allclose(shared_grad, summed, atol=1e-6)

    reports = grow(model, view, {"op": "unshare", "layers": [2]})
    assert reports[0]["exact"] and reports[0]["max_abs_logit_delta"] <= 1e-6
    assert reports[0]["params_added"] == sum(p.numel() for p in a.parameters())
    assert a.mlp.up_proj.weight.data_ptr() != view.blocks()[2].mlp.up_proj.weight.data_ptr()
    assert layer_kinds(view) == ["real", "real", "real"]


def test_scale_multiplies_real_repeats_only():
    model, view = build("gpt2", 2, 2, 4, 12, 0)
    source = model.transformer.h[1].mlp.c_proj.weight.detach().clone()
    grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "scale": 0.5})
    assert torch.equal(model.transformer.h[1].mlp.c_proj.weight, source)
    assert torch.allclose(model.transformer.h[2].mlp.c_proj.weight, source * 0.5)
    with pytest.raises(ValueError, match="real"):
        MapLayersParams(mapping=[0, 1, 1], kinds="virtual", scale=0.5)


def test_only_inserted_blocks_train_under_freeze_base():
    model, view = build("gpt_neox", 2, 2, 4, 12, 0)
    growth = apply_stage(model, view, 0, [ExpandSpec(op="insert_identity", layers=[0])], token_batch(),
                         torch.Generator().manual_seed(0))
    Freezer().apply(model, "base", growth)
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"1"}  # the identity copy of block 0 sits at index 1


@pytest.mark.parametrize("helper, depth, expected", [
    ({"dus": {"copies": 2, "drop": 8}}, 32, list(range(24)) + list(range(8, 32))),
    ({"keep_ends": {"depth": 8}}, 4, [0, 1, 1, 1, 2, 2, 2, 3]),
    ({"keep_ends": {"depth": 6}}, 6, [0, 1, 2, 3, 4, 5]),
])
def test_mapping_helpers(helper, depth, expected):
    assert MapLayersParams(**helper).resolve(depth) == expected


def test_plan_check_reports_mapping_problems(tmp_path):
    from engine.plan import validate_file
    from tests.conftest import TINY_PLAN

    plan = tmp_path / "plan.toml"
    plan.write_text(TINY_PLAN + '\n[[stages]]\ntask = "prose"\nsteps = 0\n'
                    '[[stages.expand]]\nop = "map_layers"\nmapping = [0, 1, 7]\n'
                    '[[stages.expand]]\nop = "map_layers"\ndus = {copies = 2, drop = 5}\n')
    _, problems = validate_file(plan)
    text = "\n".join(map(str, problems))
    assert "stages.2.expand.0.mapping: layer 7 out of range" in text
    assert "stages.2.expand.1.dus:" in text
