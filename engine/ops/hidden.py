"""widen_hidden: grow d_model, the width of the residual stream, through the whole model.

Every tensor that touches the stream changes shape: the token (and position) embeddings and
every norm write or carry stream values; q/k/v, the FFN's up/gate and the LM head read it; the
attention output and the FFN's down projection write it. Four routes:

duplicate (size = (k - 1) x d_model; exact; HyperCloning, Samragh et al. 2024)
    The stream x becomes k copies [x, ..., x]. Embeddings become [E, ..., E]; norm gains and
    biases repeat (the mean and variance of the copies are those of x, and so is the root mean
    square); a module reading the stream gets W/k per copy (sum W/k x = W x); a module writing it
    gets its output rows repeated. Heads repeat as a block, head_dim unchanged: heads
    [h_0..h_n-1] k times, so the attention's inner width grows like the stream and follows the
    same rules (q/k/v rows repeated, the output projection reads Wo/k per head copy). Key/value
    heads repeat the same way, so with grouped-query attention query copy c n + i uses key/value
    copy c m + i/g: the copy of the group it used before. Rotary embeddings depend on head_dim
    only. LM head: untied, W/k per copy; tied to the embedding, it would multiply every logit by
    k, so the final norm's gain and bias take 1/k (a final norm without a gain: the head is
    untied, and the note says so). Only summation order differs: max |Δlogits| ~ 1e-7 (float32).

lossless (any other size that keeps whole heads; exact; LEMON, Wang et al. 2023)
    k = d' // d copies and r = d' mod d pads: x* = [x (k copies), p 1_r]. LayerNorm: p = mean(x),
    kept there by writers whose pad rows are the mean of their rows ("average" rows), so mean(x*)
    = mean(x) and Var(x*) = s Var(x) with s = k d / d'. RMSNorm: p = 0 (zero rows), ms(x*) =
    s ms(x). Either way gamma* = sqrt(s) gamma and epsilon* = s epsilon (one config field, the
    same s for every norm) give norm(x) on the copies, and beta* = 0 gives 0 on the pads; readers
    read the pads through new random columns (`init_std`), which see zeros: the function is
    unchanged and the writers' pad rows get gradient. Where head_dim derives from the hidden size
    the pads form new heads (random q/k/v rows, zero output columns).
    Norm weights stored as gamma - offset (Gemma: 1 + w; the family fact `norm_offset`) are
    scaled as gamma. Families with q/k norms are refused for s != 1: their epsilon is the same
    config field and must stay epsilon.

symmetry (duplicate, lossless): copies are twins and, with equal gradients, stay twins.
    "split": readers take unequal shares (1 + scale t_c)/k, t_c spread over [-1, 1]; "noise":
    readers get paired noise that sums to zero over the copies. Both exact at expansion; the
    health figures (OpResult.units: FFN-down rows and FFN-up columns of each new stream
    dimension) show the new units are no twins.

Config: a config transformers would refuse (LlamaConfig: hidden size a multiple of the head
count) is refused before any tensor changes, naming sizes that fit.

zero (any size that keeps whole heads; not exact)
    New stream dimensions start at zero: zero columns in the embeddings, zero output rows in
    every module writing the stream, so they stay zero until training moves them. Modules reading
    the stream get new input columns, random (std `init_std`, default the std of their weights)
    or zero. Norms get new gain entries: 0 for LayerNorm (a zero input dimension normalises to
    -mean/std there, and the zero gain keeps that out of the readers), the mean gain for RMSNorm
    (a zero input normalises to 0 anyway, and a zero gain would leave the new dimensions without
    gradient). What is NOT preserved: every norm now takes its statistics over more dimensions
    (LayerNorm's mean and variance, RMSNorm's mean square), so every block sees a rescaled (and
    for LayerNorm re-centred) input. The operator says so (exact = False, the note names the
    norms) and apply_stage measures the change.
    Heads (zero and masked): where the family derives head_dim from the hidden size (GPT-2,
    GPT-Neo, GPT-NeoX), the new dimensions form new heads (size a multiple of head_dim; a larger
    head_dim would change every head's attention scale and rotary frequencies) with random q/k/v
    rows and zero output-projection columns (as add_heads); where the config states head_dim on
    its own (Llama) the heads stay as they are.

masked (any size that keeps whole heads; exact at expansion; Masked Structural Growth, Yao et al.)
    The zero route's tensors, and every norm wrapped in a ``MaskedNorm``: its statistics weigh
    the old dimensions by 1 and the new ones by `ramp` (mean = sum(w x) / sum(w), and so on), so
    at ramp 0 they are the old statistics (exact) and at ramp 1 the plain norm's. The ramp rises
    linearly over `ramp_steps` training-mode forward passes (one per optimizer step without
    gradient accumulation), counted in a buffer that checkpoints save. Once it reaches 1 the
    wrapper is a plain norm: ``materialize()`` (export) returns it; before that, export refuses.

What is "new" (OpResult.grown masks; freeze = "base" trains only these entries): an entry is new
when it lies in the grown part of any grown axis — beyond the old width of the stream, of the
heads, or of the key/value heads. For the zero route these are exactly the added entries. For
duplicate and lossless, the new entries are the copies beyond the first and the pads; the
original block (top-left, holding W or W/k) is frozen under freeze = "base" although the shares
changed its values, so the model learns through the copies while the original stays as grown.

Models holding virtual (weight-tied) blocks stay tied: each Parameter grows once and every
module holding it gets the grown one; a tied LM head stays the embedding's own tensor.
Parallel paths and adapters (modules with ``materialize``, PEFT layers) are refused: grow the
hidden size first, or merge them (export) before.
"""

from __future__ import annotations

