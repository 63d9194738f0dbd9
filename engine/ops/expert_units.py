"""The hidden units of fused experts: how transformers 5 lays them out, and the parallel path.

transformers 5 keeps a sparse block's experts in 3-D tensors (engine.model.families.MoELayout):
gate_up [experts, 2·I, hidden] (rows [gate | up]) and down [experts, hidden, I]; GPT-OSS stores
them transposed, gate and up interleaved, with biases. ``read_experts`` gives them as per-expert
matrices in Linear layout (gate, up [E, I, H], down [E, H, I]) and ``write_experts`` stores them
back, so the dense FFN's maths (engine.ops.width: inits, symmetry breaking, splits) applies to
every expert unchanged (engine.ops.width.widen_experts).

``ExpertsWithNewUnits`` is widen_ffn's `mode = "parallel"` on experts: a second experts module of
the same class beside the original, holding only the new units and routed by the same top-k, so
the family's own expert code computes both, whatever its activation (GPT-OSS's clamped SwiGLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ExpertWeights:
    """One experts module's weights in Linear layout: gate, up [E, I, H], down [E, H, I]; the
    biases [E, I] / [E, H] where the family has them (GPT-OSS)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_b: torch.Tensor | None = None
    up_b: torch.Tensor | None = None
    down_b: torch.Tensor | None = None

    @property
    def units(self) -> int:
        return self.up.shape[1]


def expert_param(module: nn.Module, path: str | None):
    """The tensor at `path` (MoELayout, relative to the MoE block) of an experts module."""
    if path is None:
        return None
    return getattr(module, path.rpartition(".")[2])


def read_experts(experts: nn.Module, moe) -> ExpertWeights:
    """The weights of a (plain) experts module, detached, in Linear layout."""
    gate_up = expert_param(experts, moe.gate_up).detach()
    down = expert_param(experts, moe.down).detach()
    if moe.transposed:  # [E, in, out] -> [E, out, in]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate, up = _halves(gate_up, moe.gate_up_interleaved, dim=1)
    bias = expert_param(experts, moe.gate_up_bias)
    gate_b, up_b = _halves(bias.detach(), moe.gate_up_interleaved, dim=1) if bias is not None else (None, None)
    down_b = expert_param(experts, moe.down_bias)
    return ExpertWeights(gate, up, down, gate_b, up_b, down_b.detach() if down_b is not None else None)


def _halves(t: torch.Tensor, interleaved: bool, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up units of a fused tensor: its two halves, or its even and odd entries."""
    if interleaved:
        index = torch.arange(t.shape[dim], device="cpu")
        return t.index_select(dim, index[0::2].to(t.device)), t.index_select(dim, index[1::2].to(t.device))
    return t.chunk(2, dim=dim)


def _fuse(gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """[gate | up] along dim 1, or gate and up entries alternating (GPT-OSS)."""
    if interleaved:
        return torch.stack([gate, up], dim=2).flatten(1, 2)
    return torch.cat([gate, up], dim=1)


def write_experts(experts: nn.Module, moe, weights: ExpertWeights) -> dict[str, nn.Parameter]:
    """Store `weights` as the experts module's Parameters (new tensors, in the family's layout;
    requires_grad as before) and its cached size; returns path suffix -> the new Parameter."""
    gate_up = _fuse(weights.gate, weights.up, moe.gate_up_interleaved)
    down = weights.down
    if moe.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    values = {moe.gate_up: gate_up, moe.down: down}
    if moe.gate_up_bias and weights.gate_b is not None:
        values[moe.gate_up_bias] = _fuse(weights.gate_b, weights.up_b, moe.gate_up_interleaved)
    made = {}
    for path, value in values.items():
        name = path.rpartition(".")[2]
        old = getattr(experts, name)
        made[path] = nn.Parameter(value.contiguous().to(old.device, old.dtype), requires_grad=old.requires_grad)
        setattr(experts, name, made[path])
    setattr(experts, moe.expert_size_attr, weights.units)
    return made


def unit_dims(moe) -> tuple[int, int]:
    """The unit axis of the stored gate_up and down tensors."""
    return (2, 1) if moe.transposed else (1, 2)


def gate_up_positions(moe, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where unit j's gate and up entries sit along gate_up's unit axis (`units` in all)."""
    j = torch.arange(units)
    return (2 * j, 2 * j + 1) if moe.gate_up_interleaved else (j, units + j)


