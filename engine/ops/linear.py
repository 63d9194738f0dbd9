"""Operators on single Linear layers: widen_mlp (hidden layers of an nn.Sequential), concat_linear
(the layer-widening proposal's strategy 1, dimension expansion) and parallel_linear (strategy 2,
frozen W plus a full-rank delta).

The modules put in a Linear's place keep the original Linear untouched (so it can stay frozen)
and hold the new tensors beside it:

- ``ConcatLinear``      cat([W x, E x]): `size` new output features from a trainable Linear E.
- ``WiderInputLinear``  W x[:n] + X x[n:]: reads `size` new input features through new columns X.
- ``ParallelLinear``    W x + D x: a delta D of W's shape.

Each computes what one plain Linear would (GPT-2 Conv1D layout respected); they nest, and
``materialize()`` returns that plain module, so an export holds only standard layers (the
protocol of ``engine.ops.registry``).

Each has an ``active`` switch (default True; task-specific modules, ``engine.grow.task_modules``):
inactive, the new tensors contribute nothing — ConcatLinear's new features are zeros (the width
stays, so the reader's slicing holds), WiderInputLinear ignores its new input features,
ParallelLinear computes W x. ``linear_tensors`` (hence ``materialize``) follows: the Linear the
module computes now.

Which Linear reads a grown one is architecture data, never a guess: a transformer FFN's up (and
gate, grown together) is read by down; Linear i of an nn.Sequential by Linear i+1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from engine.model.view import get_submodule
from engine.ops.health import NewUnits
from engine.ops.params import (
    ConcatLinearParams,
    LinearOpParams,
    ParallelLinearParams,
    WidenMLPParams,
    concat_consumer_message,
)
from engine.ops.registry import OpResult
from engine.ops.width import (
    _linear_weight,
    _make_linear,
    _new_unit_weights,
    grow_units_inplace,
    preserving_init,
    shapes_only,
    value_std,
)

# ---------------------------------------------------------------------------------------------
# modules standing for one plain Linear


class LinearStandIn(nn.Module):
    """A module that computes what one plain Linear (or GPT-2 Conv1D) would; the original module
    is ``base``. ``linear_tensors()`` gives that Linear's weight (Linear layout [out, in]) and bias.
    ``weight`` / ``bias`` read them detached, in the original module's layout, for code that only
    inspects them (T5 casts its input to ``wo.weight.dtype``; an in-place widening reads them and
    so merges this module into its wider matrices)."""

    base: nn.Module
    active: bool = True  # False: the new tensors are switched off (see the module docstring)

    def linear_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        weight, _ = self.linear_tensors()
        return weight.T if is_conv1d(self) else weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear_tensors()[1]

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        weight, bias = self.linear_tensors()
        return _make_linear(weight, bias, innermost(self), is_conv1d(self))


def innermost(module: nn.Module) -> nn.Module:
    """The original plain Linear/Conv1D under any stand-in modules."""
    while isinstance(module, LinearStandIn):
        module = module.base
    return module


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(innermost(module), Conv1D)


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D, LinearStandIn))


@torch.no_grad()
def linear_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias or None) of the plain Linear that `module` computes, detached."""
    if isinstance(module, LinearStandIn):
        return module.linear_tensors()
    bias = getattr(module, "bias", None)
    return _linear_weight(module, is_conv1d(module)), bias.detach() if bias is not None else None


class ConcatLinear(LinearStandIn):
    """cat([base(x), expansion(x)]): `base` keeps its weights; the expansion's outputs are new."""

    def __init__(self, base: nn.Module, expansion: nn.Linear):
        super().__init__()
        self.base = base
        self.expansion = expansion

    def forward(self, x):
        out = self.base(x)
        if not self.active:  # the width stays: the reader slices by it
            return torch.cat([out, out.new_zeros(*out.shape[:-1], self.expansion.out_features)], dim=-1)
        return torch.cat([out, self.expansion(x)], dim=-1)

    @torch.no_grad()
    def linear_tensors(self):
        weight, bias = linear_tensors(self.base)
        new_weight, new_bias = self.expansion.weight.detach(), self.expansion.bias
        if not self.active:
            new_weight = torch.zeros_like(new_weight)
            new_bias = torch.zeros_like(new_bias) if new_bias is not None else None
        if bias is not None or new_bias is not None:
            bias = torch.cat([bias if bias is not None else weight.new_zeros(weight.shape[0]),
                              new_bias.detach() if new_bias is not None else weight.new_zeros(new_weight.shape[0])])
        return torch.cat([weight, new_weight.to(weight.dtype)]), bias

    def extra_repr(self) -> str:
        return f"new_out_features={self.expansion.out_features}" + ("" if self.active else ", active=False")