import copy as copy_module
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from engine.model.view import get_submodule, holds_experts
from engine.ops.expert_units import grouped_mm_problem
from engine.ops.health import NewUnits
from engine.ops.params import WidenHiddenParams
from engine.ops.registry import OpResult
from engine.ops.width import mask_on, shapes_only, value_std


class MaskedNorm(nn.Module):
    """A LayerNorm or RMSNorm (`kind`) whose statistics weigh its first `old` dimensions by 1 and
    the others by `ramp` = training steps so far / `ramp_steps` (at most 1). The gain is
    weight + `offset` (Gemma stores 1 + w), applied in float32 as the wrapped norms do."""

    def __init__(self, norm: nn.Module, old: int, kind: str, ramp_steps: int, offset: float = 0.0):
        super().__init__()
        self.norm, self.old, self.kind, self.ramp_steps, self.offset = norm, old, kind, ramp_steps, offset
        self.eps = getattr(norm, "eps", None) or norm.variance_epsilon
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # saved with the weights

    @property
    def ramp(self) -> float:
        return min(1.0, int(self.steps) / self.ramp_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = (self.steps.float() / self.ramp_steps).clamp(max=1.0)  # on the device: no sync
        if self.training:
            self.steps += 1
        weights = torch.cat([torch.ones(self.old, device=x.device), ramp.expand(x.shape[-1] - self.old)])
        xf, total = x.float(), weights.sum()
        if self.kind == "rmsnorm":
            y = xf * torch.rsqrt((xf.pow(2) * weights).sum(-1, keepdim=True) / total + self.eps)
        else:
            centred = xf - (xf * weights).sum(-1, keepdim=True) / total
            y = centred * torch.rsqrt((centred.pow(2) * weights).sum(-1, keepdim=True) / total + self.eps)
        gain, bias = getattr(self.norm, "weight", None), getattr(self.norm, "bias", None)
        if gain is not None and self.offset:
            y = (y * (gain.float() + self.offset)).to(x.dtype)
        else:
            y = y.to(x.dtype)
            if gain is not None:
                y = y * gain
        return y + bias if bias is not None else y

    def materialize(self) -> nn.Module:
        if self.ramp < 1:
            raise ValueError(f"a masked norm is still ramping in its new dimensions (ramp {self.ramp:.2f} after "
                             f"{int(self.steps)} of {self.ramp_steps} steps): train until ramp_steps have passed, "
                             "or set a smaller ramp_steps")
        return self.norm

    def extra_repr(self) -> str:
        return f"old={self.old}, kind={self.kind}, ramp={self.ramp:.3f}"


@dataclass(frozen=True)
class Axis:
    """How one width grows: the stream, the query heads' width, the key/value heads' width.

    The old entries become `copies` copies of themselves, then `added` entries are appended:
    where a module writes this axis they hold `write_fill` ("zero", "random", or "mean": the
    mean of the old entries, so a padded stream stays at its own mean), where one reads it
    `read_fill` ("zero" or "random")."""

    old: int
    copies: int = 1
    added: int = 0
    write_fill: str = "zero"
    read_fill: str = "zero"

    @property
    def new(self) -> int:
        return self.copies * self.old + self.added

    def scaled(self, factor: int) -> "Axis":
        """The same growth over `factor` interleaved entries per unit (NeoX's fused per-head qkv
        rows hold q, k and v of each head)."""
        return Axis(self.old * factor, self.copies, self.added * factor, self.write_fill, self.read_fill)

    def new_mask(self) -> torch.Tensor:
        return torch.arange(self.new) >= self.old


@dataclass(frozen=True)
class Symmetry:
    """How the copies of a duplicated axis are read: shares of each weight summing to 1, plus
    noise summing to 0 over the copies. Both keep sum_c W_c x = W x for equal copies x."""

    kind: str = "none"   # "none" | "split" | "noise"
    scale: float = 0.0

    def shares(self, copies: int) -> list[float]:
        if self.kind != "split":
            return [1 / copies] * copies
        spread = torch.linspace(-1, 1, copies).tolist()  # sums to 0, so the shares sum to 1
        return [(1 + self.scale * t) / copies for t in spread]

    def parts(self, t: torch.Tensor, copies: int, gen: torch.Generator) -> list[torch.Tensor]:
        """The `copies` input blocks of a weight `t` that reads a duplicated input."""
        parts = [t * share if copies > 1 else t for share in self.shares(copies)]
        if self.kind == "noise" and copies > 1:
            with shapes_only(t):  # a preview's meta weight: a draw of shapes only
                noise = torch.randn((copies, *t.shape), generator=gen) * (self.scale * value_std(t) / copies)
            noise -= noise.mean(0, keepdim=True)  # paired: it cancels over the copies
            parts = [part + n.to(t) for part, n in zip(parts, noise)]
        return parts


def _appended(t: torch.Tensor, dim: int, count: int, fill: str, std: float, gen: torch.Generator) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = count
    if fill == "mean":
        return t.float().mean(dim, keepdim=True).expand(shape).to(t)
    with shapes_only(t):
        if fill == "random":
            return (torch.randn(shape, generator=gen) * std).to(t)
        return torch.zeros(shape).to(t)


def _written(t: torch.Tensor, dim: int, axis: Axis, std: float, gen: torch.Generator) -> torch.Tensor:
    """`t` (outputs along `dim`) writing a grown axis: copies repeated, then the added entries."""
    parts = [t] * axis.copies
    if axis.added:
        parts.append(_appended(t, dim, axis.added, axis.write_fill, std, gen))
    return torch.cat(parts, dim)


def _read(t: torch.Tensor, dim: int, axis: Axis, std: float, gen: torch.Generator,
          symmetry: Symmetry) -> torch.Tensor:
    """`t` (inputs along `dim`) reading a grown axis: its share of each copy, then the added
    entries (which read zeros or a norm's zero output: any value keeps the function)."""
    moved = t.movedim(dim, 0)
    parts = symmetry.parts(moved, axis.copies, gen)
    if axis.added:
        parts.append(_appended(moved, 0, axis.added, axis.read_fill, std, gen))
    return torch.cat(parts, 0).movedim(0, dim)


class _Grower:
    """Grows Parameters in place of the old ones, each exactly once (tied and virtual modules
    share the grown tensor), and records the new-entry masks."""

    def __init__(self, gen: torch.Generator, read_std: float | None, symmetry: Symmetry = Symmetry()):
        self.gen = gen
        self.read_std = read_std
        self.symmetry = symmetry
        self.grown: list[tuple[nn.Parameter, torch.Tensor]] = []
        # id(old) -> (old, new): the old tensor is held so that its id cannot be reused by a tensor
        # made later in the same growth (an FSDP walk fills each block's tensors as it reaches the
        # block: a reused id would hand that block another module's grown tensor)
        self._done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def _replace(self, module: nn.Module, name: str, build) -> None:
        old = getattr(module, name, None)
        if old is None:
            return
        if id(old) not in self._done:
            tensor, mask = build(old.detach())
            new = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
            self._done[id(old)] = (old, new)
            self.grown.append((new, mask if mask.is_meta else mask_on(mask, new)))
        setattr(module, name, self._done[id(old)][1])

    def values(self, module: nn.Module, name: str, axis: Axis, copy=None, pad=0.0) -> None:
        """A tensor holding stream values along its last dim (embeddings, norm gains/biases):
        `copy(t)` (default t) repeated, then the added entries: `pad` ("mean" or a number)."""
        def build(t):
            parts = [copy(t) if copy else t] * axis.copies
            if axis.added:
                with shapes_only(t):
                    fill = (t.float().mean(-1, keepdim=True) if pad == "mean"
                            else torch.full((*t.shape[:-1], 1), float(pad)))
                parts.append(fill.expand(*t.shape[:-1], axis.added).to(t))
            grown = torch.cat(parts, -1)
            if t.is_meta:  # the preview counts new entries on a CPU view, without the tensor's storage
                return grown, axis.new_mask().expand(grown.shape)
            return grown, axis.new_mask().to(t.device).expand_as(grown).clone()
        self._replace(module, name, build)

    def linear(self, module: nn.Module, rows: list[Axis], cols: Axis, conv1d: bool) -> None:
        """A Linear (or GPT-2 Conv1D) whose output is the concatenation of `rows` segments (one,
        or [q | k | v] for a fused projection) and whose input is `cols`. Columns grow first, so
        a "mean" row is the mean of the grown rows."""
        def build(w):
            w = w.T if conv1d else w                     # Linear layout [out, in]
            write_std = value_std(w)
            read_std = write_std if self.read_std is None else self.read_std
            w = _read(w, 1, cols, read_std, self.gen, self.symmetry)
            segments = w.split([axis.old for axis in rows])
            w = torch.cat([_written(seg, 0, axis, write_std, self.gen) for seg, axis in zip(segments, rows)])
            row_mask = torch.cat([axis.new_mask() for axis in rows])
            if w.is_meta:  # new rows or columns: no one broadcast view holds it; the preview shows no count
                mask = torch.empty(w.shape, dtype=torch.bool, device="meta")
            else:
                mask = (row_mask[:, None] | cols.new_mask()[None, :]).to(w.device)
            return (w.T, mask.T) if conv1d else (w, mask)

        def build_bias(b):
            segments = b.split([axis.old for axis in rows])
            grown = torch.cat([_written(seg, 0, replace(axis, write_fill="mean" if axis.write_fill == "mean"
                                                        else "zero"), 0.0, self.gen)
                               for seg, axis in zip(segments, rows)])
            return grown, mask_on(torch.cat([axis.new_mask() for axis in rows]), b)

        self._replace(module, "weight", build)
        self._replace(module, "bias", build_bias)
        out_features, in_features = sum(axis.new for axis in rows), cols.new
        if conv1d:
            module.nf, module.nx = out_features, in_features
        elif hasattr(module, "in_features"):  # a router keeps no sizes
            module.out_features, module.in_features = out_features, in_features

    def tensor(self, module: nn.Module, name: str, stream: Axis, reads: int | None = None,
               writes: int | None = None, bias: bool = False) -> None:
        """A tensor of any rank (a MoE block's fused experts) reading the stream along dim `reads`
        or writing it along dim `writes`; `bias`: a written bias (its added entries zero, or the
        mean where the stream's pads hold its mean)."""
        def build(t):
            std = value_std(t)
            read_std = std if self.read_std is None else self.read_std
            if reads is not None:
                t = _read(t, reads, stream, read_std, self.gen, self.symmetry)
            if writes is not None:
                axis = replace(stream, write_fill="mean" if stream.write_fill == "mean" else "zero") if bias else stream
                t = _written(t, writes, axis, 0.0 if bias else std, self.gen)
            if t.is_meta:  # the preview shows no count for a tensor grown along one axis of several
                return t, torch.empty(t.shape, dtype=torch.bool, device="meta")
            new_mask = torch.zeros(t.shape, dtype=torch.bool)
            for dim in filter(lambda d: d is not None, (reads, writes)):
                shape = [1] * t.ndim
                shape[dim] = -1
                new_mask = new_mask | stream.new_mask().reshape(shape)
            return t, new_mask.to(t.device)
        self._replace(module, name, build)


@dataclass
class _Growth:
    """The widths of one application: the stream and the attention's query/key-value widths."""

    stream: Axis
    q: Axis
    kv: Axis
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def variance_scale(self) -> float:
        """s = k d / d': the padded stream's variance (LayerNorm) or mean square (RMSNorm) is s
        times the old one (the copies repeat it, the pads add nothing about the mean / zero)."""
        return self.stream.copies * self.stream.old / self.stream.new


def _head_dim(view) -> int:
    layout = view.family.attention
    if not layout.width_follows_hidden:
        value = getattr(view.config, layout.head_dim_field, None)
        if value:
            return int(value)
    return view.hidden_size // view.num_heads


def _plan_growth(view, params: WidenHiddenParams) -> _Growth:
    """The axes of this growth, or one ValueError naming the field and the fix."""
    if params.init in ("duplicate", "lossless"):
        return _plan_exact(view, params)
    hidden, heads, kv_heads = view.hidden_size, view.num_heads, view.num_kv_heads
    head_dim = _head_dim(view)
    read_fill = "zero" if params.init_std == 0 else "random"
    stream = Axis(hidden, added=params.size, write_fill="zero", read_fill=read_fill)
    if not view.family.attention.width_follows_hidden:  # head_dim is stated: the heads stay
        return _Growth(stream, Axis(heads * head_dim), Axis(kv_heads * head_dim), heads, kv_heads, head_dim)
    if params.init == "masked":  # exact at expansion: the new heads must not touch the old ones
        _refuse_heads_under_joint_qk_norms(view, params.size)
    new_heads, new_kv = _whole_heads(view, params.size, head_dim, "size must be a multiple of")
    return _Growth(stream,
                   Axis(heads * head_dim, added=params.size, write_fill="random", read_fill="zero"),
                   Axis(kv_heads * head_dim, added=new_kv * head_dim, write_fill="random", read_fill="zero"),
                   heads + new_heads, kv_heads + new_kv, head_dim)


def _whole_heads(view, extra: int, head_dim: int, what: str) -> tuple[int, int]:
    """(new heads, new key/value heads) formed by `extra` stream dimensions, where head_dim
    derives from the hidden size (a larger head_dim would change every head's attention scale
    and rotary frequencies); one ValueError when they do not form whole groups of heads."""
    heads, kv_heads = view.num_heads, view.num_kv_heads
    group = heads // kv_heads
    unit = head_dim * group
    if extra % unit:
        of = f"head_dim {head_dim}" if group == 1 else f"head_dim {head_dim} x the GQA group size {group}"
        raise ValueError(f"size: {view.family.name} derives head_dim from the hidden size ({view.hidden_size} = "
                         f"{heads} heads x {head_dim}), so the new dimensions must form whole heads — {what} "
                         f"{of} (e.g. {unit} or {2 * unit}), got {extra}")
    return extra // head_dim, extra // head_dim // group


def _refuse_heads_under_joint_qk_norms(view, extra: int) -> None:
    """New heads formed by `extra` stream dimensions would change every head's queries where one
    q/k norm spans all heads (OLMoE): refused for the routes that claim exactness."""
    layout, hidden = view.family.attention, view.hidden_size
    if layout.qk_norms and not layout.qk_norm_per_head:
        whole = (hidden + extra + hidden - 1) // hidden * hidden - hidden
        raise ValueError(f"size: {view.family.name} derives head_dim from d_model, so {extra} new dimensions would form "
                         "new heads, and its q/k norms normalise all heads together (the new heads would rescale the "
                         f"old ones) — use init = \"duplicate\" with size = {whole} (whole copies)")


def _plan_exact(view, params: WidenHiddenParams, head_repeats: int | None = None) -> _Growth:
    """duplicate / lossless: k = d'// d copies of the stream (heads repeated k times, head_dim
    kept) and r = d' mod d pads (new heads where head_dim derives from the hidden size).
    `head_repeats` < k: the heads repeat fewer times (where head_dim is stated); each head still
    reads W/k of every copy, so it is exact too — for configs that cannot describe k x the heads."""
    hidden, heads, kv_heads = view.hidden_size, view.num_heads, view.num_kv_heads
    head_dim = _head_dim(view)
    copies, pads = divmod(hidden + params.size, hidden)
    if params.init == "duplicate" and pads:
        below = (copies - 1) * hidden
        sizes = " or ".join(str(s) for s in (below, below + hidden) if s > 0)
        raise ValueError(f"size: init = \"duplicate\" makes whole copies of d_model, so size must be a multiple "
                         f"of the hidden size {hidden} (got {params.size}) — set size = {sizes}, or use init = "
                         "\"lossless\" for other sizes")
    norm_pad = "mean" if view.family.norm_kind == "layernorm" else "zero"
    read_fill = "zero" if params.init_std == 0 else "random"
    stream = Axis(hidden, copies, pads, write_fill=norm_pad, read_fill=read_fill)
    new_heads = new_kv = 0
    if pads and view.family.attention.width_follows_hidden:
        _refuse_heads_under_joint_qk_norms(view, pads)
        new_heads, new_kv = _whole_heads(view, pads, head_dim,
                                         f"size beyond {copies - 1} x {hidden} must be a multiple of")
    repeats = copies if head_repeats is None else head_repeats
    q = Axis(heads * head_dim, repeats, new_heads * head_dim, write_fill="random", read_fill="zero")
    kv = Axis(kv_heads * head_dim, repeats, new_kv * head_dim, write_fill="random", read_fill="zero")
    return _Growth(stream, q, kv, repeats * heads + new_heads, repeats * kv_heads + new_kv, head_dim)


def _require_plain_model(model: nn.Module) -> None:
    """Refuse models holding parallel paths or adapters: their extra tensors read or write the
    stream too, and this operator would leave them at the old width. Masked norms whose ramp is
    complete are plain norms again and are unwrapped (one still ramping is refused)."""
    from engine.ops.adapters import _tuner_layer_cls

    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedNorm):
            parent, _, attr = name.rpartition(".")
            setattr(get_submodule(model, parent) if parent else model, attr, module.materialize())
    tuner = _tuner_layer_cls()
    for name, module in model.named_modules():
        if hasattr(module, "materialize") or isinstance(module, tuner):
            raise ValueError(f"widen_hidden: '{name}' is a parallel path or adapter ({type(module).__name__}) an "
                             "earlier operator added, which widen_hidden cannot widen — put widen_hidden before it "
                             "in the plan (or use widen_ffn with mode = \"inplace\")")