class ExpertsWithNewUnits(nn.Module):
    """A block's experts plus `new`, a second experts module of the same class holding only the
    new units: base(x, top-k) + new(x, top-k), both routed by the block's one router.

    ``active`` False switches the new units off (task-specific modules); ``materialize`` (export)
    appends them to the base's tensors, nested paths first."""

    active: bool = True

    def __init__(self, base: nn.Module, new: nn.Module, moe):
        super().__init__()
        self.base = base
        self.new = new
        self.moe = moe

    def forward(self, hidden_states, *args, **kwargs):
        out = self.base(hidden_states, *args, **kwargs)
        return out + self.new(hidden_states, *args, **kwargs) if self.active else out

    def extra_repr(self) -> str:
        return "" if self.active else "active=False"

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        base = self.base.materialize() if hasattr(self.base, "materialize") else self.base
        if not self.active:
            return base
        old, new = read_experts(base, self.moe), read_experts(self.new, self.moe)
        write_experts(base, self.moe, ExpertWeights(
            torch.cat([old.gate, new.gate.to(old.gate)], 1), torch.cat([old.up, new.up.to(old.up)], 1),
            torch.cat([old.down, new.down.to(old.down)], 2),
            *((torch.cat([old.gate_b, new.gate_b.to(old.gate_b)], 1), torch.cat([old.up_b, new.up_b.to(old.up_b)], 1))
              if old.gate_b is not None else (None, None))))
        return base


def innermost_experts(module: nn.Module) -> nn.Module:
    """The plain experts module inside parallel new units; ValueError where a LoRA adapter wraps it
    (its tensors then sit on the adapter's base_layer, with a low-rank delta sized to them)."""
    while isinstance(module, ExpertsWithNewUnits):
        module = module.base
    refuse_adapted_experts(module)
    return module


def refuse_adapted_experts(module: nn.Module) -> None:
    """One line for an operator that would reshape experts a PEFT adapter covers."""
    if isinstance(getattr(module, "base_layer", None), nn.Module):
        raise ValueError(f"op: the experts carry a LoRA adapter on their tensors ({type(module).__name__} "
                         f"'{module.parameter_name}'), which would not fit them grown — grow the experts before "
                         "the lora operator in the plan (export merges the adapter)")


# torch's grouped_mm (transformers' default experts kernel) needs 16-byte strides
GROUPED_MM_BYTES = 16


def grouped_mm_multiple(view) -> int | None:
    """The multiple every expert width (and d_model) must keep for the experts kernel the model
    runs: 16 bytes of its expert weights' dtype (4 in float32, 8 in bfloat16); None where it runs
    another kernel (experts_implementation "eager", "batched_mm")."""
    if getattr(view.config, "_experts_implementation", None) != "grouped_mm":
        return None
    layer = view.sparse_layers()[0] if view.sparse_layers() else None
    if layer is None:
        return None
    weight = expert_param(innermost_experts(view.experts(layer)), view.moe.gate_up)
    return max(1, GROUPED_MM_BYTES // weight.element_size())


def grouped_mm_problem(view, widths: dict[str, int]) -> str | None:
    """Why widths (what -> value) would break the grouped_mm experts kernel, or None."""
    multiple = grouped_mm_multiple(view)
    bad = [f"{what} {value}" for what, value in widths.items() if multiple and value % multiple]
    if not bad:
        return None
    return (f"size: the experts run through torch's grouped_mm, which needs widths in multiples of {multiple} "
            f"(16-byte strides) — this would make {', '.join(bad)}; use a size that keeps them multiples of {multiple}")


def check_expert_widths(view, layers: list[int], params) -> None:
    """One ValueError, before anything changes, when the new expert widths would not run."""
    for layer in layers:
        units = read_experts(innermost_experts(view.experts(layer)), view.moe).units
        problem = grouped_mm_problem(view, {"the new units' width": params.size} if params.mode == "parallel"
                                     else {"the experts' width": units + params.size})
        if problem:
            raise ValueError(problem)


def along(t: torch.Tensor, dim: int, unit_mask: torch.Tensor) -> torch.Tensor:
    """A per-unit mask broadcast over a tensor whose units lie along `dim`."""
    shape = [1] * t.ndim
    shape[dim] = -1
    mask = unit_mask.reshape(shape)
    if t.is_meta:  # the preview counts the new entries: a CPU view, no storage of the tensor's size
        return mask.cpu().expand(t.shape)
    return mask.to(t.device).expand(t.shape).clone()
