"""widen_hidden: grow d_model, the width of the residual stream, through the whole model.

Every tensor that touches the stream changes shape: the token (and position) embeddings and
every norm write or carry stream values; q/k/v, the FFN's up/gate and the LM head read it; the
attention output and the FFN's down projection write it. Three routes:

duplicate (size = d_model; exact)
    The stream x becomes [x, x]. Embeddings become [E, E]; norm gains and biases [g, g], [b, b]
    (the mean and variance of [x, x] are those of x, and so is the root mean square, so a norm of
    [x, x] is [norm(x), norm(x)]); a module reading the stream gets input columns [W/2, W/2]
    (W/2·x + W/2·x = W·x); a module writing it gets its output rows duplicated ([W; W], bias
    [b; b]). Attention heads are duplicated as a block: heads [h_0..h_n-1, h_0..h_n-1] with
    head_dim unchanged, so the attention's inner width doubles like the stream and follows the
    same rules (q/k/v rows duplicated, output projection [[Wo/2, Wo/2], [Wo/2, Wo/2]]); each head
    appears twice and each copy adds half of its output. Key/value heads double the same way, so
    with grouped-query attention query copy h_n+i uses key/value copy (n+i)/g = m + i/g: the copy
    of the group it used before. Rotary embeddings depend on head_dim only, which is unchanged.
    LM head: untied, its columns become [H/2, H/2]; tied to the embedding [E, E], it would double
    every logit, so the final norm's gain and bias are halved (as in Staged Training).
    Halving a float is exact, so only summation order differs: max |Δlogits| ~ 1e-7 in float32.

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
duplicate, the new entries are the copy: the second half of every doubled axis; the original
block (top-left, holding W or W/2) is frozen under freeze = "base" although halving changed its
values, so the model learns through the copy while the original stays as it was grown.

Models holding virtual (weight-tied) blocks stay tied: each Parameter grows once and every
module holding it gets the grown one; a tied LM head stays the embedding's own tensor.
Parallel paths and adapters (modules with ``materialize``, PEFT layers) are refused: grow the
hidden size first, or merge them (export) before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.arch import get_submodule
from engine.ops.params import WidenHiddenParams
from engine.ops.registry import OpResult, operator


class MaskedNorm(nn.Module):
    """A LayerNorm or RMSNorm (`kind`) whose statistics weigh its first `old` dimensions by 1 and
    the others by `ramp` = training steps so far / `ramp_steps` (at most 1)."""

    def __init__(self, norm: nn.Module, old: int, kind: str, ramp_steps: int):
        super().__init__()
        self.norm, self.old, self.kind, self.ramp_steps = norm, old, kind, ramp_steps
        self.eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
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

    `duplicate` turns the old entries into [old, old]; `added` appends entries, filled with
    zeros or random values where a module writes this axis (`write_fill`) and where one reads it
    (`read_fill`)."""

    old: int
    duplicate: bool = False
    added: int = 0
    write_fill: str = "zero"   # "zero" | "random": appended output rows
    read_fill: str = "zero"    # "zero" | "random": appended input columns

    @property
    def new(self) -> int:
        return 2 * self.old if self.duplicate else self.old + self.added

    def scaled(self, factor: int) -> "Axis":
        """The same growth over `factor` interleaved entries per unit (NeoX's fused per-head qkv
        rows hold q, k and v of each head)."""
        return Axis(self.old * factor, self.duplicate, self.added * factor, self.write_fill, self.read_fill)

    def new_mask(self) -> torch.Tensor:
        return torch.arange(self.new) >= self.old


def _extend(t: torch.Tensor, dim: int, axis: Axis, halve: bool, fill: str, std: float,
            gen: torch.Generator) -> torch.Tensor:
    """`t` grown along `dim`: duplicated as [t, t] ([t/2, t/2] when `halve`: weights reading a
    duplicated input), or with `axis.added` zero or random entries appended."""
    if axis.duplicate:
        part = t / 2 if halve else t
        return torch.cat([part, part], dim)
    if not axis.added:
        return t
    shape = list(t.shape)
    shape[dim] = axis.added
    added = torch.randn(shape, generator=gen) * std if fill == "random" else torch.zeros(shape)
    return torch.cat([t, added.to(t)], dim)


