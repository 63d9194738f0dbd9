"""The design's failure modes of new-unit inits really happen (and zero_out avoids them)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoConfig

from engine.grow.apply import Freezer, apply_stage
from engine.model.view import ArchView
from engine.ops.health import max_pairwise_cosine, max_twin_cosine
from engine.plan import ExpandSpec
from tests.tiny_models import train_steps

VOCAB = 40


def train_widened(init: str, mode: str = "inplace", freeze: str = "base", steps: int = 25, noise: float = 0.0):
    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                          attention_types=[[["global", "local"], 1]], intermediate_size=16,
                          max_position_embeddings=32, window_size=8)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    view = ArchView(model.config, model)
    data = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(1))
    batch = (data[:, :-1], data[:, 1:])
    spec = ExpandSpec(op="widen_ffn", size=6, init=init, mode=mode, value=0.05, noise=noise)
    growth = apply_stage(model, view, 0, [spec], batch, torch.Generator().manual_seed(2))
    freezer = Freezer()
    freezer.apply(model, freeze, growth)
    train_steps(model, batch, steps=steps, lr=1e-2)
    return growth.reports[0], growth.results[0].units


def test_zeros_are_dead_forever():
    report, units = train_widened("zeros")
    assert report["new_grad_norm"] == 0.0 and report["dead_share"] == 1.0
    assert all(float(u.vectors().abs().max()) == 0.0 for u in units)  # still all zero after training


def test_constant_units_stay_identical():
    report, units = train_widened("constant")
    assert report["max_pairwise_cosine"] == pytest.approx(1.0)
    assert report["new_grad_norm"] > 0
    assert max_pairwise_cosine(units) > 1 - 1e-5
    for u in units:  # trained, yet every new unit equals the others
        v = u.vectors()
        assert torch.allclose(v, v[:1].expand_as(v), atol=1e-6)


@pytest.mark.parametrize("init", ["copy_halve", "net2net"])
def test_twins_without_noise_stay_collapsed(init):
    report, units = train_widened(init, freeze="none")
    assert report["max_twin_cosine"] == pytest.approx(1.0)
    assert max_twin_cosine(units) > 1 - 1e-5


def test_net2net_noise_breaks_symmetry():
    report, noisy = train_widened("net2net", freeze="none", noise=0.5)
    assert not report["exact"] and report["max_abs_logit_delta"] > 0
    assert max_twin_cosine(noisy) < 0.999


def test_zero_out_learns_and_units_differ():
    report, units = train_widened("zero_out")
    assert report["new_grad_norm"] > 1e-6 and report["dead_share"] == 0.0
    assert max_pairwise_cosine(units) < 0.9
    report_parallel, units_parallel = train_widened("zero_out", mode="parallel")
    assert report_parallel["dead_share"] == 0.0 and max_pairwise_cosine(units_parallel) < 0.9
