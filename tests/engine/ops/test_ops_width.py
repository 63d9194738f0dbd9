"""widen_ffn over random tiny models of every supported family: preservation is measured."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.grow.apply import Freezer, apply_stage, probe
from engine.ops.params import WidenFFNParams
from engine.ops.registry import apply_operator, implementations
from engine.plan import ExpandSpec
from tests.tiny_models import VOCAB, build, tiny_config, train_steps  # noqa: F401  (re-exported for other tests)

families = st.sampled_from(["gpt_neo", "gpt2", "gpt_neox", "llama"])
PRESERVING = [("zero_out", "parallel"), ("zero_out", "inplace"), ("zeros", "parallel"),
              ("constant", "inplace"), ("net2net", "inplace"), ("copy_halve", "inplace")]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=families, layers=st.integers(1, 3), heads=st.sampled_from([2, 4]),
       head_dim=st.sampled_from([4, 8]), ffn=st.integers(8, 24), size=st.integers(1, 8),
       init_mode=st.sampled_from(PRESERVING), seed=st.integers(0, 1000), layer_pick=st.booleans())
def test_preserving_inits_keep_logits(family, layers, heads, head_dim, ffn, size, init_mode, seed, layer_pick):
    init, mode = init_mode
    model, view = build(family, layers, heads, head_dim, ffn, seed)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    targets = torch.roll(x, -1, 1)
    chosen = "all" if layer_pick else [layers - 1]
    spec = ExpandSpec(op="widen_ffn", layers=chosen, size=size, init=init, mode=mode)
    growth = apply_stage(model, view, 0, [spec], (x, targets), torch.Generator().manual_seed(seed))
    report = growth.reports[0]
    assert report["exact"]
    assert report["max_abs_logit_delta"] <= 1e-4, report
    assert abs(report["loss_after"] - report["loss_before"]) <= 1e-5
    widened = layers if chosen == "all" else 1
    per_unit = (3 if family == "llama" else 2) * view.hidden_size + (0 if family == "llama" else 1)
    assert report["params_added"] == widened * size * per_unit


@pytest.mark.parametrize("family", ["gpt_neo", "gpt2", "llama"])
def test_random_init_is_reported_as_inexact(family):
    model, view = build(family, 2, 2, 8, 16, 0)
    x = torch.randint(0, VOCAB, (2, 12))
    growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_ffn", size=4, init="random")],
                         (x, torch.roll(x, -1, 1)), torch.Generator().manual_seed(0))
    report = growth.reports[0]
    assert not report["exact"]
    assert 0 < report["max_abs_logit_delta"] < float("inf")


def test_inplace_updates_config_and_export_shape():
    model, view = build("gpt_neo", 2, 2, 8, 16, 0)
    result = apply_operator(view, WidenFFNParams(op="widen_ffn", size=5, mode="inplace"), torch.Generator())
    assert result.config_changes == {"intermediate_size": 21}
    assert view.ffn(0).c_fc.weight.shape == (21, 16)
    assert view.ffn(1).c_proj.weight.shape == (16, 21)


def test_zero_out_learns_and_zeros_stays_dead():
    """The failure modes of the on-the-fly-expansion note really happen."""
    norms = {}
    for init in ("zero_out", "zeros"):
        model, view = build("gpt_neo", 2, 2, 8, 16, 0)
        x = torch.randint(0, VOCAB, (4, 12))
        growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_ffn", size=4, init=init)],
                             (x, torch.roll(x, -1, 1)), torch.Generator().manual_seed(0))
        norms[init] = growth.reports[0]["new_grad_norm"]
    assert norms["zero_out"] > 1e-6
    assert norms["zeros"] == 0.0


def test_freeze_base_trains_only_new_entries():
    model, view = build("gpt2", 2, 2, 8, 16, 0)
    x = torch.randint(0, VOCAB, (4, 12))
    batch = (x, torch.roll(x, -1, 1))
    growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_ffn", size=3, mode="inplace")], batch,
                         torch.Generator().manual_seed(0))
    freezer = Freezer()
    freezer.apply(model, "base", growth)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch, lr=0.1)
    fc = view.ffn(0).c_fc.weight  # Conv1D: [hidden, units]; the last 3 columns are new
    assert torch.equal(fc[:, :16], before["transformer.h.0.mlp.c_fc.weight"][:, :16])
    assert not torch.equal(fc[:, 16:], before["transformer.h.0.mlp.c_fc.weight"][:, 16:])
    for name, p in model.named_parameters():
        if "mlp" not in name:
            assert torch.equal(p, before[name]), name
    assert freezer.trainable(model) == 2 * 3 * (2 * 16 + 1)


def test_every_schema_has_an_implementation():
    from engine.ops.params import OPS

    assert set(implementations()) == set(OPS)


def test_probe_is_deterministic():
    model, _ = build("gpt_neo", 1, 2, 4, 8, 0)
    x = torch.randint(0, VOCAB, (2, 6))
    a, la = probe(model, x, x)
    b, lb = probe(model, x, x)
    assert torch.equal(a, b) and la == lb