class WiderInputLinear(LinearStandIn):
    """base(x[..., :n]) + x[..., n:] @ extra.T: reads `size` more input features, through new
    columns `extra` ([out, size], Linear layout)."""

    def __init__(self, base: nn.Module, extra: nn.Parameter):
        super().__init__()
        self.base = base
        self.extra = extra

    def forward(self, x):
        n = x.shape[-1] - self.extra.shape[1]
        if not self.active:
            return self.base(x[..., :n])
        return self.base(x[..., :n]) + F.linear(x[..., n:], self.extra)

    @torch.no_grad()
    def linear_tensors(self):
        weight, bias = linear_tensors(self.base)
        extra = self.extra.detach().to(weight.dtype)
        return torch.cat([weight, extra if self.active else torch.zeros_like(extra)], dim=1), bias

    def extra_repr(self) -> str:
        return f"new_in_features={self.extra.shape[1]}" + ("" if self.active else ", active=False")


class ParallelLinear(LinearStandIn):
    """base(x) + x @ delta.T: the original (frozen-able) plus a full-rank trainable delta."""

    def __init__(self, base: nn.Module, delta: nn.Parameter):
        super().__init__()
        self.base = base
        self.delta = delta  # Linear layout [out, in]

    def forward(self, x):
        if not self.active:
            return self.base(x)
        return self.base(x) + F.linear(x, self.delta)

    @torch.no_grad()
    def linear_tensors(self):
        weight, bias = linear_tensors(self.base)
        if not self.active:
            return weight, bias
        return weight + self.delta.detach().to(weight.dtype), bias

    def extra_repr(self) -> str:
        return f"delta={tuple(self.delta.shape)}" + ("" if self.active else ", active=False")


# ---------------------------------------------------------------------------------------------
# where the named Linears are


@dataclass
class Slot:
    """One Linear of the model: read it, put a module in its place."""

    get: Callable[[], nn.Module]
    put: Callable[[nn.Module], None]


def _sequential_slot(view, index: int) -> Slot:
    if not 0 <= index < view.num_linears:
        raise ValueError(f"modules: Linear {index} out of range — this MLP has {view.num_linears} Linears "
                         f"(0..{view.num_linears - 1})")
    return Slot(lambda: view.linear(index), lambda m: view.set_linear(index, m))


def _path_slot(view, path: str) -> Slot:
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(view.model, parent_path)
    return Slot(lambda: getattr(parent, attr), lambda m: setattr(parent, attr, m))


def _check_request(view, params: LinearOpParams) -> None:
    """The names must fit the model kind (params.model_problems), and `layers` must exist."""
    for field, message in params.model_problems(view.family):
        raise ValueError(f"{field}: {message}")
    if view.family.kind == "mlp":
        if params.layers != "all":
            raise ValueError("layers: an nn.Sequential has no blocks — name its Linears by index in modules "
                             "and leave layers out")
        return
    params.layer_indices(view.num_layers)  # a block out of range: its one-line ValueError


def _block_path(view, layer: int, name: str) -> str:
    """Dotted path (from the model root) of the Linear `name` (a role, or a dotted path inside the
    block) in block `layer`; wrappers keeping the original module as `.base` (a parallel-widened
    FFN) are looked through. ValueError naming it if it is missing or not a Linear."""
    from engine.ops.adapters import block_target

    path = block_target(view, layer, name)
    module = get_submodule(view.model, path)
    if not is_linear(module):
        # a PEFT layer keeps the Linear it adapts as base_layer
        hint = " (an adapter wraps it: apply this op before the adapter)" if hasattr(module, "base_layer") else ""
        raise ValueError(f"modules: '{name}' in layer {layer} ({path}) is a {type(module).__name__}, not a plain "
                         f"Linear{hint} — name a Linear projection")
    return path


def _targets(view, params: LinearOpParams) -> list[Slot]:
    """A slot for every Linear `params.modules` names (in every chosen layer), each once."""
    if view.family.kind == "mlp":
        return [_sequential_slot(view, index) for index in params.modules]
    paths = {_block_path(view, layer, name): None
             for layer in params.layer_indices(view.num_layers) for name in params.modules}
    return [_path_slot(view, path) for path in paths]  # fused q/k/v name one module: once


def _producers_and_consumers(view, params: ConcatLinearParams) -> list[tuple[list[Slot], Slot]]:
    """For each target: the Linears whose outputs grow together (a gated FFN's up and gate), and
    the one Linear that reads those outputs. Targets without such a reader are refused by name."""
    if view.family.kind == "mlp":
        pairs = []
        for index in params.modules:
            producer = _sequential_slot(view, index)
            if index == view.num_linears - 1:
                raise ValueError(f"modules: Linear {index} is the MLP's output layer — nothing reads its outputs; "
                                 f"choose a hidden Linear (0..{view.num_linears - 2})")
            view.check_hidden_layer(index, "modules")  # only elementwise modules on the way to the reader
            pairs.append(([producer], _sequential_slot(view, index + 1)))
        return pairs
    ffn = view.family.ffn
    producer_roles = [role for role in ConcatLinearParams.PRODUCER_ROLES if getattr(ffn, role)]
    pairs = []
    for layer in params.layer_indices(view.num_layers):
        producers = [_block_path(view, layer, role) for role in producer_roles]
        for name in params.modules:
            path = _block_path(view, layer, name)
            if path not in producers:
                raise ValueError("modules: " + concat_consumer_message(name, f"layer {layer}: {path}"))
        # up and gate multiply elementwise: they grow together, once per layer
        pairs.append(([_path_slot(view, p) for p in producers], _path_slot(view, _block_path(view, layer, "down"))))
    return pairs


