"""Width operators: add hidden units to a transformer FFN.

New unit j gets an incoming row (up, and gate for gated MLPs) and an outgoing column (down).
The `init` decides both, and so whether the function is preserved and whether the new units can
learn (the on-the-fly-expansion note's failure modes):

- zero_out   random in, zero out: exact, and the outgoing weights get a non-zero gradient.
- zeros      zero in, zero out: exact, but every new gradient stays zero (dead units).
- constant   constant in, zero out: exact, but the units are identical and stay identical.
- random     random in, random out: not preserving.
- net2net    replicate random existing units, split their outgoing weights among the copies
             (Net2WiderNet): exact without noise; `noise` perturbs the copies' incoming weights.
- copy_halve copy distinct units once and halve the outgoing weights of both twins.

Copies have the same incoming weights, hence the same activation and — read through equal
outgoing shares — the same gradients: they stay twins (engine.ops.health measures it). `symmetry`
breaks that exactly, on the outgoing side where the copies' equal activations make any change
that sums to the source's column invisible: "split" gives the slots of a unit unequal shares
(LEMON), "noise" adds paired noise that cancels over them (HyperCloning). The incoming weights
then get different gradients and the copies diverge — with "noise" at once; with "split" barely
under Adam: the copies' incoming gradients stay proportional (share × the source's) while the
outgoing columns are, and Adam's step ignores a gradient's scale. Inside ``[stages.grow]``
"noise" is the default (``WidenFFNParams.growth_defaults``); tests/engine/grow/test_growth_triggers.py
measures both against "none".

`mode = "parallel"` keeps the original FFN untouched and adds the new units as a separate path
(frozen base, trainable extension); `mode = "inplace"` makes the matrices wider. Same function.

A sparse MoE block grows every expert by the same maths (``widen_experts``: the fused 3-D tensors
read and written through engine.ops.expert_units).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from engine.ops.expert_units import (
    ExpertsWithNewUnits,
    ExpertWeights,
    along,
    check_expert_widths,
    expert_param,
    gate_up_positions,
    innermost_experts,
    read_experts,
    unit_dims,
    write_experts,
)
from engine.ops.health import NewUnits
from engine.ops.params import WidenFFNParams
from engine.ops.registry import OpResult, Split


class FFNWithNewUnits(nn.Module):
    """An FFN plus `size` new hidden units beside it: base(x) + down(act(gate(x)) * up(x)).

    ``active`` (default True) switches the new path: when False the module computes base(x) alone
    (task-specific modules, ``engine.grow.task_modules``); ``materialize`` follows the function the
    module computes, so an inactive path is dropped rather than merged."""

    active: bool = True  # class default: modules built before the switch existed are active

    def __init__(self, base: nn.Module, act: nn.Module, up: nn.Linear, down: nn.Linear,
                 gate: nn.Linear | None = None):
        super().__init__()
        self.base = base
        self.act = act
        self.up = up
        self.gate = gate
        self.down = down

    def forward(self, x):
        if not self.active:
            return self.base(x)
        hidden = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.base(x) + self.down(hidden)

    def extra_repr(self) -> str:
        return "" if self.active else "active=False"

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """The base FFN module (same class) with wider matrices holding the new units: the
        parallel path's rows/columns are appended to up (and gate) and down; nested paths first.
        Same function (one matmul instead of two sums; differences are rounding only). An
        inactive path adds nothing to the function, so it is dropped: the base alone."""
        base = self.base.materialize() if hasattr(self.base, "materialize") else self.base
        if not self.active:
            return base
        layout = _layout_of(base)
        up, down = getattr(base, layout.up), getattr(base, layout.down)
        gate = getattr(base, layout.gate) if layout.gate else None
        if (gate is None) != (self.gate is None):
            raise ValueError(f"cannot merge a parallel path into {type(base).__name__}: gated and "
                             "ungated units do not mix")

        def bias_of(module, units):
            b = getattr(module, "bias", None)
            return b.detach().float() if b is not None else torch.zeros(units)

        def grow_in(old, new):  # rows = units, Linear layout
            old_w, new_w = _linear_weight(old, layout.conv1d).float(), new.weight.detach().float()
            has_bias = getattr(old, "bias", None) is not None or getattr(new, "bias", None) is not None
            bias = torch.cat([bias_of(old, old_w.shape[0]).to(old_w.device),
                              bias_of(new, new_w.shape[0]).to(old_w.device)]) if has_bias else None
            return _make_linear(torch.cat([old_w, new_w.to(old_w.device)]), bias, old, layout.conv1d)

        old_w, new_w = _linear_weight(down, layout.conv1d).float(), self.down.weight.detach().float()
        bias = None
        if getattr(down, "bias", None) is not None or getattr(self.down, "bias", None) is not None:
            bias = bias_of(down, old_w.shape[0]).to(old_w.device) + bias_of(self.down, old_w.shape[0]).to(old_w.device)
        wide_down = _make_linear(torch.cat([old_w, new_w.to(old_w.device)], dim=1), bias, down, layout.conv1d)
        if layout.gate_up_fused:  # [gate | up] in one module: each half grows by the new units
            old_gate, old_up = _split_fused(up)
            wide_gate, wide_up = grow_in(old_gate, self.gate), grow_in(old_up, self.up)
            setattr(base, layout.up, _fuse(wide_gate, wide_up, up))
        else:
            setattr(base, layout.up, grow_in(up, self.up))
            if gate is not None:
                setattr(base, layout.gate, grow_in(gate, self.gate))
        setattr(base, layout.down, wide_down)
        return base


def _split_fused(module: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The gate and up halves of a fused [gate | up] Linear, as two plain Linears (copies)."""
    weight = module.weight.detach()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    halves = []
    for i, w in enumerate(weight.chunk(2)):
        b = bias.chunk(2)[i] if bias is not None else None
        halves.append(_make_linear(w.float(), b.float() if b is not None else None, module, conv1d=False))
    return halves[0], halves[1]