def _require_config_heads(view) -> None:
    """Refuse blocks whose attention is wider than the config describes (heads an earlier add_heads
    added where the config cannot record them: head_dim derived from d_model, or only some
    layers): this operator sizes every block's attention from the config."""
    layout = view.family.attention
    head_dim = _head_dim(view)
    heads, kv_heads = view.num_heads, view.num_kv_heads
    name, rows = (layout.qkv, (heads + 2 * kv_heads) * head_dim) if layout.qkv else (layout.q, heads * head_dim)
    blocks = view.blocks()
    for index in range(len(blocks)):  # by index: iterating would start an FSDP run's one walk of the blocks
        weight = getattr(get_submodule(blocks[index], layout.module), name).weight
        found = weight.shape[1] if layout.conv1d else weight.shape[0]
        if found != rows:
            raise ValueError(f"widen_hidden: block {index}'s attention has {found} {name} outputs but the config "
                             f"describes {rows} ({heads} heads of {head_dim}): heads added by an earlier add_heads "
                             "that the config could not record — put widen_hidden before add_heads in the plan")


def _modules_at(root: nn.Module, dotted: str):
    """(module, attribute) pairs for a path whose "*" parts mean every child of a ModuleList;
    attributes a module lacks are skipped (one family entry serves several model types)."""
    *parents, attr = dotted.split(".")
    modules = [root]
    for part in parents:
        modules = [child for m in modules
                   for child in (list(m) if part == "*" else [getattr(m, part, None)]) if child is not None]
    return [(m, attr) for m in modules if hasattr(m, attr)]


