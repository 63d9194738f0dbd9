"""Operators on single Linear layers: widen_mlp (nn.Sequential hidden layers), concat_linear
(dimension expansion) and parallel_linear (frozen W plus a full-rank delta).

They follow the layer-widening proposal's strategies 1 and 2 and the on-the-fly-expansion note's
small MLPs. The inserted modules keep the original Linear untouched and frozen-able; each has a
``materialize()`` returning one plain Linear with the same function, for export.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.ops.params import ConcatLinearParams, ParallelLinearParams, WidenMLPParams
from engine.ops.registry import OpResult, operator
from engine.ops.width import _linear_weight, _make_linear, _new_unit_weights, grow_units_inplace, preserving_init


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(plain(module), Conv1D)


def plain(module: nn.Module) -> nn.Module:
    """The plain Linear/Conv1D a (possibly wrapped) module computes: the wrappers here nest."""
    return module.materialize() if hasattr(module, "materialize") else module


def _weight(module: nn.Module) -> torch.Tensor:
    """The module's effective weight, Linear layout."""
    module = plain(module)
    return _linear_weight(module, _is_conv1d(module))


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(plain(module), "bias", None)
    return bias.detach().float() if bias is not None else None


class ConcatLinear(nn.Module):
    """cat([base(x), expansion(x)]): `base` keeps its weights; the expansion's outputs are new."""

    def __init__(self, base: nn.Module, expansion: nn.Linear):
        super().__init__()
        self.base = base
        self.expansion = expansion

    def forward(self, x):
        return torch.cat([self.base(x), self.expansion(x)], dim=-1)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        conv1d = _is_conv1d(self.base)
        weight = torch.cat([_weight(self.base).float(), self.expansion.weight.float()])
        bias = None
        if _bias(self.base) is not None or self.expansion.bias is not None:
            new_bias = _bias(self.expansion) if self.expansion.bias is not None else torch.zeros(self.expansion.out_features)
            old_bias = _bias(self.base) if _bias(self.base) is not None else torch.zeros(weight.shape[0] - new_bias.numel())
            bias = torch.cat([old_bias, new_bias.to(old_bias.device)])
        return _make_linear(weight, bias, plain(self.base), conv1d)


class WiderInputLinear(nn.Module):
    """base(x[..., :n]) + x[..., n:] @ extra.T: reads `size` more input features (zero at first)."""

    def __init__(self, base: nn.Module, extra: nn.Parameter):
        super().__init__()
        self.base = base
        self.extra = extra  # [out, size], Linear layout

    def forward(self, x):
        n = x.shape[-1] - self.extra.shape[1]
        return self.base(x[..., :n]) + F.linear(x[..., n:], self.extra)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        conv1d = _is_conv1d(self.base)
        weight = torch.cat([_weight(self.base).float(), self.extra.detach().float()], dim=1)
        return _make_linear(weight, _bias(self.base), plain(self.base), conv1d)


class ParallelLinear(nn.Module):
    """base(x) + x @ delta.T: a frozen-able original plus a full-rank trainable delta."""

    def __init__(self, base: nn.Module, delta: nn.Parameter):
        super().__init__()
        self.base = base
        self.delta = delta  # Linear layout [out, in]

    def forward(self, x):
        return self.base(x) + F.linear(x, self.delta)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        conv1d = _is_conv1d(self.base)
        weight = _weight(self.base).float() + self.delta.detach().float()
        return _make_linear(weight, _bias(self.base), plain(self.base), conv1d)


# ---------------------------------------------------------------------------------------------
# where the Linears are: (getter, setter) pairs, from the family description or the Sequential


def _mlp_only(view, op: str) -> None:
    if view.family.kind != "mlp":
        raise ValueError(f"{op} works on nn.Sequential MLPs — on a {view.family.name} model use widen_ffn")


def _sequential_slot(view, index) -> tuple:
    if not isinstance(index, int) or not 0 <= index < view.num_linears:
        raise ValueError(f"modules: {index!r} is not a Linear index of this MLP (0..{view.num_linears - 1})")
    return (lambda: view.linear(index)), (lambda m: view.set_linear(index, m)), f"linear {index}"


def _attribute_slot(parent: nn.Module, name: str, label: str) -> tuple:
    return (lambda: getattr(parent, name)), (lambda m: setattr(parent, name, m)), label