def _fuse(gate: nn.Module, up: nn.Module, like: nn.Module) -> nn.Module:
    """One [gate | up] Linear from two halves (the layout Phi-3's MLP chunks at its midpoint)."""
    weight = torch.cat([gate.weight.detach().float(), up.weight.detach().float()])
    bias = None
    if getattr(gate, "bias", None) is not None:
        bias = torch.cat([gate.bias.detach().float(), up.bias.detach().float()])
    return _make_linear(weight, bias, like, conv1d=False)


def _layout_of(mlp: nn.Module):
    """The family FFN layout that describes this MLP module (attribute names, Conv1D or not)."""
    from transformers.pytorch_utils import Conv1D

    from engine.model.families import ffn_layouts

    # gated layouts first: a gated MLP may also carry the attribute names of an ungated one
    for layout in sorted(ffn_layouts(), key=lambda layout: layout.gate is None):
        names = [layout.up, layout.down, layout.act] + ([layout.gate] if layout.gate else [])
        if all(isinstance(getattr(mlp, n, None), nn.Module) for n in names) \
                and isinstance(getattr(mlp, layout.up), Conv1D) == layout.conv1d:
            return layout
    raise ValueError(f"no architecture description matches the FFN module {type(mlp).__name__}: "
                     "cannot merge its parallel path into wider matrices")