# module attributes holding a norm's epsilon, as the families' norm classes spell them
EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")


def _eps_field(view) -> str | None:
    """The config field of the norms' epsilon: the family's `norm_eps_field` (one fact, one place)."""
    return view.family.norm_eps_field


def _gain_offset(family) -> float:
    """Norms whose weight stores gamma - offset (Gemma: output x (1 + weight)) say so with the
    family fact `norm_offset`; the gains are scaled as gamma = weight + offset."""
    return float(getattr(family, "norm_offset", 0.0) or 0.0)


def _grow_norm(grower: _Grower, norm: nn.Module, growth: _Growth, family, exact: bool,
               out_scale: float = 1.0) -> None:
    """Exact routes: the copies' gamma x sqrt(s) (their statistics are s times the old ones,
    epsilon too: see _scale_eps) and x `out_scale`; the pads' beta 0, so they normalise to 0.
    zero/masked: see the module docstring."""
    stream, gain = growth.stream, getattr(norm, "weight", None)
    offset = _gain_offset(family)
    if exact:
        factor = math.sqrt(growth.variance_scale) * out_scale
        if factor == 1:
            copy = None  # keep the tensor bit for bit (duplicate, untied)
        else:
            def copy(t):  # gamma = weight + offset scaled, stored back as weight
                return ((t.double() + offset) * factor - offset).to(t)
        # the pads read 0 after the norm whatever their gain; a typical gain lets them learn
        pad = (float((gain.detach().double() + offset).mean() * factor - offset)
               if gain is not None and not gain.is_meta else 0.0)  # meta (a preview): shapes only
        grower.values(norm, "weight", stream, copy=copy, pad=pad)
        grower.values(norm, "bias", stream, copy=(lambda t: t * out_scale) if out_scale != 1 else None)
    else:
        # LayerNorm's new gain is 0, RMSNorm's the mean gain (module docstring)
        pad = (float(gain.detach().float().mean())
               if family.norm_kind == "rmsnorm" and gain is not None and not gain.is_meta else 0.0)
        copy = None if out_scale == 1 else (lambda t: ((t.double() + offset) * out_scale - offset).to(t))
        grower.values(norm, "weight", stream, copy=copy, pad=pad)
        grower.values(norm, "bias", stream, copy=(lambda t: t * out_scale) if out_scale != 1 else None)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (stream.new,)


