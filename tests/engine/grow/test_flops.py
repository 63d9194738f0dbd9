"""engine.grow.flops against torch's FlopCounterMode: one training step (forward and backward of the
loss) of tiny models of every family in the family table, fully trainable and grown in the ways
that change what the backward runs — a frozen base with a trainable parallel FFN path in one
upper block, a frozen base with LoRA adapters, and weight-tied virtual blocks. Within 5 %."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.grow import flops
from engine.grow.apply import Freezer, StageGrowth
from engine.model.families import FAMILIES
from engine.model.forward import forward_logits, loss_of
from engine.ops.params import LoRAParams, MapLayersParams, ParallelLinearParams, WidenFFNParams, WidenMLPParams
from engine.ops.registry import apply_operator
from tests.tiny_models import build, build_t5, token_batch

TOLERANCE = 0.05
TRANSFORMERS = [f.name for f in FAMILIES if f.kind != "mlp"]
MLPS = [f.name for f in FAMILIES if f.kind == "mlp"]


def tiny(family: str):
    kind = next(f.kind for f in FAMILIES if f.name == family)
    if kind == "seq2seq":
        return build_t5(layers=3, decoder_layers=3, heads=2, d_kv=8, d_model=16, d_ff=24)
    model, view = build(family, layers=3, heads=2, head_dim=8, ffn=24, seed=0)
    if view.moe is not None:
        # FlopCounterMode has no formula for grouped_mm (transformers' default experts kernel) and
        # would count no expert at all; the eager kernel runs each routed token's experts as
        # matmuls it counts. The formula is the same for either kernel (test_moe_* below).
        model.set_experts_implementation("eager")
    return model, view


def grow(model, view, params, freeze: str = "base") -> None:
    """Apply one operator as a stage does (config changes included), then the stage's freezing."""
    result = apply_operator(view, params, torch.Generator().manual_seed(0))
    for key, value in result.config_changes.items():
        setattr(model.config, key, value)
    Freezer().apply(model, freeze, StageGrowth(results=[result]))


def measured(model, inputs, targets) -> int:
    """FLOPs of one training step's forward and backward, as the kernels' formulas count them."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss_of(forward_logits(model, inputs), targets).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def check(model, view, inputs, targets, sample=None) -> float:
    formula = flops.profile(model, view, sample_inputs=sample).step_flops(inputs)
    truth = measured(model, inputs, targets)
    error = (formula - truth) / truth
    assert abs(error) <= TOLERANCE, f"formula {formula:.4g} vs measured {truth} ({100 * error:+.2f}%)"
    return error


SCENARIOS = {
    "trainable": lambda model, view: None,
    # only the new units of block 1 train: block 0 and the attention of block 1 need no gradient at
    # all; everything above the new path passes input gradients down to it
    "frozen+parallel ffn": lambda model, view: grow(model, view, WidenFFNParams(size=8, mode="parallel", layers=[1])),
    "frozen+lora": lambda model, view: grow(model, view, LoRAParams(modules=["q", "v"], r=4, layers=[1, 2])),
    # weight-tied repeats run their tensors again: their matmuls count once per use
    "virtual blocks": lambda model, view: grow(model, view, MapLayersParams(mapping=[0, 1, 1, 2, 2],
                                                                           kinds="virtual"), freeze="none"),
    "virtual+parallel delta": lambda model, view: (
        grow(model, view, MapLayersParams(mapping=[0, 1, 1, 2], kinds="virtual"), freeze="none"),
        grow(model, view, ParallelLinearParams(modules=["o"], layers=[2]))),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family", TRANSFORMERS)
def test_formula_matches_flop_counter(family, scenario):
    model, view = tiny(family)
    SCENARIOS[scenario](model, view)
    inputs, targets = token_batch(rows=2, length=12)
    check(model, view, inputs, targets)


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_activation_checkpointing_counts_the_recomputed_forward(family):
    """train.checkpointing: each block's forward runs again in the backward (torch may stop before
    a block's last projection, which the formula still counts: within the tolerance)."""
    from engine.train import speed

    model, view = tiny(family)
    grow(model, view, WidenFFNParams(size=8, mode="parallel", layers=[1]))
    speed.enable_checkpointing(model, view)
    inputs, targets = token_batch(rows=2, length=12)
    plain = flops.profile(model, view).step_flops(inputs)
    formula = flops.profile(model, view, checkpointing=True).step_flops(inputs)
    truth = measured(model, inputs, targets)
    assert abs(formula - truth) <= TOLERANCE * truth and formula > plain


