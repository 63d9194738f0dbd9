"""add_heads over random tiny models of every decoder family: exact at zero_out, GQA respected."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.grow.apply import Freezer, apply_stage
from engine.plan import ExpandSpec
from tests.tiny_models import VOCAB, build, train_steps


def batch(seed=0):
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    return x, torch.roll(x, -1, 1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["gpt_neo", "gpt2", "gpt_neox", "llama"]), layers=st.integers(1, 3),
       heads=st.sampled_from([2, 4]), head_dim=st.sampled_from([4, 8]), extra=st.integers(1, 3),
       seed=st.integers(0, 1000), all_layers=st.booleans())
def test_zero_out_heads_keep_logits(family, layers, heads, head_dim, extra, seed, all_layers):
    model, view = build(family, layers, heads, head_dim, 16, seed)
    group = view.num_heads // view.num_kv_heads
    size = extra * group
    chosen = "all" if all_layers else [0]
    if family == "llama" and (all_layers or layers == 1) and view.hidden_size % (view.num_heads + size):
        # LlamaConfig wants hidden_size to be a multiple of the head count: refused before any change
        with pytest.raises(ValueError, match=r"cannot describe .* heads .* would not export — use size = "):
            apply_stage(model, view, 0, [ExpandSpec(op="add_heads", layers=chosen, size=size)], batch(seed),
                        torch.Generator().manual_seed(seed))
        assert view.num_heads == heads and model.config.num_attention_heads == heads
        return
    growth = apply_stage(model, view, 0, [ExpandSpec(op="add_heads", layers=chosen, size=size)], batch(seed),
                         torch.Generator().manual_seed(seed))
    report = growth.reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    hidden, widened = view.hidden_size, layers if all_layers else 1
    new_kv = size // group
    if family == "gpt_neo":  # q, k, v rows (no bias) + out_proj columns, per new head
        expected = widened * size * head_dim * 4 * hidden
    elif family in ("gpt2", "gpt_neox"):  # fused qkv rows + biases + out columns
        expected = widened * size * head_dim * (3 * hidden + 3 + hidden)
    else:  # llama: q rows + o columns per head, k/v rows per new kv head
        expected = widened * head_dim * (2 * size * hidden + 2 * new_kv * hidden)
    assert report["params_added"] == expected
    # the model still runs generation with a KV cache after growing
    model.generate(batch(seed)[0][:, :4], max_new_tokens=2, do_sample=False)


def test_random_heads_are_reported_inexact():
    model, view = build("llama", 2, 4, 4, 16, 0)
    growth = apply_stage(model, view, 0, [ExpandSpec(op="add_heads", size=4, init="random")], batch(),
                         torch.Generator().manual_seed(0))
    assert not growth.reports[0]["exact"] and growth.reports[0]["max_abs_logit_delta"] > 0


def test_gqa_group_size_is_enforced():
    model, view = build("llama", 1, 4, 4, 16, 0)  # 4 query heads over 2 kv heads: groups of 2
    with pytest.raises(ValueError, match="multiple of the GQA group size 2"):
        apply_stage(model, view, 0, [ExpandSpec(op="add_heads", size=1)], batch(), torch.Generator())


def test_llama_config_follows_and_only_new_heads_train():
    model, view = build("llama", 2, 4, 4, 16, 0)
    growth = apply_stage(model, view, 0, [ExpandSpec(op="add_heads", size=4)], batch(),
                         torch.Generator().manual_seed(0))
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 4
    assert model.config.head_dim == 4
    freezer = Freezer()
    freezer.apply(model, "base", growth)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch())
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q[:16], before["model.layers.0.self_attn.q_proj.weight"][:16])
    assert not torch.equal(q[16:], before["model.layers.0.self_attn.q_proj.weight"][16:])
    o = model.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(o[:, :16], before["model.layers.0.self_attn.o_proj.weight"][:, :16])
    assert o[:, 16:].abs().sum() > 0  # the zero columns learned


def test_llama_heads_the_config_cannot_describe_are_refused_up_front():
    """LlamaConfig refuses hidden_size 16 over 6 heads even with head_dim stated: add_heads says
    so in one line, with sizes that fit, before changing anything."""
    model, view = build("llama", 2, 4, 4, 16, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"add_heads: size: a llama config cannot describe 4 \+ 2 = 6 heads over "
                                         r"hidden size 16 .*would not export — use size = 4 or 12$"):
        apply_stage(model, view, 0, [ExpandSpec(op="add_heads", size=2)], batch(), torch.Generator())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.config.num_attention_heads == 4


def test_llama_heads_export_and_reload(tmp_path):
    """The issue's case, at a size the config describes: export, plain from_pretrained, same logits."""
    from transformers import AutoModelForCausalLM

    from engine.exports.hf_directory import export_model
    from engine.model.forward import forward_logits
    from engine.train.data import ByteTokenizer

    model, view = build("llama", 2, 4, 4, 16, 0)
    apply_stage(model, view, 0, [ExpandSpec(op="add_heads", size=4, init="random")], batch(),
                torch.Generator().manual_seed(0))
    x = batch(1)[0]
    with torch.no_grad():
        expected = forward_logits(model, x)
    export_model(model, ByteTokenizer(), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.head_dim) == (8, 4)
    with torch.no_grad():
        assert float((forward_logits(reloaded, x) - expected).abs().max()) <= 1e-4