def _scale_eps(norm: nn.Module, scale: float, done: set[int]) -> None:
    """epsilon x s, once per module (virtual blocks may hold the same norm)."""
    if scale == 1 or id(norm) in done:
        return
    done.add(id(norm))
    for attr in EPS_ATTRS:
        if isinstance(getattr(norm, attr, None), float):
            setattr(norm, attr, getattr(norm, attr) * scale)
            return


def _grow_attention(grower: _Grower, attn: nn.Module, layout, growth: _Growth) -> None:
    if layout.qkv:
        fused = getattr(attn, layout.qkv)
        if layout.qkv_order == "per_head":  # rows [q_h k_h v_h] per head: one axis, 3 rows per unit
            rows = [growth.q.scaled(3)]
        else:                               # rows [q | k | v]
            rows = [growth.q, growth.kv, growth.kv]
        grower.linear(fused, rows, growth.stream, layout.conv1d)
    else:
        grower.linear(getattr(attn, layout.q), [growth.q], growth.stream, layout.conv1d)
        grower.linear(getattr(attn, layout.k), [growth.kv], growth.stream, layout.conv1d)
        grower.linear(getattr(attn, layout.v), [growth.kv], growth.stream, layout.conv1d)
    grower.linear(getattr(attn, layout.out), [growth.stream], growth.q, layout.conv1d)
    if layout.qk_norms and not layout.qk_norm_per_head:
        # OLMo-2: one RMSNorm over the whole q (k) projection; repeated heads keep its mean square,
        # so its gain repeats with them (per-head norms, Qwen3's, keep head_dim and stay as they are)
        for name, axis in zip(layout.qk_norms, (growth.q, growth.kv)):
            grower.values(getattr(attn, name), "weight", axis)
    heads = Axis(growth.q.old // growth.head_dim, growth.q.copies, growth.q.added // growth.head_dim)
    for name in layout.head_params:  # one entry per head (GPT-OSS's sinks): repeated with the heads
        grower.values(attn, name, heads)
    if layout.heads_attr:
        setattr(attn, layout.heads_attr, growth.heads)
    if layout.kv_heads_attr:
        setattr(attn, layout.kv_heads_attr, growth.kv_heads)
    for attr in (layout.split_attr, layout.width_attr):
        if attr:
            setattr(attn, attr, growth.q.new)


@torch.no_grad()
def _follow_qk_norm_eps(attn: nn.Module, layout, scale: float, scaled_eps: set[int]) -> None:
    # scaled_eps: ids of the norms (and here projections) already scaled
    """The q/k norms (Qwen3, OLMo-2, Gemma 3) read their epsilon from the config field that the
    exact routes scale by s for the stream's norms, so on reload they get s·ε too. Queries and keys
    scaled by √s keep them exact: (√s q) / sqrt(s·ms(q) + s·ε) = q / sqrt(ms(q) + ε)."""
    root = math.sqrt(scale)
    for name, projection in zip(layout.qk_norms, (layout.q, layout.k)):
        module = getattr(attn, projection)
        for p in (module.weight, getattr(module, "bias", None)):
            if p is not None and id(p) not in scaled_eps:  # virtual blocks share the tensors: once
                scaled_eps.add(id(p))
                p.mul_(root)
        _scale_eps(getattr(attn, name), scale, scaled_eps)


def _grow_ffn(grower: _Grower, mlp: nn.Module, layout, stream: Axis) -> None:
    """up (and gate) read the stream, down writes it; the FFN's own width stays."""
    for name in dict.fromkeys(filter(None, (layout.up, layout.gate))):  # once where fused (Phi-3 gate_up)
        rows = _linear_shape(getattr(mlp, name), layout.conv1d)[0]  # a fused gate_up: 2 x the units
        grower.linear(getattr(mlp, name), [Axis(rows)], stream, layout.conv1d)
    units = _linear_shape(getattr(mlp, layout.down), layout.conv1d)[1]
    grower.linear(getattr(mlp, layout.down), [stream], Axis(units), layout.conv1d)


def _grow_moe(grower: _Grower, moe_block: nn.Module, moe, stream: Axis) -> None:
    """A sparse block: the router and every expert's gate/up read the stream, every expert's down
    (and bias) writes it; the shared expert is an FFN and its gate a reader. Experts widened by a
    parallel path were refused before (_require_plain_model)."""
    grower.linear(get_submodule(moe_block, moe.router), [Axis(get_submodule(moe_block, moe.router).weight.shape[0])],
                  stream, conv1d=False)
    experts = get_submodule(moe_block, moe.experts)
    gate_up_reads, down_writes = (1, 2) if moe.transposed else (2, 1)
    grower.tensor(experts, moe.gate_up.rpartition(".")[2], stream, reads=gate_up_reads)
    grower.tensor(experts, moe.down.rpartition(".")[2], stream, writes=down_writes)
    if moe.down_bias:
        grower.tensor(experts, moe.down_bias.rpartition(".")[2], stream, writes=1, bias=True)
    if moe.shared_expert:
        _grow_ffn(grower, get_submodule(moe_block, moe.shared_expert.module), moe.shared_expert, stream)
    if moe.shared_expert_gate:
        grower.linear(get_submodule(moe_block, moe.shared_expert_gate), [Axis(1)], stream, conv1d=False)


def _linear_shape(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """(out, in) of a Linear, or of a GPT-2 Conv1D (which stores [in, out])."""
    out_features, in_features = module.weight.shape[::-1] if conv1d else module.weight.shape
    return int(out_features), int(in_features)


def _wrap_masked(root: nn.Module, path: str, stream: Axis, family, ramp_steps: int) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, attr, MaskedNorm(getattr(parent, attr), stream.old, family.norm_kind, ramp_steps,
                                     _gain_offset(family)))


def _note(view, params: WidenHiddenParams, growth: _Growth, tied: bool, untied: bool) -> str:
    family, hidden, stream = view.family, growth.stream.old, growth.stream
    heads = (f"heads {view.num_heads} -> {growth.heads}" + (f", key/value heads {view.num_kv_heads} -> "
             f"{growth.kv_heads}" if view.num_kv_heads != view.num_heads else "") + f", head_dim {growth.head_dim}"
             if growth.heads != view.num_heads else f"heads unchanged ({growth.heads} x {growth.head_dim})")
    if params.init in ("duplicate", "lossless"):
        layer = family.norm_kind == "layernorm"
        stream_text = f"{stream.copies} copies of x" + (
            f" and {stream.added} pads holding {'its mean' if layer else 'zeros'}" if stream.added else "")
        s = growth.variance_scale
        stats = ("the norms see the same statistics" if s == 1 else
                 f"{'variance' if layer else 'mean square'} x s = {s:.4g}, so norm gains x sqrt(s) and epsilon x s")
        head = ("the tied LM head stays tied: the final norm's gain and bias x 1/"
                f"{stream.copies}" if tied and stream.copies > 1 else
                "the LM head untied (the final norm has no gain to take 1/k): columns W/k" if untied else
                "LM head columns W/k per copy" if stream.copies > 1 else "LM head columns kept")
        twins = {"none": "the copies stay twins (set symmetry = \"split\" or \"noise\" to break it)",
                 "split": f"readers split unequally ({params.symmetry_scale:g} spread)",
                 "noise": f"readers carry paired noise that cancels ({params.symmetry_scale:g})"}[params.symmetry]
        return (f"exact: d_model {hidden} -> {stream.new} as {stream_text} ({stats}); {heads}; {head}; {twins}; "
                "exports as is")
    norms = ", ".join([*family.norms, family.final_norm.rpartition(".")[2]])
    if params.init == "masked":
        return (f"exact at expansion: d_model {hidden} -> {stream.new}, new dimensions start at zero and "
                f"every norm ({norms}) takes its statistics over the old {hidden} only, the new ones entering "
                f"over {params.ramp_steps} training steps (MSG); {heads}")
    if family.norm_kind == "rmsnorm":
        why = "RMSNorm's mean square now averages over the zero new dimensions too, scaling every norm's output"
    else:
        why = "LayerNorm's mean and variance now run over the zero new dimensions too, shifting and scaling every norm's output"
    return (f"not exact: {why} ({norms}: {hidden} -> {stream.new} dims); {heads}; new dimensions "
            "start at zero; init = \"lossless\" is the exact route for this size")


def config_problem(config, changes: dict) -> str | None:
    """What transformers would refuse when saving or loading the config with `changes` (its
    own validation, e.g. LlamaConfig: hidden_size a multiple of the head count), in one line."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    trial = copy_module.deepcopy(config)
    for key, value in changes.items():
        setattr(trial, key, value)
    try:
        trial.validate()
    except Exception as e:  # transformers wraps the validator's ValueError
        return str(e.__cause__ or e).strip().splitlines()[0]
    return None


def _config_changes(view, growth: _Growth, eps_field: str | None) -> dict:
    family, layout = view.family, view.family.attention
    changes = {family.hidden_size_field: growth.stream.new, layout.num_heads_field: growth.heads}
    if layout.num_kv_heads_field:
        changes[layout.num_kv_heads_field] = growth.kv_heads
    if not layout.width_follows_hidden:
        changes[layout.head_dim_field] = growth.head_dim
    if family.ffn_size_field and getattr(view.config, family.ffn_size_field, None) is None:
        changes[family.ffn_size_field] = view.ffn_size  # it would follow the new hidden size otherwise
    if eps_field and growth.variance_scale != 1:
        changes[eps_field] = float(getattr(view.config, eps_field)) * growth.variance_scale
    return changes


def _check_fits(view, params: WidenHiddenParams) -> tuple[_Growth, dict]:
    """The growth and its config changes, or one ValueError before any tensor changes."""
    growth = _plan_growth(view, params)
    exact = params.init in ("duplicate", "lossless")
    eps_field = _eps_field(view) if exact else None
    if exact and growth.variance_scale != 1 and eps_field is None:
        raise ValueError(f"init: the {view.family.name} family states no norm epsilon field (norm_eps_field), so "
                         "the scaled epsilon of init = \"lossless\" could not be exported — use init = "
                         "\"duplicate\" (a multiple of d_model)")
    if view.moe:  # the experts kernel's strides
        problem = grouped_mm_problem(view, {"d_model": growth.stream.new})
        if problem:
            raise ValueError(problem)
    changes = _config_changes(view, growth, eps_field)
    problem = config_problem(view.config, changes)
    if problem and exact and not view.family.attention.width_follows_hidden:
        # e.g. LlamaConfig wants d_model % heads == 0: 64 -> 200 with 8 heads fits 8 heads, not 24
        for repeats in range(growth.stream.copies - 1, 0, -1):
            fewer = _plan_exact(view, params, head_repeats=repeats)
            fewer_changes = _config_changes(view, fewer, eps_field)
            if config_problem(view.config, fewer_changes) is None:
                growth, changes, problem = fewer, fewer_changes, None
                break
    if problem:
        fits = _sizes_that_fit(view, params)
        hint = f"use size = {' or '.join(map(str, fits))}" if fits else "use another size"
        raise ValueError(f"size: a {view.config.model_type} config cannot describe d_model {growth.stream.new} "
                         f"with {growth.heads} heads (transformers: \"{problem}\") — {hint}")
    return growth, changes


def _sizes_that_fit(view, params: WidenHiddenParams, wanted: int = 2) -> list[int]:
    """The first sizes near the asked one that this route and the config accept."""
    fits, hidden = [], view.hidden_size
    step = hidden if params.init == "duplicate" else 1
    for size in range(step, 4 * hidden + 1, step):
        if len(fits) == wanted:
            break
        try:
            trial = params.model_copy(update={"size": size})
            growth = _plan_growth(view, trial)
            eps = _eps_field(view) if params.init in ("duplicate", "lossless") else None
            if config_problem(view.config, _config_changes(view, growth, eps)) is None:
                fits.append(size)
        except ValueError:
            continue
    return fits


def _stream_units(view, growth: _Growth) -> list[NewUnits]:
    """The new stream dimensions of each block as new units for the health figures: incoming
    weights = the FFN down projection's rows that write them, outgoing = the FFN up projection's
    columns that read them. Copies name their source dimension (twins until symmetry breaks);
    pads have none."""
    stream, layout, moe, units, seen = growth.stream, view.family.ffn, view.moe, [], set()
    copies = torch.arange(stream.old, stream.copies * stream.old)
    pads = torch.arange(stream.copies * stream.old, stream.new)
    for block in view.blocks():
        if holds_experts(view.family, block):  # expert 0 stands for the block's experts (one record, not E)
            experts = get_submodule(block, f"{moe.module}.{moe.experts}")
            down, up = getattr(experts, moe.down.rpartition(".")[2]), getattr(experts, moe.gate_up.rpartition(".")[2])
            kind = dict(conv1d=moe.transposed, expert=0)
        else:
            mlp = get_submodule(block, layout.module)
            down, up = getattr(mlp, layout.down).weight, getattr(mlp, layout.up).weight
            kind = dict(conv1d=layout.conv1d)
        if id(down) in seen:  # a virtual block: the same tensors
            continue
        seen.add(id(down))
        if len(copies):
            units.append(NewUnits(up=down, down=up, rows=copies, sources=copies % stream.old, **kind))
        if len(pads):
            units.append(NewUnits(up=down, down=up, rows=pads, **kind))
    return units


def _follow_embedding_scale(family, embedding: nn.Module, stream: Axis) -> float:
    """Gemma multiplies the embedding's output by sqrt(d_model), a factor a grown model (and its
    export, rebuilt from the config) takes from the new d_model: scale the grown embedding by
    c = sqrt(d / d') so its output is unchanged, and give the module its new factor. Returns c
    (1 for families without the scale)."""
    if family.embedding_scale != "sqrt_hidden":
        return 1.0
    factor = math.sqrt(stream.old / stream.new)
    with torch.no_grad():
        embedding.weight.mul_(factor)  # the pads are zero (RMSNorm stream): they stay zero
    new_scale = math.sqrt(stream.new)
    if hasattr(embedding, "embed_scale"):
        embedding.embed_scale.fill_(new_scale)
    if hasattr(embedding, "scalar_embed_scale"):
        embedding.scalar_embed_scale = new_scale
    return factor


def _refuse_family(view, model) -> None:
    """One line for the models this operator does not grow, naming family and reason."""
    family = getattr(view, "family", None)
    if family is not None and family.kind == "causal_lm" and not family.stacks:
        return
    from engine.model.families import FAMILIES

    supported = ", ".join(f.name for f in FAMILIES if f.kind == "causal_lm" and not f.stacks
                          and "widen_hidden" not in getattr(f, "refused_ops", {}))
    name = family.name if family else type(model).__name__
    why = {"seq2seq": "an encoder-decoder: its two stacks, the cross-attention and the shared embedding would "
                      "have to grow together, and its tied head's d_model^-0.5 scale changes with d_model",
           "mlp": "a plain MLP has no residual stream (use widen_mlp)"}.get(getattr(family, "kind", None),
                                                                         "it has no residual stream described")
    raise ValueError(f"widen_hidden grows decoder-only language models ({supported}); {name} is not supported: "
                     f"{why}")


def widen_hidden(view, params: WidenHiddenParams, gen: torch.Generator) -> OpResult:
    model = view.model
    _refuse_family(view, model)
    family = view.family
    _require_plain_model(model)
    _require_config_heads(view)
    growth, changes = _check_fits(view, params)
    exact = params.init in ("duplicate", "lossless")
    stream = growth.stream
    grower = _Grower(gen, params.init_std, Symmetry(params.symmetry, params.symmetry_scale))

    embedding = get_submodule(model, family.embeddings)
    lm_head = get_submodule(model, family.lm_head)
    final_norm = get_submodule(model, family.final_norm)
    tied = lm_head.weight is embedding.weight
    untied = False
    if tied and stream.copies > 1 and getattr(final_norm, "weight", None) is None:
        # a tied head reads k equal copies: k x the logits, and no final gain can take 1/k
        lm_head.weight = nn.Parameter(embedding.weight.detach().clone())
        tied, untied = False, True
        changes["tie_word_embeddings"] = False
    pad = "mean" if stream.write_fill == "mean" else 0.0
    for path in filter(None, (family.embeddings, family.position_embeddings)):
        module = get_submodule(model, path)
        grower.values(module, "weight", stream, pad=pad)
        module.embedding_dim = stream.new
    embed_factor = _follow_embedding_scale(family, embedding, stream)

    seen: set[int] = set()
    scaled_eps: set[int] = set()
    for block in view.blocks():
        if id(block) in seen:
            continue
        seen.add(id(block))
        for norm in family.norms:
            _grow_norm(grower, get_submodule(block, norm), growth, family, exact)
            if exact:
                _scale_eps(get_submodule(block, norm), growth.variance_scale, scaled_eps)
            if params.init == "masked":
                _wrap_masked(block, norm, stream, family, params.ramp_steps)
        attn = get_submodule(block, family.attention.module)
        _grow_attention(grower, attn, family.attention, growth)
        if exact and family.attention.qk_norms and growth.variance_scale != 1:
            _follow_qk_norm_eps(attn, family.attention, growth.variance_scale, scaled_eps)
        if holds_experts(family, block):
            _grow_moe(grower, get_submodule(block, view.moe.module), view.moe, stream)
        else:
            _grow_ffn(grower, get_submodule(block, family.ffn.module), family.ffn, stream)

    if exact:
        # tied: logits = E* y* sum over the k copies, k x E y; 1/k on the final norm's output gives E y
        # (and 1/c where the embedding was scaled by c for a sqrt(d) embedding scale)
        _grow_norm(grower, final_norm, growth, family, True,
                   out_scale=1 / (stream.copies * embed_factor) if tied else 1.0)
        _scale_eps(final_norm, growth.variance_scale, scaled_eps)
    else:  # the old dimensions as they were; a tied head reads the embedding scaled by 1/c
        _grow_norm(grower, final_norm, growth, family, False, out_scale=1 / embed_factor if tied else 1.0)
    if params.init == "masked":
        _wrap_masked(model, family.final_norm, stream, family, params.ramp_steps)
    # tied: the embedding's grown tensor (shared through the grower); untied: columns grown
    grower.linear(lm_head, [Axis(lm_head.weight.shape[0])], stream, conv1d=False)

    for path in family.hidden_size_attrs:  # sizes modules cached at construction
        for module, attr in _modules_at(model, path):
            setattr(module, attr, stream.new)
    return OpResult(grown=grower.grown, exact=params.init != "zero",
                    note=_note(view, params, growth, tied, untied), config_changes=changes,
                    units=_stream_units(view, growth) if exact else [])
