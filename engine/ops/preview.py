"""Parameter preview: what each operator of a plan adds, from the model's config alone.

No torch and no weights: the plan builder calls this on every edit. A model is described as
stacks of blocks, and each block as *parts* (groups of tensors) with an identity: a real copy of
a block gets new identities, a virtual (weight-tied) copy shares them, so summing over distinct
identities counts parameters the way ``model.parameters()`` does (a shared tensor once). Each
block also keeps the shapes of its projections (roles q k v o up down gate; fused-qkv families one
``qkv``), which operators read (LoRA adds r·(in + out)) and change (add_heads widens q/k/v/o, an
in-place widening up/down). Each operator's arithmetic mirrors its implementation in
``engine/ops/*.py``; ``tests/test_tui_builder.py`` holds it equal to the measured
``params_added`` of ``engine.export.build_from_plan``.

``preview_plan(raw)`` takes a raw plan dict (as the builder edits it, possibly invalid) and
returns one ``StagePreview`` per stage (shared stages, then each variant's own), each with its
operators' ``OpPreview`` and the depth every operator sees (the builder sizes its layer toggles
and mapping grid by it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from pydantic import ValidationError

from engine.ops.params import ADAPTER_ROLES, OP_PARAMS, OpParams

# Which projections carry a bias, per config model_type: (config flag, default) or a constant.
# Attention q/k/v, attention output, FFN (up, down, gate).
BIASES: dict[str, dict[str, bool | tuple[str, bool]]] = {
    "gpt_neo": {"qkv": False, "o": True, "ffn": True},
    "gpt2": {"qkv": True, "o": True, "ffn": True},
    "gpt_neox": {"qkv": ("attention_bias", True), "o": ("attention_bias", True), "ffn": True},
    "llama": {"qkv": ("attention_bias", False), "o": ("attention_bias", False), "ffn": ("mlp_bias", False)},
    "mistral": {"qkv": False, "o": False, "ffn": False},
    "qwen2": {"qkv": True, "o": False, "ffn": False},
    "t5": {"qkv": False, "o": False, "ffn": False},
}
# Parameters per norm and hidden unit: LayerNorm has weight and bias, RMSNorm (and T5's norm) a weight.
NORM_PARAMS = {"layernorm": 2, "rmsnorm": 1}
NORM_PARAMS_BY_FAMILY = {"t5": 1}
# Config fields, per family, that the preview needs beyond the architecture description.
POSITIONS_FIELD = {"gpt_neo": "max_position_embeddings", "gpt2": "n_positions"}
TIED_BY_DEFAULT = {"gpt_neo": True, "gpt2": True, "t5": True}


@dataclass
class Proj:
    """A projection's shape as the operators see it (Linear layout: fan_in -> fan_out), and the
    parts that live in or around its tensor: "grown" entries of an in-place growth, "concat"
    tensors of a wrapper that widens it (ConcatLinear, WiderInputLinear), a "delta" beside it
    (ParallelLinear). An in-place growth replaces the tensor: wrappers are merged into it (a delta
    adds into W and disappears) and earlier growths become plain entries, no longer new."""

    fan_in: int
    fan_out: int
    bias: bool
    attached: dict[int, str] = field(default_factory=dict)  # part identity -> grown | concat | delta | merged

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass
class Block:
    projs: dict[str, Proj]          # role -> shape ("qkv" for fused q/k/v)
    parts: dict[int, int]           # part identity -> parameters
    heads: int = 0                  # live query heads (families whose modules keep a count)


@dataclass
class Stack:
    name: str | None
    blocks: list[Block]
    parts: dict[int, int] = field(default_factory=dict)  # held by the stack's first block (T5 position bias)
    table: Proj | None = None  # that table, as a tensor that add_heads grows


class ModelShape:
    """The parameter bookkeeping of one model as a plan grows it."""

    def __init__(self, arch, config):
        self.arch = arch
        self.config = config
        self.family = arch.base_family
        self.kind = self.family.kind
        self.outer = 0                          # embeddings, final norms, head: never grown here
        self.stacks: dict[str | None, Stack] = {}
        self.linears: list[Proj] = []           # nn.Sequential MLPs: Linear i
        self.linear_parts: dict[int, int] = {}  # MLPs: part identity -> parameters
        self.created: dict[int, str] = {}       # part identity -> the stage that made it
        self.stage = "base"
        self.config_heads = 0
        self.config_kv_heads = 0
        self.head_dim = 0
        self._next_key = 0

    def clone(self) -> "ModelShape":
        """An independent copy of the bookkeeping (the config and architecture are shared)."""
        twin = copy.copy(self)
        twin.stacks = copy.deepcopy(self.stacks)
        twin.linears = copy.deepcopy(self.linears)
        twin.linear_parts = dict(self.linear_parts)
        twin.created = dict(self.created)
        return twin

    # -- parts -----------------------------------------------------------------------------------
    def new_key(self) -> int:
        key = self._next_key
        self._next_key += 1
        self.created[key] = self.stage
        return key

    def add_part(self, parts: dict[int, int], size: int) -> None:
        if size:
            parts[self.new_key()] = size

    def alive(self) -> dict[int, int]:
        found = dict(self.linear_parts)
        for stack in self.stacks.values():
            found.update(stack.parts)
            for block in stack.blocks:
                found.update(block.parts)
        return found

    def total(self) -> int:
        return self.outer + sum(self.alive().values())

    def made_in(self, stage: str) -> int:
        return sum(size for key, size in self.alive().items() if self.created.get(key) == stage)

    def attach(self, parts: dict[int, int], proj: Proj, size: int, kind: str) -> None:
        """A new part living with `proj` (see Proj)."""
        if size:
            key = self.new_key()
            parts[key] = size
            proj.attached[key] = kind

    def replace(self, parts: dict[int, int], proj: Proj) -> None:
        """`proj` becomes one plain (wider) tensor: deltas merge into W and vanish, everything
        else stays as entries that are no longer new (a growth's mask marks only its own)."""
        for key, kind in list(proj.attached.items()):
            if kind == "delta":
                parts.pop(key, None)
                del proj.attached[key]
            else:
                self.created[key] = "merged"
                proj.attached[key] = "merged"

    def copy_block(self, block: Block, share: bool) -> Block:
        """A real copy (new identities) or a virtual one (the same tensors)."""
        twin = Block(copy.deepcopy(block.projs), dict(block.parts), block.heads)
        if not share:
            rekey(twin, {key: self.new_key() for key in block.parts})
        return twin

    def depths(self) -> dict[str | None, int]:
        if self.kind == "mlp":
            return {None: max(len(self.linears) - 1, 0)}
        return {name: len(stack.blocks) for name, stack in self.stacks.items()}

    def chosen_stacks(self, params: OpParams) -> list[Stack]:
        stack = getattr(params, "stack", None)
        return [self.stacks[stack]] if stack is not None else list(self.stacks.values())


# ---------------------------------------------------------------------------------------------
# the base model from its config


def _bias(model_type: str, group: str, config) -> bool:
    rule = BIASES.get(model_type, BIASES.get("llama"))[group]
    if isinstance(rule, tuple):
        flag, default = rule
        value = getattr(config, flag, default)
        return default if value is None else bool(value)
    return rule


def rekey(block: Block, new_keys: dict[int, int]) -> None:
    """Give some of a block's parts new identities (own copies of them)."""
    block.parts = {new_keys.get(k, k): s for k, s in block.parts.items()}
    for proj in block.projs.values():
        proj.attached = {new_keys.get(k, k): kind for k, kind in proj.attached.items()}


def base_shape(spec) -> ModelShape:
    """The shape of the plan's model (a ModelSpec), from its config (no weights)."""
    from engine.models import BUILTIN_MLPS, load_architecture

    name = spec.source.removeprefix("builtin:")
    if spec.source.startswith("builtin:") and name in BUILTIN_MLPS:
        return _mlp_shape(BUILTIN_MLPS[name])
    arch = load_architecture(spec)
    return _transformer_shape(arch)


def _mlp_shape(fields: dict) -> ModelShape:
    from engine.arch.families import family_for

    class _Arch:  # the MLP needs no config: its layer sizes are the built-in's fields
        base_family = family_for("sequential")

    shape = ModelShape(_Arch(), None)
    shape.outer = fields["vocab_size"] * fields["embedding"]
    widths = [fields["embedding"], *fields["hidden"], fields["vocab_size"]]
    for fan_in, fan_out in zip(widths, widths[1:]):
        proj = Proj(fan_in, fan_out, True)
        shape.linears.append(proj)
        shape.add_part(shape.linear_parts, proj.params)
    shape.stacks = {None: Stack(None, [])}
    return shape


def _transformer_shape(arch) -> ModelShape:
    config, family = arch.config, arch.base_family
    model_type = getattr(config, "model_type", family.name)
    shape = ModelShape(arch, config)
    d = arch.hidden_size
    heads = arch.num_heads
    kv_heads = arch.num_kv_heads
    head_dim = getattr(config, family.attention.head_dim_field, None) or d // heads
    shape.config_heads, shape.config_kv_heads, shape.head_dim = heads, kv_heads, head_dim
    attn_bias, out_bias, ffn_bias = (_bias(model_type, g, config) for g in ("qkv", "o", "ffn"))
    norm = NORM_PARAMS_BY_FAMILY.get(family.name, NORM_PARAMS[family.norm_kind]) * d
    vocab = config.vocab_size

    shape.outer = vocab * d  # token embedding
    if family.position_embeddings:
        shape.outer += getattr(config, POSITIONS_FIELD.get(family.name, "max_position_embeddings")) * d
    tied = getattr(config, "tie_word_embeddings", TIED_BY_DEFAULT.get(family.name, False))
    if not tied:
        shape.outer += vocab * d  # the output head (no bias in any family here)

    for view in arch.stacks():
        layout = view.family
        ffn = view.ffn_size
        shape.outer += norm  # the stack's final norm

        def attention(cross: bool) -> dict[str, Proj]:
            projs = {"o": Proj(heads * head_dim, d, out_bias)}
            if layout.attention.qkv and not cross:
                projs["qkv"] = Proj(d, 3 * heads * head_dim, attn_bias)
            else:
                projs.update(q=Proj(d, heads * head_dim, attn_bias), k=Proj(d, kv_heads * head_dim, attn_bias),
                             v=Proj(d, kv_heads * head_dim, attn_bias))
            return projs

        stack = Stack(view.stack, [])
        for _ in range(view.num_layers):
            projs = attention(cross=False)
            projs["up"] = Proj(d, ffn, ffn_bias)
            projs["down"] = Proj(ffn, d, ffn_bias)
            if layout.ffn.gate:
                projs["gate"] = Proj(d, ffn, ffn_bias)
            block = Block(projs, {}, heads)
            # norms: one per sublayer; a cross-attention sublayer (T5 decoder) has its own
            sublayer_norms = (len(layout.norms) + len(layout.extra_outputs)) * norm
            cross = sum(p.params for _ in layout.extra_outputs for p in attention(cross=True).values())
            shape.add_part(block.parts, sum(p.params for p in projs.values()) + sublayer_norms + cross)
            stack.blocks.append(block)
        if layout.attention.per_head_embedding:  # T5: relative position bias, one column per head
            shape.add_part(stack.parts, config.relative_attention_num_buckets * heads)
            stack.table = Proj(config.relative_attention_num_buckets, heads, False)
        shape.stacks[view.stack] = stack
    return shape


# ---------------------------------------------------------------------------------------------
# the operators: each changes `shape` as its implementation changes the model

PreviewFn = Callable[[ModelShape, OpParams], str]
PREVIEWS: dict[str, PreviewFn] = {}


def previews(name: str):
    def register(fn: PreviewFn) -> PreviewFn:
        PREVIEWS[name] = fn
        return fn
    return register


def _layers(shape: ModelShape, stack: Stack, params: OpParams) -> list[int]:
    chosen = params.layer_indices(len(stack.blocks))
    bad = [i for i in chosen if i >= len(stack.blocks)]
    if bad:
        raise ValueError(f"layer {bad[0]} out of range")
    return chosen


@previews("widen_ffn")
def _widen_ffn(shape, params) -> str:
    for stack in shape.chosen_stacks(params):
        for i in _layers(shape, stack, params):
            block = stack.blocks[i]
            up, down, gate = block.projs["up"], block.projs["down"], block.projs.get("gate")
            size = params.size
            # incoming rows (+ bias), outgoing columns (the down bias is not grown), gate rows
            growth = [(up, size * (up.fan_in + up.bias)), (down, down.fan_out * size)]
            growth += [(gate, size * gate.fan_in)] if gate else []
            if params.mode == "parallel":  # a separate path beside the FFN; its matrices unchanged
                shape.add_part(block.parts, sum(n for _, n in growth))
                continue
            for proj, n in growth:  # wider matrices: later operators see them
                shape.replace(block.parts, proj)
                shape.attach(block.parts, proj, n, "grown")
            up.fan_out += size
            down.fan_in += size
            if gate:
                gate.fan_out += size
    return ""


@previews("widen_mlp")
def _widen_mlp(shape, params) -> str:
    for i in params.layer_indices(len(shape.linears) - 1):
        up, down = shape.linears[i], shape.linears[i + 1]
        kind = "concat" if params.mode == "parallel" else "grown"  # beside the Linears, or in them
        if kind == "grown":
            shape.replace(shape.linear_parts, up)
            shape.replace(shape.linear_parts, down)
        shape.attach(shape.linear_parts, up, params.size * (up.fan_in + up.bias), kind)
        shape.attach(shape.linear_parts, down, down.fan_out * params.size, kind)
        up.fan_out += params.size  # parallel paths read as one wider Linear too
        down.fan_in += params.size
    return ""


@previews("add_heads")
def _add_heads(shape, params) -> str:
    layout = shape.family.attention
    for stack in shape.chosen_stacks(params):
        heads, kv_heads = shape.config_heads, shape.config_kv_heads
        if layout.heads_attr:  # the live count of the first block, as engine.ops.heads reads it
            heads = stack.blocks[0].heads
            kv_heads = heads if not layout.num_kv_heads_field else kv_heads
        group = heads // kv_heads
        if params.size % group:
            raise ValueError(f"size {params.size} is not a multiple of the GQA group size {group}")
        new_kv, hd, size = params.size // group, shape.head_dim, params.size
        layers = _layers(shape, stack, params)
        for i in layers:
            block = stack.blocks[i]
            rows = [("qkv", 3 * size)] if "qkv" in block.projs else [("q", size), ("k", new_kv), ("v", new_kv)]
            for role, count in rows:  # new rows (+ bias) of the query/key/value projections
                proj = block.projs[role]
                shape.replace(block.parts, proj)
                shape.attach(block.parts, proj, count * hd * (proj.fan_in + proj.bias), "grown")
                proj.fan_out += count * hd
            out = block.projs["o"]
            shape.replace(block.parts, out)
            shape.attach(block.parts, out, out.fan_out * size * hd, "grown")  # zero input columns
            out.fan_in += size * hd
            block.heads += size
        if layout.per_head_embedding and stack.table is not None:  # T5: the position bias, a column per head
            shape.replace(stack.parts, stack.table)
            shape.attach(stack.parts, stack.table, shape.config.relative_attention_num_buckets * size, "grown")
        all_layers = layers == list(range(len(stack.blocks)))
        if all_layers and hasattr(shape.config, layout.head_dim_field) and not shape.family.stacks:
            shape.config_heads += size
            shape.config_kv_heads += new_kv
    return ""


def _role_key(shape: ModelShape, name) -> str | None:
    """The projection a role or dotted path names ("qkv" for q/k/v of fused families)."""
    att, ffn = shape.family.attention, shape.family.ffn
    if name in ("q", "k", "v"):
        return "qkv" if att.qkv else name
    if name in ADAPTER_ROLES:
        return name
    paths = {f"{att.module}.{att.out}": "o", f"{ffn.module}.{ffn.up}": "up", f"{ffn.module}.{ffn.down}": "down"}
    if ffn.gate:
        paths[f"{ffn.module}.{ffn.gate}"] = "gate"
    if att.qkv:
        paths[f"{att.module}.{att.qkv}"] = "qkv"
    else:
        paths.update({f"{att.module}.{getattr(att, r)}": r for r in ("q", "k", "v")})
    return paths.get(name)


def _targets(shape: ModelShape, params, block: Block) -> list[Proj]:
    keys = []
    for name in params.modules:
        key = _role_key(shape, name)
        if key is None or key not in block.projs:
            raise ValueError(f"'{name}' is not a projection the preview knows")
        if key not in keys:
            keys.append(key)
    return [block.projs[k] for k in keys]


@previews("concat_linear")
def _concat_linear(shape, params) -> str:
    size = params.size
    if shape.kind == "mlp":
        for index in params.modules:
            producer, consumer = shape.linears[index], shape.linears[index + 1]
            shape.attach(shape.linear_parts, producer, size * (producer.fan_in + producer.bias), "concat")
            shape.attach(shape.linear_parts, consumer, consumer.fan_out * size, "concat")
            producer.fan_out += size
            consumer.fan_in += size
        return ""
    for stack in shape.chosen_stacks(params):
        for i in _layers(shape, stack, params):
            block = stack.blocks[i]
            producers = [block.projs[r] for r in ("up", "gate") if r in block.projs]
            down = block.projs["down"]
            for p in producers:
                shape.attach(block.parts, p, size * (p.fan_in + p.bias), "concat")
            shape.attach(block.parts, down, down.fan_out * size, "concat")
            for p in producers:
                p.fan_out += size
            down.fan_in += size
    return ""


@previews("parallel_linear")
def _parallel_linear(shape, params) -> str:
    if shape.kind == "mlp":
        for index in dict.fromkeys(params.modules):
            proj = shape.linears[index]
            shape.attach(shape.linear_parts, proj, proj.fan_in * proj.fan_out, "delta")
        return ""
    for stack in shape.chosen_stacks(params):
        for i in _layers(shape, stack, params):
            block = stack.blocks[i]
            for proj in _targets(shape, params, block):
                shape.attach(block.parts, proj, proj.fan_in * proj.fan_out, "delta")
    return ""


@previews("lora")
def _lora(shape, params) -> str:
    for stack in shape.chosen_stacks(params):
        for i in _layers(shape, stack, params):
            block = stack.blocks[i]
            shape.add_part(block.parts, sum(params.r * (p.fan_in + p.fan_out) for p in _targets(shape, params, block)))
    return ""


@previews("ia3")
def _ia3(shape, params) -> str:
    feedforward = {_role_key(shape, r) for r in params.feedforward_roles()}
    for stack in shape.chosen_stacks(params):
        for i in _layers(shape, stack, params):
            block = stack.blocks[i]
            keys = list(dict.fromkeys(_role_key(shape, r) for r in params.modules))
            shape.add_part(block.parts, sum(block.projs[k].fan_in if k in feedforward else block.projs[k].fan_out
                                            for k in keys))
    return ""


@previews("insert_identity")
def _insert_identity(shape, params) -> str:
    for stack in shape.chosen_stacks(params):
        after = set(_layers(shape, stack, params))
        new = []
        for i, block in enumerate(stack.blocks):
            new.append(block)
            if i in after:
                new.append(shape.copy_block(block, share=False))
        stack.blocks = new
    return ""


def _shared_keys(stack: Stack, index: int) -> set[int]:
    mine = set(stack.blocks[index].parts)
    others = {k for j, b in enumerate(stack.blocks) if j != index for k in b.parts}
    return mine & others


def _own_copies(shape: ModelShape, block: Block, keys: set[int]) -> None:
    rekey(block, {key: shape.new_key() for key in keys})


@previews("split_residual")
def _split_residual(shape, params) -> str:
    for stack in shape.chosen_stacks(params):
        chosen = set(_layers(shape, stack, params))
        new = []
        for i, block in enumerate(stack.blocks):
            if i in chosen:
                _own_copies(shape, block, _shared_keys(stack, i))  # scaling must not touch a twin
                new += [block] + [shape.copy_block(block, share=False) for _ in range(params.k - 1)]
            else:
                new.append(block)
        stack.blocks = new
    return ""


@previews("map_layers")
def _map_layers(shape, params) -> str:
    notes = []
    for stack in shape.chosen_stacks(params):
        mapping = params.resolve(len(stack.blocks))
        if any(m >= len(stack.blocks) for m in mapping):
            raise ValueError("mapping out of range")
        kinds = params.resolve_kinds(mapping)
        new, seen = [], set()
        for source, kind in zip(mapping, kinds):
            block = stack.blocks[source]
            if source not in seen:  # a source's first occurrence is the source block itself
                seen.add(source)
                new.append(block)
            else:
                new.append(shape.copy_block(block, share=kind == "virtual"))
        stack.blocks = new
        virtual = sum(1 for i, (s, k) in enumerate(zip(mapping, kinds)) if k == "virtual" and s in mapping[:i])
        notes.append(f"{len(mapping)} blocks, {virtual} virtual")
    return "; ".join(notes)


@previews("unshare")
def _unshare(shape, params) -> str:
    for stack in shape.chosen_stacks(params):
        for i in _layers(shape, stack, params):
            _own_copies(shape, stack.blocks[i], _shared_keys(stack, i))
    return ""


# ---------------------------------------------------------------------------------------------
# a whole plan


@dataclass
class OpPreview:
    path: str                      # "stages.1.expand.0"
    op: str
    depth: dict                    # stack -> blocks before this operator
    added: int | None              # None: not previewed (invalid settings, or an op the preview lacks)
    note: str = ""


@dataclass
class StagePreview:
    path: str                      # "stages.1" or "variants.0.stages.0"
    label: str
    variant: str | None
    total_before: int | None
    total_after: int | None
    trainable: int | None          # None: freeze names globs (depends on parameter names)
    ops: list[OpPreview] = field(default_factory=list)
    note: str = ""

    @property
    def added(self) -> int | None:
        if self.total_before is None or self.total_after is None:
            return None
        return self.total_after - self.total_before

    @property
    def uncounted(self) -> int:
        """Operators the preview could not count (invalid settings): the figures leave them out."""
        return sum(1 for op in self.ops if op.added is None)

    @property
    def share(self) -> float | None:
        if self.trainable is None or not self.total_after:
            return None
        return self.trainable / self.total_after


@dataclass
class PlanPreview:
    base_total: int | None
    stages: list[StagePreview] = field(default_factory=list)
    error: str = ""                # why nothing could be previewed (e.g. the model config)

    def op_depths(self) -> dict[str, dict]:
        return {op.path: op.depth for stage in self.stages for op in stage.ops}


def preview_op(shape: ModelShape, raw: dict) -> tuple[int | None, str]:
    """Apply one raw operator table to `shape`; (parameters added or None, note)."""
    name = raw.get("op") if isinstance(raw, dict) else None
    if name not in OP_PARAMS:
        return None, "unknown op"
    try:
        params = OP_PARAMS[name].model_validate(raw)
    except ValidationError:
        return None, "invalid settings"
    if name not in PREVIEWS:
        return None, f"{name} is not previewed — `widen plan show` measures it"
    if shape.kind not in params.model_kinds:
        return None, f"{name} does not apply to this model"
    before, saved = shape.total(), shape.clone()
    try:
        note = PREVIEWS[name](shape, params)
    except (ValueError, IndexError, KeyError) as e:  # leave the shape as it was: later ops still preview
        shape.__dict__.update(saved.__dict__)
        return None, str(e)
    return shape.total() - before, note


def _stage_label(stage: dict, index: int) -> str:
    return str(stage.get("name") or f"{index + 1}:{stage.get('task', '?')}")


def _preview_stages(shape: ModelShape, stages: list, where: str, variant: str | None, offset: int) -> list[StagePreview]:
    out = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        path = f"{where}.{i}"
        shape.stage = path
        before = shape.total()
        preview = StagePreview(path, _stage_label(stage, offset + i), variant, before, None, None)
        ops = stage.get("expand") if isinstance(stage.get("expand"), list) else []
        for j, raw in enumerate(ops):
            depth = shape.depths()
            added, note = preview_op(shape, raw)
            preview.ops.append(OpPreview(f"{path}.expand.{j}", str(raw.get("op", "?")) if isinstance(raw, dict) else "?",
                                         depth, added, note))
        grow = stage.get("grow")
        if isinstance(grow, dict) and isinstance(grow.get("expand"), list):
            # growth happens mid-stage when the loss plateaus: shown, not counted in the stage's total
            trial = shape.clone()
            for j, raw in enumerate(grow["expand"]):
                depth = trial.depths()
                added, note = preview_op(trial, raw)
                preview.ops.append(OpPreview(f"{path}.grow.expand.{j}", str(raw.get("op", "?")), depth, added,
                                             "per growth (on a plateau)" + (f"; {note}" if note else "")))
        preview.total_after = shape.total()
        freeze = stage.get("freeze", "none")
        if freeze == "base":
            preview.trainable = shape.made_in(path)
        elif freeze == "none":
            preview.trainable = preview.total_after
        else:
            preview.note = "freeze names globs: trainable depends on parameter names"
        out.append(preview)
    return out


def preview_plan(raw: dict, load_shape: Callable | None = None) -> PlanPreview:
    """Preview every stage of a raw plan dict; lenient: invalid parts are skipped, not raised.
    `load_shape(model_table)` returns a fresh ModelShape (default: ``base_shape`` of its ModelSpec)."""
    from engine.plan import ModelSpec

    def shape_for(model_raw) -> ModelShape:
        spec = ModelSpec.model_validate(model_raw or {})
        return load_shape(spec) if load_shape else base_shape(spec)

    try:
        shape = shape_for(raw.get("model"))
    except Exception as e:  # a config that cannot load: the plan check names it
        return PlanPreview(None, error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    result = PlanPreview(shape.total())
    result.stages += _preview_stages(shape, shared, "stages", None, 0)
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    for v, variant in enumerate(variants):
        if not isinstance(variant, dict):
            continue
        name = str(variant.get("name", v))
        if variant.get("model") is not None:
            try:
                own = shape_for(variant["model"])
            except Exception:
                continue
            _preview_stages(own, shared, "stages", name, 0)  # the shared stages, on this model
        else:
            own = shape.clone()
        vstages = variant.get("stages") if isinstance(variant.get("stages"), list) else []
        result.stages += _preview_stages(own, vstages, f"variants.{v}.stages", name, len(shared))
    return result