def test_t5_generation_batch_with_its_own_lengths():
    """A seq2seq batch (encoder ids, decoder ids) of different lengths: cross-attention reads the
    encoder's tokens, the decoder's matmuls the decoder's."""
    if "t5" not in TRANSFORMERS:
        pytest.skip("no T5 in the family table")
    model, view = tiny("t5")
    grow(model, view, WidenFFNParams(size=8, mode="parallel", layers=[1], stack="decoder"))
    encoder, _ = token_batch(rows=2, length=11)
    decoder, targets = token_batch(seed=1, rows=2, length=6)
    check(model, view, (encoder, decoder), targets)


@pytest.mark.parametrize("family", MLPS)
def test_mlp_families(family):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    from engine.model.view import ArchView

    view = ArchView.of(model)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    check(model, view, x, y, sample=x)
    grow(model, view, WidenMLPParams(size=4, layers=[1], mode="parallel"))
    check(model, view, x, y, sample=x)


def test_frozen_below_costs_no_gradients():
    """The formula's backward: nothing trainable below block 1 means block 0 pays nothing, so a
    frozen base with one new path costs well under the 3× forward of full training; the forward
    is the same."""
    model, view = tiny(TRANSFORMERS[0])
    inputs = token_batch(rows=2, length=12)[0]
    full = flops.profile(model, view)
    grow(model, view, WidenFFNParams(size=8, mode="parallel", layers=[2]))
    frozen = flops.profile(model, view)
    assert sum(full.backward.values()) == pytest.approx(2 * sum(full.forward.values()))
    assert full.step_flops(inputs) > 1.3 * frozen.step_flops(inputs)
    assert frozen.forward_flops(inputs) > full.forward_flops(inputs)  # the new path runs too


def test_profile_leaves_the_model_as_it_was():
    model, view = tiny(TRANSFORMERS[0])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    flops.profile(model, view)
    assert model.training and torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# mixtures of experts: only the experts that run count

MOE_FAMILIES = [f.name for f in FAMILIES if f.moe is not None]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_counts_the_top_k_experts_and_the_router(family):
    """Per token and sparse block: the router (2·d·E) and top_k experts (2·d·2I + 2·I·d each).
    Twice the experts at the same top_k cost only the router's new rows; one more expert per
    token costs one expert's matmuls."""
    from engine.ops.params import AddExpertsParams

    model, view = tiny(family)
    inputs = token_batch(rows=2, length=12)[0]
    tokens, sparse = inputs.numel(), len(view.sparse_layers())
    d, size, experts, k = view.hidden_size, view.expert_size, view.num_experts, view.top_k
    one_expert = 2 * d * 2 * size + 2 * size * d
    before = flops.profile(model, view).forward_flops(inputs)
    grow(model, view, AddExpertsParams(experts=2 * experts, top_k=k), freeze="none")
    wider = flops.profile(model, view).forward_flops(inputs)
    assert wider - before == pytest.approx(sparse * tokens * 2 * d * experts)
    grow(model, view, AddExpertsParams(experts=4 * experts, top_k=k + 1), freeze="none")
    deeper = flops.profile(model, view).forward_flops(inputs)
    assert deeper - wider == pytest.approx(sparse * tokens * (2 * d * 2 * experts + one_expert))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_formula_is_the_same_for_every_experts_kernel(family):
    """grouped_mm (the default) and the eager loop run the same experts: one profile."""
    model, view = tiny(family)
    inputs = token_batch(rows=2, length=12)[0]
    eager = flops.profile(model, view).step_flops(inputs)
    model.set_experts_implementation("grouped_mm")
    assert flops.profile(model, view).step_flops(inputs) == eager


def test_moe_upcycled_dense_model_matches_the_flop_counter():
    """A Llama whose FFNs became Mixtral blocks mid-run (its class stays LlamaForCausalLM) counts
    like a native Mixtral: router and top-k experts, exactly."""
    from engine.ops.params import UpcycleParams

    model, view = tiny("llama")
    dense = flops.profile(model, view).forward_flops(token_batch(rows=2, length=12)[0])
    grow(model, view, UpcycleParams(experts=4, top_k=2, init="noise"), freeze="none")
    assert type(model).__name__ == "LlamaForCausalLM" and view.moe is not None
    inputs, targets = token_batch(rows=2, length=12)
    check(model, view, inputs, targets)
    assert flops.profile(model, view).forward_flops(inputs) > dense   # two experts per token, and a router
