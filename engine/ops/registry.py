"""Expansion operators: one function per op name over the architecture view, registered here.

An operator changes the live model in place and returns an ``OpResult`` naming what it added, so
freezing policies ("only what this stage added trains") and reports need no knowledge of the op.
Export protocol: a module an operator inserts that is not a plain Hugging Face module (a
parallel path, a virtual layer, an adapter wrapper) has a method ``materialize(self) -> nn.Module``
returning a plain module with the same function and its own tensors (wider matrices, a real copy);
``engine.exports.hf_directory`` replaces every such module, innermost first, then updates the config.

Every op is described once, on its parameter schema in ``engine.ops.params`` (torch-free; the
plan checker imports only that): its descriptor (``OPS[name]``) names the implementation by
dotted path ("engine.ops.width:widen_ffn"), imported here when the op is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.ops.params import OPS, OpParams


@dataclass
class Split:
    """Units replicated along one axis of a grown tensor (Net2WiderNet-style splitting): slot i
    along `dim` of `param` holds old index `source[i]` (an old slot holds itself), its value
    divided by `divisor[i]`; at the same function its gradient is `grad_scale[i]` times the
    source's. A replicated unit's incoming weights: divisor 1, grad_scale 1/copies (each copy's
    output is read through 1/copies of the outgoing weight); its outgoing weights: divisor copies,
    grad_scale 1. ``engine.grow.growth.carry_optimizer_state`` grows the optimizer state with it."""

    param: torch.nn.Parameter
    dim: int
    source: torch.Tensor       # long, [size of `param` along `dim`]
    divisor: torch.Tensor      # float, same length
    grad_scale: torch.Tensor   # float, same length


@dataclass
class Placement:
    """Entries of a new tensor that hold an old tensor's values under another name or shape (an
    upcycled FFN: expert e's rows of the fused gate_up tensor are the dense gate's and up's):
    ``param[index]`` holds ``source[source_index]``, `source` named as the model named it before
    the operator. ``engine.grow.growth.carry_optimizer_state`` places the source's moments there
    (the tensor's other entries start at zero moments)."""

    param: torch.nn.Parameter
    index: tuple
    source: str
    source_index: tuple = ()


@dataclass
class OpResult:
    """What an operator did to the model."""

    new_params: list[torch.nn.Parameter] = field(default_factory=list)
    # Existing tensors that grew: only the entries where the mask is True are new (and trainable
    # under freeze = "base"); the rest keep the original values.
    grown: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    exact: bool = True          # preserves the function by construction (measured anyway)
    note: str = ""
    config_changes: dict = field(default_factory=dict)
    units: list = field(default_factory=list)  # engine.ops.health.NewUnits per widened layer
    # tensors whose entries copy (split) old units: how each entry derives from the old tensor
    splits: list[Split] = field(default_factory=list)
    # new tensors that are real copies of a live one, (copy, source): a real repeat of a block
    # (map_layers). The optimizer state follows the weights: the copy starts with its source's
    # moments and step (Staged Training's rule for depth), engine.grow.growth.carry_optimizer_state
    copies: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = field(default_factory=list)
    # new tensors holding old tensors' values elsewhere (see Placement)
    placements: list[Placement] = field(default_factory=list)


Operator = Callable[..., OpResult]


def implementation(op: str) -> Operator:
    """`fn(view, params, generator) -> OpResult` applying `op`, imported from its descriptor's dotted
    path (KeyError for an op without a descriptor)."""
    return OPS[op].load()


def implementations() -> dict[str, Operator]:
    """Every registered op's implementation (imports every implementing module)."""
    return {name: descriptor.load() for name, descriptor in OPS.items()}


def apply_operator(view, params: OpParams, generator: torch.Generator) -> OpResult:
    """Apply the op; on models with several stacks (T5), once per chosen stack (`params.stack`, or
    every stack), the results merged (exact only if exact on every stack); the config copies the
    stack modules keep follow the changes."""
    operator_fn = implementation(params.op)
    _check_model_kind(view, params)
    view.check_applies(params.op)  # the family's own refusals (ArchFamily.refused_ops), one line each
    stacks = view.stacks(params.stack)
    if len(stacks) == 1 and getattr(stacks[0], "stack", None) is None:  # one stack of blocks
        return operator_fn(stacks[0], params, generator)
    merged = OpResult()
    notes = []
    for stack_view in stacks:
        result = operator_fn(stack_view, params, generator)
        merged.new_params += result.new_params
        merged.grown += result.grown
        merged.units += result.units
        merged.splits += result.splits
        merged.placements += result.placements
        merged.config_changes.update(result.config_changes)
        merged.exact = merged.exact and result.exact
        if result.note:
            notes.append(f"{stack_view.stack}: {result.note}")
    merged.note = "; ".join(notes)
    merged.config_changes.update(view.depth_followers())
    view.update_stack_configs(merged.config_changes)
    return merged


def _check_model_kind(view, params: OpParams) -> None:
    """One clear error for an op on a kind of model it does not apply to (``model_kinds``)."""
    kind = view.family.kind
    if kind in type(params).model_kinds:
        return
    own = params.model_problems(view.family) if hasattr(params, "model_problems") else []
    if own:  # the op's own wording (e.g. "use widen_ffn")
        field, message = own[0]
        raise ValueError(f"{field}: {message}")
    fitting = [name for name, descriptor in OPS.items() if kind in descriptor.model_kinds]
    models = view.family.name + (f" ({kind})" if kind != view.family.name else "")
    raise ValueError(f"op: {params.op} does not apply to {models} models — ops that do: {', '.join(fitting)}")