class _Grower:
    """Grows Parameters in place of the old ones, each exactly once (tied and virtual modules
    share the grown tensor), and records the new-entry masks."""

    def __init__(self, gen: torch.Generator, read_std: float | None):
        self.gen = gen
        self.read_std = read_std
        self.grown: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._done: dict[int, nn.Parameter] = {}

    def _replace(self, module: nn.Module, name: str, build) -> None:
        old = getattr(module, name, None)
        if old is None:
            return
        if id(old) not in self._done:
            tensor, mask = build(old.detach())
            new = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
            self._done[id(old)] = new
            self.grown.append((new, mask.to(new.device)))
        setattr(module, name, self._done[id(old)])

    def values(self, module: nn.Module, name: str, axis: Axis, fill_value: float = 0.0) -> None:
        """A tensor holding stream values along its last dim (embeddings, norm gains/biases):
        duplicated as is, or extended with `fill_value`."""
        def build(t):
            if axis.duplicate:
                grown = torch.cat([t, t], -1)
            else:
                grown = torch.cat([t, torch.full((*t.shape[:-1], axis.added), fill_value).to(t)], -1)
            return grown, axis.new_mask().to(t.device).expand_as(grown).clone()
        self._replace(module, name, build)

    def linear(self, module: nn.Module, rows: list[Axis], cols: Axis, conv1d: bool) -> None:
        """A Linear (or GPT-2 Conv1D) whose output is the concatenation of `rows` segments (one,
        or [q | k | v] for a fused projection) and whose input is `cols`."""
        def build(w):
            w = w.T if conv1d else w                     # Linear layout [out, in]
            write_std, read_std = float(w.float().std()), self.read_std
            if read_std is None:
                read_std = float(w.float().std())
            segments = w.split([axis.old for axis in rows])
            w = torch.cat([_extend(seg, 0, axis, False, axis.write_fill, write_std, self.gen)
                           for seg, axis in zip(segments, rows)])
            w = _extend(w, 1, cols, True, cols.read_fill, read_std, self.gen)
            row_mask = torch.cat([axis.new_mask() for axis in rows])
            mask = (row_mask[:, None] | cols.new_mask()[None, :]).to(w.device)
            return (w.T, mask.T) if conv1d else (w, mask)

        def build_bias(b):
            segments = b.split([axis.old for axis in rows])
            grown = torch.cat([_extend(seg, 0, axis, False, "zero", 0.0, self.gen)
                               for seg, axis in zip(segments, rows)])
            return grown, torch.cat([axis.new_mask() for axis in rows]).to(b.device)

        self._replace(module, "weight", build)
        self._replace(module, "bias", build_bias)
        out_features, in_features = sum(axis.new for axis in rows), cols.new
        if conv1d:
            module.nf, module.nx = out_features, in_features
        else:
            module.out_features, module.in_features = out_features, in_features


@dataclass
class _Growth:
    """The widths of one application: the stream and the attention's query/key-value widths."""

    stream: Axis
    q: Axis
    kv: Axis
    heads: int
    kv_heads: int
    head_dim: int


def _head_dim(view) -> int:
    layout = view.family.attention
    if not layout.width_follows_hidden:
        value = getattr(view.config, layout.head_dim_field, None)
        if value:
            return int(value)
    return view.hidden_size // view.num_heads


