"""Depth-µP residual scaling (``[train] residual_scaling = "depth_mup"``; Yang et al. 2023,
"Tensor Programs VI", the Adam rule): every block's residual branches are read through the
multiplier α = (base / L)^½ (L: the model's depth now, base: ``residual_base_depth``, default the
depth as loaded), and each block's AdamW learning rate is α times the plan's.

The model stays a standard Hugging Face model: α is FOLDED into the tensors each branch ends
with, V = α·W (``residual_outputs``: the attention output and FFN down projections, weights and
biases; in post-norm families — OLMo-2, Gemma — the post-norms' gains, Gemma's stored as 1 + w:
(1 + v) = α·(1 + w)), and the optimizer's groups carry the rest. Why the groups below train V
exactly as AdamW(lr η_b = α·η for the block, eps ε, decoupled weight decay λ) trains W:

- the function is the same, so every other tensor P of a block gets the same gradient in both
  forms: it keeps lr α·η, eps ε and λ;
- grad_W = α·grad_V, so W's moments are m_W = α·m_V, √v_W = α·√v_V and W's step
  -αη·m_W/(√v_W + ε) = -αη·m_V/(√v_V + ε/α); V = α·W moves α times that: lr α²·η, eps ε/α;
- decoupled decay moves W by -αηλ·W, so V by -αηλ·V = -(α²η)·(λ/α)·V: weight decay λ/α;
- outside the blocks (embeddings, final norm, head): η, ε, λ as without scaling.

Gradient clipping breaks the equivalence while it bites: it scales the folded gradients, whose
norm differs from the unfolded ones'.

At a growth L -> L' the folded weights stay as they are (the unfolded blocks' W absorb α/α'),
so an exact operator (insert_identity, a new block writing zero) stays exact; only the groups
follow α'. A run whose loaded depth differs from the base starts by multiplying the branch ends
by α0 once (``fold_initial_scale``): depth-µP's initialization, which changes a trained model's
function.
"""

from __future__ import annotations

import math

import torch

from engine.errors import WidenError
from engine.grow.apply import takes_weight_decay
from engine.model.families import residual_scaling_refusal
from engine.ops.depth import residual_outputs, scale_residual_outputs

ADAM_EPS = 1e-8   # torch's AdamW default, which the plan's optimizer uses


class DepthScalingError(WidenError, ValueError):
    """``train.residual_scaling = "depth_mup"`` on a model it cannot scale."""


def multiplier(base_depth: int, depth: int) -> float:
    """α = (base_depth / depth)^½: 1 at the base depth, smaller for deeper models."""
    if base_depth < 1 or depth < 1:
        raise ValueError(f"depth scaling needs positive depths (base {base_depth}, depth {depth})")
    return math.sqrt(base_depth / depth)


def check_supported(view) -> None:
    """Refuse, in one line naming the field, a model without one stack of plain residual blocks
    (an nn.Sequential MLP, an encoder-decoder, a mixture of experts)."""
    reason = residual_scaling_refusal(view.base_family)
    if reason:
        raise DepthScalingError(f'train.residual_scaling: "depth_mup" needs plain residual blocks — {reason}; '
                                'set residual_scaling = "none"')


def depth(view) -> int:
    """The model's depth now: its blocks."""
    return len(view.blocks())


def base_depth(train, view) -> int:
    """The depth whose multiplier is 1: ``train.residual_base_depth``, else `view`'s depth (call it
    on the model as loaded, before any operator: a resume loads it again and gets the same)."""
    return train.residual_base_depth or depth(view)


def branch_ends(view) -> list[list[torch.nn.Parameter]]:
    """Per block, the tensors its residual branches end with (``engine.ops.depth.residual_outputs``,
    the tensors insert_identity zeroes): the attention output and FFN down projections' weights and
    biases (the LoRA B of an adapter on them, a parallel widening's own down projection), or a
    post-norm family's post-norm gains."""
    check_supported(view)
    return [[p for p, _ in residual_outputs(view, block)] for block in view.blocks()]


def param_groups(model, view, train, masked, base_depth: int, lr: float, eps: float = ADAM_EPS) -> list[dict]:
    """AdamW's groups under depth scaling at `view`'s depth: the parameters outside the blocks (lr
    η = `lr`, eps, ``train.weight_decay``), the blocks' branch ends (α²·η, eps/α, decay/α) and the
    blocks' other tensors (α·η, eps, decay) — each split as without scaling: no weight decay for
    tensors of ndim < 2 and for `masked` ones (ids: they train only their grown entries). Only
    tensors that require grad; no empty group; the order is fixed (that list, decayed first) and
    inside a group the tensors follow the model's order (block by block), so every rank and every
    rebuild (FSDP's shard and gather) gets the same groups. Each group holds ``lr_scale``: its lr
    over `lr`, for a schedule that sets the plan's lr again (``optim.set_learning_rate``)."""
    check_supported(view)
    alpha = multiplier(base_depth, depth(view))
    ends = {id(p) for block in branch_ends(view) for p in block}
    inside = {id(p) for block in view.blocks() for p in block.parameters()}
    wd = train.weight_decay
    roles = {"outside": (1.0, eps, wd), "end": (alpha * alpha, eps / alpha, wd / alpha), "block": (alpha, eps, wd)}
    buckets: dict[tuple[str, bool], list] = {(role, decays): [] for role in roles for decays in (True, False)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        role = "end" if id(p) in ends else "block" if id(p) in inside else "outside"
        buckets[(role, takes_weight_decay(p, masked))].append(p)
    groups = []
    for (role, decays), params in buckets.items():
        if params:
            scale, group_eps, decay = roles[role]
            groups.append({"params": params, "lr": lr * scale, "lr_scale": scale, "eps": group_eps,
                           "weight_decay": decay if decays else 0.0})
    return groups


def fold_initial_scale(model, view, base_depth: int) -> float:
    """Depth-µP's start for a model loaded at another depth than the base: its branch ends
    multiplied by α0 = (base / depth)^½ once (each tensor once, a tied one too); nothing when
    α0 = 1. Returns α0. It changes a trained model's function."""
    check_supported(view)
    alpha = multiplier(base_depth, depth(view))
    if alpha != 1.0:
        unique = {id(p): (p, offset) for block in view.blocks() for p, offset in residual_outputs(view, block)}
        scale_residual_outputs(list(unique.values()), alpha)
    return alpha