def _linear_weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight in nn.Linear layout [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.detach().T if conv1d else module.weight.detach()


def _new_unit_weights(params: WidenFFNParams, up_w: torch.Tensor, up_b: torch.Tensor | None,
                      down_w: torch.Tensor, gate_w: torch.Tensor | None, gen: torch.Generator,
                      source: torch.Tensor | None = None):
    """Incoming rows, biases and outgoing columns for the new units, plus the rescaled outgoing
    weights of the original units (only the splitting inits change those).

    All tensors are in Linear layout: up/gate [units, hidden], down [hidden, units]. `source`:
    the units the splitting inits copy, when already drawn (every expert of a MoE block copies
    the same ones, so one Split describes the fused tensor)."""
    with shapes_only(up_w):
        return _unit_weights(params, up_w, up_b, down_w, gate_w, gen, source)


def _unit_weights(params, up_w, up_b, down_w, gate_w, gen, source=None):
    size, units, hidden = params.size, up_w.shape[0], up_w.shape[1]
    out = down_w.shape[0]  # = hidden in a transformer FFN; an MLP layer may map elsewhere
    std_in = params.init_std or value_std(up_w)
    std_out = value_std(down_w)

    def randn(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    new_gate, shares, drawn = None, None, source
    source = None
    new_b = torch.zeros(size) if up_b is not None else None
    old_down = down_w.float().clone()
    if params.init in ("zero_out", "random"):
        new_up = randn(size, hidden, std=std_in)
        new_gate = randn(size, hidden, std=std_in) if gate_w is not None else None
        new_down = randn(out, size, std=std_out) if params.init == "random" else torch.zeros(out, size)
    elif params.init == "zeros":
        new_up = torch.zeros(size, hidden)
        new_gate = torch.zeros(size, hidden) if gate_w is not None else None
        new_down = torch.zeros(out, size)
    elif params.init == "constant":
        new_up = torch.full((size, hidden), params.value)
        new_gate = torch.full((size, hidden), params.value) if gate_w is not None else None
        new_down = torch.zeros(out, size)
    else:  # net2net / copy_halve: replicate existing units and split their outgoing weights
        if params.init == "copy_halve" and size > units:
            raise ValueError(f"size: copy_halve copies each unit once: size {size} > {units} units")
        if drawn is not None:
            source = drawn
        elif params.init == "copy_halve":
            source = torch.randperm(units, generator=gen, device="cpu")[:size]
        else:
            source = torch.randint(0, units, (size,), generator=gen, device="cpu")
        new_up = up_w.float()[source].clone()
        if params.noise:
            new_up += randn(size, hidden, std=params.noise * std_in)
        new_gate = gate_w.float()[source].clone() if gate_w is not None else None
        new_b = up_b.float()[source].clone() if up_b is not None else None
        shares = outgoing_shares(source, units, params.symmetry, params.symmetry_scale)
        outgoing = torch.cat([down_w.float(), down_w.float()[:, source]], dim=1)
        if params.symmetry == "split":
            outgoing = outgoing * shares.to(down_w.device)
        else:  # equal shares, divided as Net2WiderNet always was (bit for bit)
            outgoing = outgoing / (1 / shares).round().to(down_w.device)
        if params.symmetry == "noise":
            outgoing = outgoing + paired_noise(source, units, out, params.symmetry_scale * std_out, gen,
                                               outgoing.device).to(outgoing)
        old_down, new_down = outgoing[:, :units].clone(), outgoing[:, units:].clone()
        if params.symmetry != "split":
            shares = None  # equal shares: 1/copies, as the splits record by default
    return UnitWeights(new_up, new_b, new_gate, new_down, old_down, source, shares)


class UnitWeights(NamedTuple):
    """The new units' weights (Linear layout) and, for the splitting inits, which unit each new
    slot copies (`source`) and the outgoing share of every slot, old units first (`shares`;
    None: 1/copies each)."""

    new_up: torch.Tensor
    new_b: torch.Tensor | None
    new_gate: torch.Tensor | None
    new_down: torch.Tensor
    old_down: torch.Tensor
    source: torch.Tensor | None = None
    shares: torch.Tensor | None = None


def _slot_ranks(source: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot (the `units` old ones, then one per entry of `source`): the unit it holds and
    its rank among that unit's slots (the old slot 0, copies 1, 2, ... in order), on the CPU."""
    slot_source = torch.cat([torch.arange(units, device="cpu"), source.cpu()])
    ranks = torch.zeros(len(slot_source), dtype=torch.long, device="cpu")
    seen = torch.ones(units, dtype=torch.long, device="cpu")
    for i, unit in enumerate(source.tolist()):
        ranks[units + i] = seen[unit]
        seen[unit] += 1
    return slot_source, ranks


def outgoing_shares(source: torch.Tensor, units: int, symmetry: str, scale: float) -> torch.Tensor:
    """The share of its unit's outgoing weights each slot takes; a unit's shares sum to 1, so the
    sum of its slots reads what the unit did (its copies have the same activation: exact).
    "split" (LEMON's unequal fan-in split, alpha + beta = 1, alpha != beta): a unit of c slots
    gives slot r the share (1 + scale·t_r)/c, t spread over [-1, 1] (c = 2, scale 0.2: 0.6 and
    0.4); otherwise 1/c each (Net2WiderNet)."""
    slot_source, ranks = _slot_ranks(source, units)
    copies = (torch.bincount(source.cpu(), minlength=units).float() + 1)[slot_source]
    if symmetry != "split":
        return 1 / copies
    spread = torch.where(copies > 1, 2 * ranks.float() / (copies - 1).clamp_min(1) - 1, torch.zeros_like(copies))
    return (1 + scale * spread) / copies


def paired_noise(source: torch.Tensor, units: int, out: int, std: float, gen: torch.Generator,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """[out, slots] noise on the outgoing weights that sums to zero over each unit's slots
    (HyperCloning's paired noise): the copies read the same activation, so it cancels exactly.
    Std `std`/c before centring; slots of uncopied units get none."""
    slot_source, _ = _slot_ranks(source, units)
    copies = torch.bincount(source.cpu(), minlength=units).float() + 1
    noise = torch.randn(out, len(slot_source), generator=gen, device="cpu").to(device)
    slot_copies, index = copies[slot_source].to(device), slot_source.to(device)
    noise = noise * std / slot_copies  # (a preview's meta weights: a CPU draw moved to meta, shapes only)
    mean = torch.zeros(out, units, device=device).index_add_(1, index, noise) / copies.to(device)
    return noise - mean[:, index]


def _make_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module, conv1d: bool) -> nn.Module:
    """A module of the same kind as `like` holding `weight` (Linear layout) and `bias`."""
    out_features, in_features = weight.shape
    dtype, device = like.weight.dtype, like.weight.device
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(out_features, in_features)
        module.weight = nn.Parameter(weight.T.contiguous().to(device, dtype))
    else:
        module = nn.Linear(in_features, out_features, bias=bias is not None, device=device, dtype=dtype)
        module.weight = nn.Parameter(weight.contiguous().to(device, dtype))
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous().to(device, dtype))
    return module


def preserving_init(params) -> bool:
    """Whether the width init keeps the function (splitting inits only without noise)."""
    return params.init in ("zero_out", "zeros", "constant") or (
        params.init in ("net2net", "copy_halve") and params.noise == 0)


@dataclass
class WiderPair:
    """An up (and gate) / down pair grown in place, with the masks of what is new."""

    up: nn.Module
    down: nn.Module
    gate: nn.Module | None
    grown: list
    units: NewUnits
    splits: list[Split] = field(default_factory=list)  # splitting inits: which unit each slot copies


def grow_units_inplace(up: nn.Module, down: nn.Module, gate: nn.Module | None, conv1d: bool, size: int,
                       new_weights) -> WiderPair:
    """Wider copies of up (+gate) and down holding `size` new units (`new_weights` from
    ``_new_unit_weights``); only the new rows/columns are marked as grown."""
    new_up, new_b, new_gate, new_down, old_down, source, *rest = new_weights
    shares = rest[0] if rest else None
    up_w = _linear_weight(up, conv1d)
    up_b = up.bias.detach() if getattr(up, "bias", None) is not None else None
    units = up_w.shape[0]
    wide_up = _make_linear(torch.cat([up_w.float(), new_up]),
                           torch.cat([up_b.float(), new_b]) if up_b is not None else None, up, conv1d)
    wide_down = _make_linear(torch.cat([old_down, new_down], dim=1),
                             down.bias.detach().float() if getattr(down, "bias", None) is not None else None,
                             down, conv1d)
    row_mask = torch.arange(units + size) >= units
    grown = [(wide_up.weight, _mask_like(wide_up.weight, row_mask, rows=not conv1d))]
    if up_b is not None:
        grown.append((wide_up.bias, mask_on(row_mask, wide_up.bias)))
    grown.append((wide_down.weight, _mask_like(wide_down.weight, row_mask, rows=conv1d)))
    if wide_down.bias is not None:
        grown.append((wide_down.bias, mask_on(torch.zeros(wide_down.bias.shape, dtype=torch.bool), wide_down.bias)))
    wide_gate = None
    if gate is not None:
        wide_gate = _make_linear(torch.cat([_linear_weight(gate, conv1d).float(), new_gate]), None, gate, conv1d)
        grown.append((wide_gate.weight, _mask_like(wide_gate.weight, row_mask, rows=not conv1d)))
    record = NewUnits(up=wide_up.weight, down=wide_down.weight, conv1d=conv1d,
                      rows=torch.arange(units, units + size), sources=source)
    splits = []
    if source is not None:  # net2net / copy_halve: slot i copies unit slot_source[i]
        slot_source = torch.cat([torch.arange(units), source])
        if shares is None:  # equal shares
            shares = 1 / (torch.bincount(source, minlength=units).float() + 1)[slot_source]
        ones = torch.ones_like(shares)
        incoming = [(wide_up.weight, 1 if conv1d else 0)] + ([(wide_up.bias, 0)] if up_b is not None else [])
        if wide_gate is not None:
            incoming.append((wide_gate.weight, 1 if conv1d else 0))
        # a slot read through share·w gets share × the source's gradient; its outgoing value is w / (1/share)
        splits = [Split(p, dim, slot_source, ones, shares) for p, dim in incoming]
        splits.append(Split(wide_down.weight, 0 if conv1d else 1, slot_source, 1 / shares, ones))
    return WiderPair(wide_up, wide_down, wide_gate, grown, record, splits)


def widen_ffn(view, params: WidenFFNParams, gen: torch.Generator) -> OpResult:
    layout = view.family.ffn
    result = OpResult(exact=preserving_init(params))
    layers = params.layer_indices(view.num_layers)
    check_expert_widths(view, [i for i in layers if view.is_sparse(i)], params)
    expert_units = None
    for layer in layers:
        if view.is_sparse(layer):  # a MoE block: every expert gains the units
            expert_units = widen_experts(view, layer, params, gen, result)
            continue
        mlp = view.ffn(layer)
        inner = _innermost(mlp)  # the original FFN, even if it was widened in parallel before
        up, down = getattr(inner, layout.up), getattr(inner, layout.down)
        gate = getattr(inner, layout.gate) if layout.gate else None
        fused = up if layout.gate_up_fused else None
        if fused is not None:  # grow the gate and up halves as two projections, fuse them again
            gate, up = _split_fused(fused)
        up_w = _linear_weight(up, layout.conv1d)
        down_w = _linear_weight(down, layout.conv1d)
        gate_w = _linear_weight(gate, layout.conv1d) if gate is not None else None
        up_b = up.bias.detach() if getattr(up, "bias", None) is not None else None
        weights = _new_unit_weights(params, up_w, up_b, down_w, gate_w, gen)
        new_up, new_b, new_gate, new_down = weights.new_up, weights.new_b, weights.new_gate, weights.new_down

        if params.mode == "parallel":
            act = getattr(inner, layout.act)
            ext = FFNWithNewUnits(
                base=mlp, act=act,
                up=_make_linear(new_up, new_b, up, conv1d=False),
                down=_make_linear(new_down, None, down, conv1d=False),
                gate=_make_linear(new_gate, None, gate, conv1d=False) if gate is not None else None,
            )
            view.set_ffn(layer, ext)
            result.new_params.extend(p for name, p in ext.named_parameters() if not name.startswith("base."))
            result.units.append(NewUnits(up=ext.up.weight, down=ext.down.weight, rows=torch.arange(params.size)))
            continue

        # in place: wider matrices; the mask marks the new entries
        wide = grow_units_inplace(up, down, gate, layout.conv1d, params.size, weights)
        if fused is not None:
            wide = _fused_pair(wide, fused, up_w.shape[0], params.size)
        setattr(inner, layout.up, wide.up)
        setattr(inner, layout.down, wide.down)
        if gate is not None and fused is None:
            setattr(inner, layout.gate, wide.gate)
        result.grown.extend(wide.grown)
        result.units.append(wide.units)
        result.splits.extend(wide.splits)

    if params.mode == "inplace":
        if layers == list(range(view.num_layers)):
            dense = [i for i in layers if not view.is_sparse(i)]
            if dense:
                result.config_changes[view.family.ffn_size_field] = _inner_ffn_size(view, dense[0], layout)
            if expert_units is not None:
                result.config_changes[view.moe.expert_size_field] = expert_units
        else:
            result.note = "layers widened unevenly: the config's FFN size describes the unwidened layers"
    return result


# -- the experts of a sparse MoE block: every expert's units, with the dense maths above ---------
#
# The splitting inits copy the same units in every expert of a block (one draw per block), so one
# Split per fused tensor carries the optimizer state (engine.grow.growth); their noise is drawn
# per expert.


def widen_experts(view, layer: int, params, gen: torch.Generator, result: OpResult) -> int:
    """Add `params.size` units to every expert of sparse block `layer` (widen_ffn's inits, per
    expert); records what it added in `result`. Returns the experts' new intermediate size."""
    moe = view.moe
    wrapper = view.experts(layer)
    inner = innermost_experts(wrapper)
    old = read_experts(inner, moe)
    count, size = old.up.shape[0], params.size
    new_gate, new_up, new_down, old_down, new_gate_b, new_up_b = [], [], [], [], [], []
    source = shares = None
    for e in range(count):
        weights = _new_unit_weights(params, old.up[e], old.up_b[e] if old.up_b is not None else None,
                                    old.down[e], old.gate[e], gen, source)
        source, shares = weights.source, weights.shares
        new_gate.append(weights.new_gate)
        new_up.append(weights.new_up)
        new_down.append(weights.new_down)
        old_down.append(weights.old_down)
        if old.gate_b is not None:  # the gate's bias follows its rows (widen_ffn's dense maths has none)
            with shapes_only(old.gate_b):
                new_gate_b.append(old.gate_b[e].float()[source] if source is not None else torch.zeros(size))
            new_up_b.append(weights.new_b)
    stack = torch.stack
    grown = ExpertWeights(stack(new_gate), stack(new_up), stack(new_down), *(
        (stack(new_gate_b), stack(new_up_b)) if old.gate_b is not None else (None, None)))
    if params.mode == "parallel":
        _add_parallel(view, layer, wrapper, inner, grown, result)
        return old.units
    units = old.units + size
    made = write_experts(inner, moe, ExpertWeights(
        torch.cat([old.gate.float(), grown.gate], 1), torch.cat([old.up.float(), grown.up], 1),
        torch.cat([stack(old_down), grown.down], 2),
        *((torch.cat([old.gate_b.float(), grown.gate_b], 1), torch.cat([old.up_b.float(), grown.up_b], 1))
          if old.gate_b is not None else (None, None))))
    _record_inplace(moe, made, old.units, units, count, source, shares, params, result)
    return units


def _add_parallel(view, layer: int, wrapper: nn.Module, inner: nn.Module, grown: ExpertWeights,
                  result: OpResult) -> None:
    """A second experts module of the inner one's class, holding the new units only."""
    moe = view.moe
    config = copy.deepcopy(view.config)
    setattr(config, moe.expert_size_field, grown.units)
    weight = expert_param(inner, moe.gate_up)
    with torch.device("meta") if weight.is_meta else torch.device(weight.device):
        new = type(inner)(config)
    if hasattr(new, "config"):  # transformers' expert classes read the model's config at run time
        new.config = inner.config
    write_experts(new, moe, grown)
    if moe.down_bias:  # the base adds the bias once: the new units' copy is zero and does not train
        name = moe.down_bias.rpartition(".")[2]
        delattr(new, name)
        new.register_buffer(name, torch.zeros_like(expert_param(inner, moe.down_bias)), persistent=False)
    view.set_experts(layer, ExpertsWithNewUnits(wrapper, new.to(weight.dtype), moe))
    result.new_params.extend(new.parameters())
    result.units += _unit_records(moe, expert_param(new, moe.gate_up), expert_param(new, moe.down), torch.arange(grown.units),
                                  grown.up.shape[0], None)


def _record_inplace(moe, made: dict, old_units: int, units: int, count: int, source, shares, params,
                    result: OpResult) -> None:
    """The grown masks, the splits of the splitting inits and the health records."""
    gate_up, down = made[moe.gate_up], made[moe.down]
    bias = made.get(moe.gate_up_bias)
    gate_pos, up_pos = gate_up_positions(moe, units)
    new_unit = torch.arange(units) >= old_units
    fused_new = torch.zeros(2 * units, dtype=torch.bool)
    fused_new[gate_pos], fused_new[up_pos] = new_unit, new_unit
    gate_up_dim, down_dim = unit_dims(moe)
    result.grown.append((gate_up, along(gate_up, gate_up_dim, fused_new)))
    result.grown.append((down, along(down, down_dim, new_unit)))
    if bias is not None:
        result.grown.append((bias, along(bias, 1, fused_new)))
    if source is not None:  # net2net / copy_halve: slot i copies unit slot_source[i], in every expert
        slot_source = torch.cat([torch.arange(old_units), source])
        if shares is None:  # equal shares
            shares = 1 / (torch.bincount(source, minlength=old_units).float() + 1)[slot_source]
        old_gate, old_up = gate_up_positions(moe, old_units)
        fused_source = torch.empty(2 * units, dtype=torch.long)
        fused_source[gate_pos], fused_source[up_pos] = old_gate[slot_source], old_up[slot_source]
        fused_shares = torch.empty(2 * units)
        fused_shares[gate_pos], fused_shares[up_pos] = shares, shares
        ones = torch.ones_like(fused_shares)
        # a slot read through share·w gets share × the source's gradient; its outgoing value is w / (1/share)
        result.splits.append(Split(gate_up, gate_up_dim, fused_source, ones, fused_shares))
        if bias is not None:
            result.splits.append(Split(bias, 1, fused_source, ones, fused_shares))
        result.splits.append(Split(down, down_dim, slot_source, 1 / shares, torch.ones_like(shares)))
    result.units += _unit_records(moe, gate_up, down, torch.arange(old_units, units), count, source)


def _unit_records(moe, gate_up, down, rows, count: int, source) -> list[NewUnits]:
    """One health record per expert (its incoming gate rows and outgoing down columns)."""
    return [NewUnits(up=gate_up, down=down, rows=rows, conv1d=moe.transposed, sources=source, expert=e,
                     up_stride=2 if moe.gate_up_interleaved else 1) for e in range(count)]


def _fused_pair(wide: WiderPair, like: nn.Module, units: int, size: int) -> WiderPair:
    """`wide` (grown gate and up halves) with the halves fused again as [gate | up]; the masks and
    splits of the halves become those of the fused tensor (its rows: gate units, then up units)."""
    fused = _fuse(wide.gate, wide.up, like)
    halves = {id(wide.gate.weight), id(wide.up.weight), id(getattr(wide.up, "bias", None)),
              id(getattr(wide.gate, "bias", None))}
    half_mask = torch.arange(units + size) >= units
    row_mask = torch.cat([half_mask, half_mask])
    grown = [(fused.weight, _mask_like(fused.weight, row_mask, rows=True))]
    if fused.bias is not None:
        grown.append((fused.bias, mask_on(row_mask, fused.bias)))
    grown += [(p, m) for p, m in wide.grown if id(p) not in halves]
    splits = [s for s in wide.splits if id(s.param) not in halves]
    incoming = [s for s in wide.splits if s.param is wide.up.weight]
    if incoming:  # the up half's split, for both halves; up rows are old rows offset by `units`
        half = incoming[0]
        splits.append(Split(fused.weight, 0, torch.cat([half.source, half.source + units]),
                            half.divisor.repeat(2), half.grad_scale.repeat(2)))
        if fused.bias is not None:
            splits.append(Split(fused.bias, 0, torch.cat([half.source, half.source + units]),
                                half.divisor.repeat(2), half.grad_scale.repeat(2)))
    # health reads a unit's incoming row at its index: the gate half's rows match down's columns
    units_record = NewUnits(up=fused.weight, down=wide.down.weight, rows=wide.units.rows, sources=wide.units.sources)
    return WiderPair(fused, wide.down, None, grown, units_record, splits)


def _innermost(mlp: nn.Module) -> nn.Module:
    while isinstance(mlp, FFNWithNewUnits):
        mlp = mlp.base
    return mlp


def _inner_ffn_size(view, layer: int, layout) -> int:
    up = getattr(_innermost(view.ffn(layer)), layout.up)
    rows = int(_linear_weight(up, layout.conv1d).shape[0])
    return rows // 2 if layout.gate_up_fused else rows  # [gate | up]: half the rows are units


def _mask_like(weight: torch.Tensor, unit_mask: torch.Tensor, rows: bool) -> torch.Tensor:
    """Broadcast a per-unit mask over a weight whose units lie along rows (or columns)."""
    if weight.is_meta:  # the preview counts the new entries: a CPU view, no storage of the weight's size
        return (unit_mask[:, None] if rows else unit_mask[None, :]).cpu().expand(weight.shape)
    unit_mask = unit_mask.to(weight.device)
    return (unit_mask[:, None] if rows else unit_mask[None, :]).expand_as(weight).clone()


# -- meta tensors (engine.grow.preview runs the operators on weights without storage) -------------


def value_std(t: torch.Tensor) -> float:
    """The std of a tensor's values; a meta tensor has none, and only shapes matter there: 1."""
    return 1.0 if t.is_meta else float(t.float().std())


def shapes_only(like: torch.Tensor):
    """New tensors made in this context live on the meta device when `like` does (draws from a
    CPU generator included), so a preview of a 7B model allocates nothing; otherwise a no-op."""
    return torch.device("meta") if like.is_meta else contextlib.nullcontext()


def mask_on(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A new-entry mask on `t`'s device; a meta `t` keeps it on the CPU, where it can be counted."""
    return mask.cpu() if t.is_meta else mask.to(t.device)