def _plan_growth(view, params: WidenHiddenParams) -> _Growth:
    """The axes of this growth, or one ValueError naming the field and the fix."""
    hidden, heads, kv_heads = view.hidden_size, view.num_heads, view.num_kv_heads
    head_dim = _head_dim(view)
    if params.init == "duplicate":
        if params.size != hidden:
            raise ValueError(f"size: init = \"duplicate\" doubles d_model, so size must equal the hidden "
                             f"size {hidden} (got {params.size}) — set size = {hidden}, or use init = "
                             "\"zero\" or \"masked\" for other sizes")
        return _Growth(Axis(hidden, duplicate=True), Axis(heads * head_dim, duplicate=True),
                       Axis(kv_heads * head_dim, duplicate=True), 2 * heads, 2 * kv_heads, head_dim)

    read_fill = "zero" if params.init_std == 0 else "random"
    stream = Axis(hidden, added=params.size, write_fill="zero", read_fill=read_fill)
    if not view.family.attention.width_follows_hidden:  # head_dim is stated: the heads stay
        return _Growth(stream, Axis(heads * head_dim), Axis(kv_heads * head_dim), heads, kv_heads, head_dim)
    # heads x head_dim = hidden size here: the new dimensions must form whole new heads
    group = heads // kv_heads
    if params.size % (head_dim * group):
        unit = head_dim * group
        what = f"head_dim {head_dim}" if group == 1 else f"head_dim {head_dim} x the GQA group size {group}"
        raise ValueError(f"size: {view.family.name} derives head_dim from the hidden size ({hidden} = {heads} "
                         f"heads x {head_dim}), so the new dimensions must form whole heads — size must be "
                         f"a multiple of {what} (e.g. {unit} or {2 * unit}), got {params.size}")
    new_heads = params.size // head_dim
    new_kv = new_heads // group
    return _Growth(stream,
                   Axis(heads * head_dim, added=params.size, write_fill="random", read_fill="zero"),
                   Axis(kv_heads * head_dim, added=new_kv * head_dim, write_fill="random", read_fill="zero"),
                   heads + new_heads, kv_heads + new_kv, head_dim)


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
            raise ValueError(f"widen_hidden: '{name}' is a parallel path or adapter "
                             f"({type(module).__name__}), which this operator cannot widen — put "
                             "widen_hidden before it in the plan (or widen_ffn with mode = \"inplace\")")


def _modules_at(root: nn.Module, dotted: str):
    """(module, attribute) pairs for a path whose "*" parts mean every child of a ModuleList;
    attributes a module lacks are skipped (one family entry serves several model types)."""
    *parents, attr = dotted.split(".")
    modules = [root]
    for part in parents:
        modules = [child for m in modules
                   for child in (list(m) if part == "*" else [getattr(m, part, None)]) if child is not None]
    return [(m, attr) for m in modules if hasattr(m, attr)]


def _grow_norm(grower: _Grower, norm: nn.Module, stream: Axis, norm_kind: str) -> None:
    gain = getattr(norm, "weight", None)
    # see the module docstring: LayerNorm's new gain is 0, RMSNorm's the mean gain
    new_gain = float(gain.detach().float().mean()) if norm_kind == "rmsnorm" and gain is not None else 0.0
    grower.values(norm, "weight", stream, fill_value=new_gain)
    grower.values(norm, "bias", stream)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (stream.new,)


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
    if layout.heads_attr:
        setattr(attn, layout.heads_attr, growth.heads)
    for attr in (layout.split_attr, layout.width_attr):
        if attr:
            setattr(attn, attr, growth.q.new)


def _grow_ffn(grower: _Grower, mlp: nn.Module, layout, stream: Axis) -> None:
    """up (and gate) read the stream, down writes it; the FFN's own width stays."""
    units = _linear_shape(getattr(mlp, layout.up), layout.conv1d)[0]
    for name in filter(None, (layout.up, layout.gate)):
        grower.linear(getattr(mlp, name), [Axis(units)], stream, layout.conv1d)
    grower.linear(getattr(mlp, layout.down), [stream], Axis(units), layout.conv1d)


def _linear_shape(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """(out, in) of a Linear, or of a GPT-2 Conv1D (which stores [in, out])."""
    out_features, in_features = module.weight.shape[::-1] if conv1d else module.weight.shape
    return int(out_features), int(in_features)


def _wrap_masked(root: nn.Module, path: str, stream: Axis, kind: str, ramp_steps: int) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, attr, MaskedNorm(getattr(parent, attr), stream.old, kind, ramp_steps))


