"""widen_mlp on nn.Sequential MLPs (with the failure modes of each init), concat_linear and
parallel_linear on MLPs and transformer blocks: preservation measured, materialize() exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from engine.arch import view_of
from engine.expand import Freezer, apply_stage
from engine.export import _materialize_modules
from engine.health import similarity_report
from engine.plan import ExpandSpec
from tests.tiny_models import DECODER_FAMILIES, build, token_batch

quick = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def make_mlp(widths: list[int], act: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


def float_batch(widths, seed=0, rows=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, widths[0], generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)).expand(rows, widths[-1]).contiguous()


def grow(model, view, batch, *specs, seed=0):
    return apply_stage(model, view, 0, [ExpandSpec(**s) for s in specs], batch, torch.Generator().manual_seed(seed))


def materialized_delta(model, inputs, forward) -> float:
    with torch.no_grad():
        before = forward(model, inputs)
        _materialize_modules(model)
        after = forward(model, inputs)
    return float((after - before).abs().max())


PRESERVING = ["zero_out", "zeros", "constant", "net2net", "copy_halve"]


@quick
@given(widths=st.lists(st.integers(3, 16), min_size=3, max_size=5), act=st.sampled_from(list(ACTIVATIONS)),
       init=st.sampled_from(PRESERVING), size=st.integers(1, 3), seed=st.integers(0, 500))
def test_widen_mlp_preserving_inits_keep_outputs(widths, act, init, size, seed):
    model = make_mlp(widths, act, seed)
    view = view_of(model)
    report = grow(model, view, float_batch(widths, seed), {"op": "widen_mlp", "size": size, "init": init}, seed=seed).reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    hidden = len(widths) - 2
    assert view.num_layers == hidden
    # incoming rows (a layer after a widened one reads its new units too) + biases + outgoing columns
    added = sum(size * (widths[i] + (size if i else 0) + 1 + widths[i + 2]) for i in range(hidden))
    assert report["params_added"] == added


@quick
@given(widths=st.lists(st.integers(3, 12), min_size=3, max_size=4), size=st.integers(1, 4),
       seed=st.integers(0, 500), delta_init=st.sampled_from(["zeros", "random"]))
def test_concat_and_parallel_linear_on_mlps(widths, size, seed, delta_init):
    model = make_mlp(widths, "tanh", seed)
    view = view_of(model)
    batch = float_batch(widths, seed)
    reports = grow(model, view, batch, {"op": "concat_linear", "modules": [0], "size": size},
                   {"op": "parallel_linear", "modules": [len(widths) - 2], "init": delta_init}, seed=seed).reports
    assert reports[0]["exact"] and reports[0]["max_abs_logit_delta"] <= 1e-5
    assert reports[0]["params_added"] == size * (widths[0] + 1) + widths[2] * size
    assert reports[1]["exact"] == (delta_init == "zeros")
    if delta_init == "zeros":
        assert reports[1]["max_abs_logit_delta"] <= 1e-5
    else:
        assert 0 < reports[1]["max_abs_logit_delta"] < float("inf")
    assert materialized_delta(model, batch[0], lambda m, x: m(x)) <= 1e-5
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.Tanh))


@quick
@given(family=st.sampled_from(DECODER_FAMILIES), roles=st.lists(st.sampled_from(["q", "v", "o", "up", "down"]),
       min_size=1, max_size=3, unique=True), size=st.integers(1, 4), seed=st.integers(0, 500))
def test_linear_ops_on_transformers(family, roles, size, seed):
    model, view = build(family, 2, 2, 4, 12, seed)
    reports = grow(model, view, token_batch(seed), {"op": "concat_linear", "size": size},
                   {"op": "parallel_linear", "modules": roles, "layers": [1]}, seed=seed).reports
    for report in reports:
        assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    assert materialized_delta(model, token_batch(seed)[0], lambda m, x: m(input_ids=x).logits) <= 1e-4


def test_clear_errors():
    model = make_mlp([2, 4, 1], "relu", 0)
    view = view_of(model)
    with pytest.raises(ValueError, match="output layer"):
        grow(model, view, float_batch([2, 4, 1]), {"op": "concat_linear", "modules": [1], "size": 2})
    llama, llama_view = build("llama", 1, 2, 4, 8, 0)
    with pytest.raises(ValueError, match="add_heads"):
        grow(llama, llama_view, token_batch(), {"op": "concat_linear", "modules": ["q"], "size": 2})
    with pytest.raises(ValueError, match="widen_ffn"):
        grow(llama, llama_view, token_batch(), {"op": "widen_mlp", "size": 2})


def train(model, batch, steps=25, lr=0.05):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("init, expect", [
    ("zeros", "dead"), ("constant", "identical"), ("copy_halve", "twins"), ("net2net", "twins"), ("zero_out", "learns"),
])
def test_failure_modes_on_a_small_mlp(init, expect):
    """The on-the-fly-expansion note's MLP (2 -> 8 -> 1), widened by 4 units, then trained."""
    widths = [2, 8, 1]
    model = make_mlp(widths, "relu", 0)
    view = view_of(model)
    batch = float_batch(widths, rows=64)
    growth = grow(model, view, batch, {"op": "widen_mlp", "size": 4, "init": init})
    report = growth.reports[0]
    # twins stay equal to their sources only when the sources train too
    Freezer().apply(model, "none" if expect == "twins" else "base", growth)
    train(model, batch)
    units = growth.results[0].units
    after = similarity_report(units)
    if expect == "dead":
        assert report["new_grad_norm"] == 0 and report["dead_share"] == 1.0
        assert torch.count_nonzero(model[0].weight[8:]) == 0  # still exactly zero after training
    elif expect == "identical":
        assert after["max_pairwise_cosine"] > 0.9999
    elif expect == "twins":
        assert after["max_twin_cosine"] > 0.9999
    else:
        assert report["new_grad_norm"] > 0 and report["dead_share"] < 1.0
        assert after["max_pairwise_cosine"] < 0.99