# ---------------------------------------------------------------------------------------------
# operators


def widen_mlp(view, params: WidenMLPParams, gen: torch.Generator) -> OpResult:
    """Add `params.size` units to each chosen hidden layer (the init's weights from widen_ffn's
    maths); parallel: beside the Linears, in place: wider Linears."""
    result = OpResult(exact=preserving_init(params))
    merged = []
    layers = list(range(view.num_layers)) if params.layers == "all" else params.layers
    for layer in layers:  # every layer checked before any changes (the MLP's own words for its layers)
        view.check_hidden_layer(layer)
    for layer in layers:
        up, down = view.linear(layer), view.linear(layer + 1)
        up_w, up_b = linear_tensors(up)
        down_w, _ = linear_tensors(down)
        new = _new_unit_weights(params, up_w, up_b, down_w, None, gen)
        if params.mode == "parallel":
            new_up, new_b, new_down = new.new_up, new.new_b, new.new_down
            expansion = _make_linear(new_up, new_b, innermost(up), conv1d=False)
            reader = _new_columns(new_down, innermost(down))
            view.set_linear(layer, ConcatLinear(up, expansion))
            view.set_linear(layer + 1, WiderInputLinear(down, reader))
            result.new_params.extend([*expansion.parameters(), reader])
            result.units.append(NewUnits(up=expansion.weight, down=reader, rows=torch.arange(params.size)))
            continue
        merged += [f"Linear {i}" for i, m in ((layer, up), (layer + 1, down)) if isinstance(m, LinearStandIn)]
        wide = grow_units_inplace(up, down, None, False, params.size, new)
        view.set_linear(layer, wide.up)
        view.set_linear(layer + 1, wide.down)
        result.grown.extend(wide.grown)
        result.splits.extend(wide.splits)  # splitting inits: the optimizer state follows (engine.grow.growth)
        result.units.append(wide.units)
    if merged:
        result.note = (f"{', '.join(dict.fromkeys(merged))} held tensors added before (a parallel path); growing "
                       "in place merged them into the wider matrices")
    return result


def _new_columns(values: torch.Tensor, like: nn.Module) -> nn.Parameter:
    return nn.Parameter(values.to(like.weight.device, like.weight.dtype).contiguous())


def concat_linear(view, params: ConcatLinearParams, gen: torch.Generator) -> OpResult:
    """Each target Linear gains `size` output features from a random trainable expansion; the
    Linear reading them gets `size` zero input columns: exact, and the columns get a gradient."""
    _check_request(view, params)
    result = OpResult(exact=True, note="the reading Linears get zero input columns for the new features")
    for producers, consumer in _producers_and_consumers(view, params):
        expansions = []
        for slot in producers:
            base = slot.get()
            weight, bias = linear_tensors(base)
            std = params.init_std or value_std(weight)
            with shapes_only(weight):
                new_weight = torch.randn(params.size, weight.shape[1], generator=gen) * std
                new_bias = torch.zeros(params.size) if bias is not None else None
            expansion = _make_linear(new_weight, new_bias, innermost(base), conv1d=False)
            slot.put(ConcatLinear(base, expansion))
            expansions.append(expansion)
            result.new_params.extend(expansion.parameters())
        base = consumer.get()
        weight = linear_tensors(base)[0]
        with shapes_only(weight):
            reader = _new_columns(torch.zeros(weight.shape[0], params.size), innermost(base))
        consumer.put(WiderInputLinear(base, reader))
        result.new_params.append(reader)
        result.units.append(NewUnits(up=expansions[0].weight, down=reader, rows=torch.arange(params.size)))
    return result


def parallel_linear(view, params: ParallelLinearParams, gen: torch.Generator) -> OpResult:
    """Each target Linear becomes W x + D x with D of W's shape: zeros (exact) or random (not)."""
    _check_request(view, params)
    result = OpResult(exact=params.init == "zeros")
    for slot in _targets(view, params):
        base = slot.get()
        weight = linear_tensors(base)[0]
        with shapes_only(weight):
            values = torch.zeros(weight.shape) if params.init == "zeros" else \
                torch.randn(weight.shape, generator=gen) * params.std
        delta = _new_columns(values, innermost(base))
        slot.put(ParallelLinear(base, delta))
        result.new_params.append(delta)
    return result