def _note(view, params: WidenHiddenParams, growth: _Growth, tied: bool) -> str:
    family, hidden = view.family, growth.stream.old
    heads = (f"heads {view.num_heads} -> {growth.heads}" + (f", key/value heads {view.num_kv_heads} -> "
             f"{growth.kv_heads}" if view.num_kv_heads != view.num_heads else "") + f", head_dim {growth.head_dim}"
             if growth.heads != view.num_heads else f"heads unchanged ({growth.heads} x {growth.head_dim})")
    if params.init == "duplicate":
        stats = ("LayerNorm's mean and variance of [x, x] equal those of x" if family.norm_kind == "layernorm"
                 else "RMSNorm's root mean square of [x, x] equals that of x")
        head = ("tied LM head: the final norm's gain and bias halved" if tied
                else "LM head columns [W/2, W/2]")
        return f"exact: d_model {hidden} -> {growth.stream.new} by duplication [x, x] ({stats}); {heads}; {head}"
    norms = ", ".join([*family.norms, family.final_norm.rpartition(".")[2]])
    if params.init == "masked":
        return (f"exact at expansion: d_model {hidden} -> {growth.stream.new}, new dimensions start at zero and "
                f"every norm ({norms}) takes its statistics over the old {hidden} only, the new ones entering "
                f"over {params.ramp_steps} training steps (MSG); {heads}")
    if family.norm_kind == "rmsnorm":
        why = "RMSNorm's mean square now averages over the zero new dimensions too, scaling every norm's output"
    else:
        why = "LayerNorm's mean and variance now run over the zero new dimensions too, shifting and scaling every norm's output"
    return (f"not exact: {why} ({norms}: {hidden} -> {growth.stream.new} dims); {heads}; new dimensions "
            "start at zero; init = \"masked\" is the exact route for this size")


@operator("widen_hidden")
def widen_hidden(view, params: WidenHiddenParams, gen: torch.Generator) -> OpResult:
    model, family = view.model, getattr(view, "family", None)
    if family is None or family.kind != "causal_lm" or family.stacks:
        from engine.arch.families import FAMILIES

        supported = ", ".join(f.name for f in FAMILIES if f.kind == "causal_lm" and not f.stacks)
        name = family.name if family else type(model).__name__
        raise ValueError(f"widen_hidden grows decoder-only language models ({supported}); {name} is not "
                         "supported yet")
    _require_plain_model(model)
    growth = _plan_growth(view, params)
    stream = growth.stream
    grower = _Grower(gen, params.init_std)

    embedding = get_submodule(model, family.embeddings)
    lm_head = get_submodule(model, family.lm_head)
    tied = lm_head.weight is embedding.weight
    for path in filter(None, (family.embeddings, family.position_embeddings)):
        module = get_submodule(model, path)
        grower.values(module, "weight", stream)
        module.embedding_dim = stream.new

    seen: set[int] = set()
    for block in view.blocks():
        if id(block) in seen:
            continue
        seen.add(id(block))
        for norm in family.norms:
            _grow_norm(grower, get_submodule(block, norm), stream, family.norm_kind)
            if params.init == "masked":
                _wrap_masked(block, norm, stream, family.norm_kind, params.ramp_steps)
        _grow_attention(grower, get_submodule(block, family.attention.module), family.attention, growth)
        _grow_ffn(grower, get_submodule(block, family.ffn.module), family.ffn, stream)

    final_norm = get_submodule(model, family.final_norm)
    _grow_norm(grower, final_norm, stream, family.norm_kind)
    if tied and stream.duplicate:
        # the head is the embedding [E, E]: logits = E·y1 + E·y2 = 2 E·y for y1 = y2 = y; halving
        # the final norm's output (gain and bias) gives E·y back
        with torch.no_grad():
            for name in ("weight", "bias"):
                if getattr(final_norm, name, None) is not None:
                    getattr(final_norm, name).mul_(0.5)
    if params.init == "masked":
        _wrap_masked(model, family.final_norm, stream, family.norm_kind, params.ramp_steps)
    # tied: the embedding's grown tensor (shared through the grower); untied: columns grown
    grower.linear(lm_head, [Axis(lm_head.weight.shape[0])], stream, conv1d=False)

    for path in family.hidden_size_attrs:  # sizes modules cached at construction
        for module, attr in _modules_at(model, path):
            setattr(module, attr, stream.new)

    layout = family.attention
    changes = {family.hidden_size_field: stream.new, layout.num_heads_field: growth.heads}
    if layout.num_kv_heads_field:
        changes[layout.num_kv_heads_field] = growth.kv_heads
    if not layout.width_follows_hidden:
        changes[layout.head_dim_field] = growth.head_dim
    if getattr(view.config, family.ffn_size_field, None) is None:
        changes[family.ffn_size_field] = view.ffn_size  # it would follow the new hidden size otherwise
    return OpResult(grown=grower.grown, exact=params.init in ("duplicate", "masked"),
                    note=_note(view, params, growth, tied), config_changes=changes)