def _resolve_linears(view, params) -> list[tuple]:
    """(get, set, label) for every module `params.modules` names in the chosen layers."""
    if view.family.kind == "mlp":
        return [_sequential_slot(view, index) for index in params.modules]
    from engine.arch import get_submodule
    from engine.ops.adapters import role_module_names
    from engine.ops.params import ADAPTER_ROLES

    unknown = [m for m in params.modules if m not in ADAPTER_ROLES]
    if unknown:
        raise ValueError(f"modules: {unknown} — on transformer blocks name roles: {', '.join(ADAPTER_ROLES)}")
    slots = []
    for path in role_module_names(view, params.layer_indices(view.num_layers), list(params.modules)):
        parent_path, _, name = path.rpartition(".")
        slots.append(_attribute_slot(get_submodule(view.model, parent_path), name, path))
    return slots


def _producer_consumers(view, params: ConcatLinearParams) -> list[tuple[list[tuple], tuple]]:
    """For each target: the producers whose outputs grow together (up, and gate when gated) and
    the consumer that reads them. Consumers come from data: the FFN layout or the next Linear."""
    if view.family.kind == "mlp":
        pairs = []
        for index in params.modules:
            if isinstance(index, int) and index == view.num_linears - 1:
                raise ValueError(f"modules: linear {index} is the MLP's output layer — nothing consumes "
                                 "its outputs; choose a hidden Linear (0..{})".format(view.num_linears - 2))
            pairs.append(([_sequential_slot(view, index)], _sequential_slot(view, index + 1)))
        return pairs
    if list(params.modules) != ["up"]:
        raise ValueError(f"modules: {params.modules} — concat_linear on transformer blocks grows the FFN's "
                         "\"up\" projection (its consumer is \"down\"); attention widths change with add_heads")
    from engine.ops.width import _innermost

    layout = view.family.ffn
    pairs = []
    for layer in params.layer_indices(view.num_layers):
        inner = _innermost(view.ffn(layer))
        producers = [_attribute_slot(inner, layout.up, f"layer {layer} {layout.up}")]
        if layout.gate:
            producers.append(_attribute_slot(inner, layout.gate, f"layer {layer} {layout.gate}"))
        pairs.append((producers, _attribute_slot(inner, layout.down, f"layer {layer} {layout.down}")))
    return pairs


# ---------------------------------------------------------------------------------------------
# operators


@operator("widen_mlp")
def widen_mlp(view, params: WidenMLPParams, gen: torch.Generator) -> OpResult:
    _mlp_only(view, "widen_mlp")
    result = OpResult(exact=preserving_init(params))
    for layer in params.layer_indices(view.num_layers):
        if not 0 <= layer < view.num_layers:
            raise ValueError(f"layers: {layer} out of range — the MLP has {view.num_layers} hidden layers")
        up, down = view.linear(layer), view.linear(layer + 1)
        new = _new_unit_weights(params, up.weight.detach(), _bias(up), down.weight.detach(), None, gen)
        wide = grow_units_inplace(up, down, None, False, params.size, new)
        view.set_linear(layer, wide.up)
        view.set_linear(layer + 1, wide.down)
        result.grown.extend(wide.grown)
        result.units.append(wide.units)
    return result


@operator("concat_linear")
def concat_linear(view, params: ConcatLinearParams, gen: torch.Generator) -> OpResult:
    result = OpResult(exact=True, note="consumers read the new features through zero-initialised columns")
    for producers, (get_consumer, set_consumer, _) in _producer_consumers(view, params):
        expansions = []
        for get, set_, _ in producers:
            base = get()
            weight = _weight(base)
            std = params.init_std or float(weight.float().std())
            expansion = nn.Linear(weight.shape[1], params.size, bias=_bias(base) is not None,
                                  device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                expansion.weight.copy_(torch.randn(params.size, weight.shape[1], generator=gen) * std)
                if expansion.bias is not None:
                    expansion.bias.zero_()
            set_(ConcatLinear(base, expansion))
            expansions.append(expansion)
            result.new_params.extend(expansion.parameters())
        consumer = get_consumer()
        consumer_weight = _weight(consumer)
        extra = nn.Parameter(torch.zeros(consumer_weight.shape[0], params.size, device=consumer_weight.device,
                                         dtype=consumer_weight.dtype))
        set_consumer(WiderInputLinear(consumer, extra))
        result.new_params.append(extra)
        from engine.health import NewUnits

        result.units.append(NewUnits(up=expansions[0].weight, down=extra, rows=torch.arange(params.size)))
    return result


@operator("parallel_linear")
def parallel_linear(view, params: ParallelLinearParams, gen: torch.Generator) -> OpResult:
    result = OpResult(exact=params.init == "zeros")
    for get, set_, _ in _resolve_linears(view, params):
        base = get()
        weight = _weight(base)
        values = (torch.zeros(weight.shape) if params.init == "zeros"
                  else torch.randn(weight.shape, generator=gen) * params.std)
        delta = nn.Parameter(values.to(weight.device, weight.dtype))
        set_(ParallelLinear(base, delta))
        result.new_params.append(delta)
    return result
