"""Every expansion operator, described once: its parameters as a pydantic model, and on that
model (``@register_op``) its descriptor — name, implementation (a dotted path), capabilities,
builder order and docs row (``OPS``).

This is the single place that says which ops exist and which keys an ``[[stages.expand]]`` table
may hold for each ``op``. It imports no torch, so the plan checker, the CLI and the TUI can use it
cheaply; an op's implementation (``engine/ops/*.py``) is imported only when the op is applied
(``engine.ops.registry``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from engine.names import name_problem
from engine.ops.mapping_families import FAMILIES_BY_NAME


def _not_bool(value):
    """TOML true/false are not numbers (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {str(value).lower()} — write a number, not true/false")
    return value


# Numbers of a plan: bools refused (ints still read as floats: `lr = 1` works). Every model of a
# plan also sets allow_inf_nan=False, so no float field takes inf or nan.
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]

# Bounds shared by the operators (and the plan): far above any real model, far below what would
# overflow an allocation or a loop.
MAX_UNITS = 1 << 16        # units / features / d_model dimensions added per layer
MAX_HEADS = 1 << 10        # attention heads added per layer
MAX_RANK = 1 << 14         # LoRA rank
MAX_DEPTH = 1 << 10        # blocks of a stack after a depth operator; entries of a mapping
MAX_STEPS = 10 ** 9        # training steps (stages, ramps, intervals)
MAX_SCALE = 1e3            # stds, noise, constants, scales of initialisations
MAX_LINEAR_INDEX = 1 << 10  # Linear indices of an nn.Sequential

LayerSelection = Union[Literal["all"], list[Int]]


class OpParams(BaseModel):
    """Keys shared by every operator."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    op: str
    stack: str | None = Field(None, description='models with several stacks (T5): "encoder" or "decoder"; '
                              "default: every stack")

    # the model kinds (engine.model.forward: causal_lm, seq2seq, mlp) the op applies to;
    # engine.ops.registry.apply_operator refuses the others with one clear error
    model_kinds: ClassVar[tuple[str, ...]] = ("causal_lm", "seq2seq")

    def layer_indices(self, num_layers: int) -> list[int]:
        """The chosen layers, resolved against the model's depth."""
        layers = getattr(self, "layers", "all")
        if layers == "all":
            return list(range(num_layers))
        outside = [i for i in layers if not 0 <= i < num_layers]
        if outside:  # the plan check says so before a run; the Python API reaches this directly
            raise ValueError(f"{self.source_field}: layer {outside[0]} out of range — the model has {num_layers} "
                             f"layers (0..{num_layers - 1})")
        return list(layers)

    def num_layers_after(self, num_layers: int) -> int:
        """Depth of the model after this operator (width operators keep it)."""
        return num_layers

    # the key whose block indices must exist in the model at this point of the plan
    source_field: ClassVar[str] = "layers"

    def source_layers(self) -> list[int]:
        """Block indices this operator reads, each < the depth at this point (the plan check
        reports the others against `source_field`); "all" names none."""
        layers = getattr(self, "layers", "all")
        return [] if layers == "all" else list(layers)

    def depth_problems(self, num_layers: int) -> list[tuple[str, str]]:
        """(field, message) for settings that do not fit a model of this depth."""
        return []

    def growth_defaults(self) -> dict:
        """Settings this op takes by default inside ``[stages.grow]`` when the plan leaves them out
        (engine.plan.GrowSpec fills them in): none, unless the op copies units — a mid-run
        growth's copies must not stay twins of their sources."""
        return {}


class LayeredOpParams(OpParams):
    layers: LayerSelection = Field("all", description='"all" or a list of block indices')

    @field_validator("layers")
    @classmethod
    def _non_negative(cls, v):
        if isinstance(v, list):
            bad = [i for i in v if i < 0]
            if bad:
                raise ValueError(f"layer indices must be >= 0, got {bad} — blocks count from 0; use indices or \"all\"")
            if len(set(v)) != len(v):
                raise ValueError(f"layer indices repeat: {v}")
        return v


# ---------------------------------------------------------------------------------------------
# operator descriptors: each op is described once, by the decorator on its schema class


@dataclass(frozen=True)
class OpDescriptor:
    """Everything widen knows about one expansion operator, declared once (``@register_op`` on its
    schema): the schema (which keys a plan's ``[[stages.expand]]`` table may hold), the dotted
    path of its implementation (imported only when the op runs, so this module stays torch-free;
    the meta-device preview runs that same implementation), its capabilities, and its row of
    docs/operators.md (``operators_table_markdown``)."""

    name: str                    # the plan's `op`
    schema: type[OpParams]
    implementation: str          # "module:function", `fn(view, params, generator) -> OpResult`
    builder_order: int           # position in the builder's op list and in docs/operators.md
    # docs/operators.md, one markdown cell each
    does: str                    # what it does (what it grows)
    exact: str                   # whether it preserves the function by construction
    adds: str                    # the parameters it adds
    families: str                # a note on where it applies (the list itself comes from the family table)
    # capabilities
    task_module: bool = False    # its additions are separate, switchable paths (engine.grow.task_modules)
    parallel_mode: bool = False  # ... only with mode = "parallel" (in place it rewrites the base)
    # applied to layers [a, b, ...] it does what it does applied to [a], then [b], ... with the same
    # generator (each block's draws in layer order, nothing outside the blocks): an FSDP run grows
    # it one unit at a time (engine.train.unit_growth), never holding the whole model
    per_block: bool = False
    # it changes the block list, each new block a copy of one old block transformed alone, with
    # no random draw: an FSDP run rebuilds it one source block at a time (engine.train.unit_growth)
    block_list: bool = False
    # it changes the root, walks the blocks once in order touching only the current one, then the
    # root again: an FSDP run gives each block its values as the walk reaches it
    in_order: bool = False

    @property
    def summary(self) -> str:
        """One line: the first paragraph of the schema's docstring."""
        return " ".join((self.schema.__doc__ or "").strip().split("\n\n")[0].split())

    @property
    def model_kinds(self) -> tuple[str, ...]:
        return self.schema.model_kinds

    def load(self):
        """The implementation (imports its module, which imports torch)."""
        import importlib

        module, _, function = self.implementation.partition(":")
        return getattr(importlib.import_module(module), function)


# op name -> descriptor, in builder order. The plan checker rejects any op not listed here.
OPS: dict[str, OpDescriptor] = {}


def register_op(*, implementation: str, builder_order: int, does: str, exact: str, adds: str, families: str,
                task_module: bool = False, parallel_mode: bool = False, per_block: bool = False,
                block_list: bool = False, in_order: bool = False):
    """Class decorator: describe the op whose schema it decorates (its name: the default of the
    schema's `op` field) and register it in ``OPS``."""

    def register(schema: type[OpParams]) -> type[OpParams]:
        name = schema.model_fields["op"].default
        module, _, function = implementation.partition(":")
        problems = []
        if not isinstance(name, str) or not name:
            problems.append("the schema's `op` field needs a default: the op's name")
        elif name in OPS:
            problems.append(f"op '{name}' is already registered (by {OPS[name].schema.__name__})")
        if not module or not function.isidentifier():
            problems.append(f"implementation {implementation!r} is not 'module:function'")
        taken = [d.name for d in OPS.values() if d.builder_order == builder_order]
        if taken:
            problems.append(f"builder_order {builder_order} is already {taken[0]}'s")
        if problems:
            raise ValueError(f"{schema.__name__}: " + "; ".join(problems))
        descriptor = OpDescriptor(name=name, schema=schema, implementation=implementation,
                                  builder_order=builder_order, does=does, exact=exact, adds=adds,
                                  families=families, task_module=task_module, parallel_mode=parallel_mode,
                                  per_block=per_block, block_list=block_list, in_order=in_order)
        ordered = sorted([*OPS.values(), descriptor], key=lambda d: d.builder_order)
        OPS.clear()
        OPS.update((d.name, d) for d in ordered)
        return schema

    return register


OPERATORS_TABLE_HEADER = ("| op | what it does | exact | parameters it adds | under FSDP | families |\n"
                          "|---|---|---|---|---|---|\n")


def applicable_families(d: OpDescriptor) -> list[str]:
    """The families an op applies to, from the family table (engine.model.families): those of a
    model kind its schema takes that do not refuse it. Model types a family entry also serves
    follow in brackets: "llama (mistral, qwen2)"."""
    from engine.model.families import FAMILIES

    return [f.name + (f" ({', '.join(f.model_types[1:])})" if len(f.model_types) > 1 and f.kind != "mlp" else "")
            for f in FAMILIES if f.kind in d.schema.model_kinds and f.refusal(d.name) is None]


def families_cell(d: OpDescriptor) -> str:
    return ", ".join(applicable_families(d)) + (f" — {d.families}" if d.families else "")


def fsdp_cell(d: OpDescriptor) -> str:
    """How an FSDP run applies the op (docs/scale.md): one unit at a time, or gathered whole."""
    if "mlp" in d.model_kinds and len(d.model_kinds) == 1:
        return "whole (a plain MLP is one unit)"
    if d.in_order:
        return "one block at a time as it walks them (alone in its stage, no weight-tied blocks; else whole)"
    if d.block_list:
        return "one source block at a time (last in its stage, no weight-tied blocks before it; else whole)"
    return "one unit at a time (T5's two stacks: whole)" if d.per_block else "gathers the model whole"


def operators_table_markdown(descriptors=None) -> str:
    """The summary table of docs/operators.md, one row per descriptor (default: every registered
    op), in builder order; ``python -m engine.ops.docs`` writes it into the page."""
    descriptors = OPS.values() if descriptors is None else descriptors

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    rows = [f"| `{d.name}` | {cell(d.does)} | {cell(d.exact)} | {cell(d.adds)} | {fsdp_cell(d)} | "
            f"{cell(families_cell(d))} |\n"
            for d in sorted(descriptors, key=lambda d: d.builder_order)]
    return OPERATORS_TABLE_HEADER + "".join(rows)


WidthInit = Literal["zero_out", "net2net", "copy_halve", "zeros", "constant", "random"]
# How copies break their symmetry inside [stages.grow] when the plan does not say (growth_defaults).
# "noise", not "split": under Adam a split leaves the copies' incoming gradients proportional, and
# Adam's update does not see a gradient's scale (measured, tests/engine/grow/test_growth_triggers.py).
GROWTH_SYMMETRY = "noise"


@register_op(implementation="engine.ops.width:widen_ffn", per_block=True, builder_order=10, task_module=True, parallel_mode=True,
             does='adds `size` hidden units to each chosen block\'s FFN; `mode = "parallel"` (separate trainable '
                  'path beside the frozen FFN) or `"inplace"` (wider matrices, gradient-masked)',
             exact="yes for `zero_out`, `zeros`, `constant`, `net2net`/`copy_halve` without noise; no for `random`",
             adds="`size` × (d_model [+ d_model for gated MLPs] + d_model) (+ biases) per layer; × the experts "
                  "in a sparse block",
             families="MoE families: every expert of a sparse block grows (and the dense FFN of a dense one); "
                      "expert widths keep 16-byte strides (grouped_mm: multiples of 4 in float32, 8 in bfloat16)")
class WidenFFNParams(LayeredOpParams):
    """Add `size` hidden units to the feed-forward network of each chosen block."""

    op: Literal["widen_ffn"] = "widen_ffn"
    size: Int = Field(..., gt=0, le=MAX_UNITS, description="number of hidden units to add per layer")
    init: WidthInit = "zero_out"
    mode: Literal["parallel", "inplace"] | None = Field(
        None, description='default: "inplace" for the splitting inits (net2net, copy_halve), else "parallel"',
        json_schema_extra={"default_text": "follows init"})
    noise: Float = Field(0.0, ge=0, le=MAX_SCALE, description="relative noise added by net2net/copy_halve")
    init_std: Float | None = Field(None, gt=0, le=MAX_SCALE, description="std of random incoming weights "
                                   "(default: the std of the existing incoming weights)")
    value: Float = Field(0.01, ge=-MAX_SCALE, le=MAX_SCALE, description="the weight used by init = constant")
    symmetry: Literal["none", "split", "noise"] = Field(
        "none", description="net2net/copy_halve: how a unit's copies stop being twins, exactly (split: unequal "
        "outgoing shares; noise: paired outgoing noise that cancels); inside [stages.grow] the default is noise")
    symmetry_scale: Float = Field(0.5, gt=0, lt=1, description="split: shares (1 ± scale)/c at the ends; noise: std "
                                  "relative to the outgoing weights' std / c")

    @model_validator(mode="after")
    def _splitting_needs_inplace(self):
        splitting = self.init in ("net2net", "copy_halve")
        if self.mode is None:  # the default follows the init: a split rewrites the original units
            self.mode = "inplace" if splitting else "parallel"
        if splitting and self.mode == "parallel":
            raise ValueError(f"init = \"{self.init}\" rescales the original units' outgoing weights, "
                             "which a parallel path leaves untouched — set mode = \"inplace\"")
        return self

    @model_validator(mode="after")
    def _symmetry_of_copies(self):
        if self.symmetry != "none" and self.init not in ("net2net", "copy_halve"):
            raise ValueError(f'symmetry breaks the copies of init = "net2net" or "copy_halve"; init = "{self.init}" '
                             "copies no unit — remove symmetry")
        if self.symmetry == "none" and "symmetry_scale" in self.model_fields_set:
            raise ValueError('symmetry_scale belongs to symmetry = "split" or "noise" — remove it or set symmetry')
        return self

    def growth_defaults(self) -> dict:
        if self.init in ("net2net", "copy_halve") and "symmetry" not in self.model_fields_set:
            return {"symmetry": GROWTH_SYMMETRY}
        return {}


@register_op(implementation="engine.ops.linear:widen_mlp", builder_order=20, task_module=True, parallel_mode=True,
             does="the same on hidden layer i (the output of Linear i) of an `nn.Sequential` MLP: `parallel` (a "
                  "trainable Linear beside Linear i, read through new columns of Linear i+1) or `inplace`; only "
                  "elementwise modules may sit between the two",
             exact="as `widen_ffn`",
             adds="`size` × (fan-in + 1 + fan-out) per hidden layer",
             families="")
class WidenMLPParams(WidenFFNParams):
    """Add `size` units to hidden layers of a plain nn.Sequential MLP (hidden layer i: the output
    of its i-th Linear, read by Linear i+1 through elementwise modules). Inits, modes and defaults
    as widen_ffn: `parallel` keeps the Linears and adds the units beside them (their incoming
    rows in a separate trainable Linear, their outgoing weights as new input columns of the next
    Linear); `inplace` makes the matrices wider. Same function."""

    op: Literal["widen_mlp"] = "widen_mlp"
    layers: LayerSelection = Field("all", description='"all" or a list of hidden layer indices')
    model_kinds: ClassVar[tuple[str, ...]] = ("mlp",)

    def model_problems(self, family) -> list[tuple[str, str]]:
        if family.kind not in self.model_kinds:
            return [("op", f"widen_mlp grows the hidden layers of an nn.Sequential MLP — {family.name} models "
                           "grow their FFNs with op = \"widen_ffn\"")]
        return []


# A Linear named for concat_linear / parallel_linear: on transformer blocks a role (see
# ADAPTER_ROLES) or a dotted path inside the block ("mlp.c_fc"); on an nn.Sequential its index
# among the Linears.
ModuleNames = list[Union[Annotated[Int, Field(le=MAX_LINEAR_INDEX)], str]]


class LinearOpParams(LayeredOpParams):
    """Keys shared by the operators on single Linear modules."""

    modules: ModuleNames = Field(..., min_length=1)
    model_kinds: ClassVar[tuple[str, ...]] = ("causal_lm", "seq2seq", "mlp")

    @field_validator("modules")
    @classmethod
    def _distinct_names(cls, v):
        bad = [m for m in v if (isinstance(m, int) and m < 0) or (isinstance(m, str) and not m.strip(". "))]
        if bad:
            raise ValueError(f"{bad}: name Linears by role (q k v o up down gate), by dotted path inside a "
                             "block (\"mlp.c_fc\") or, on an nn.Sequential, by index >= 0")
        if len(set(v)) != len(v):
            raise ValueError(f"modules repeat: {v}")
        return v

    def model_problems(self, family) -> list[tuple[str, str]]:
        """(field, message) for names this family cannot have (dotted paths are checked on the model)."""
        if family.kind == "mlp":
            names = [m for m in self.modules if not isinstance(m, int)]
            if names:
                return [("modules", f"{names}: an nn.Sequential has no named blocks — name its Linears by index "
                                    "(0 = the first Linear)")]
            return []
        indices = [m for m in self.modules if isinstance(m, int)]
        if indices:
            return [("modules", f"{indices}: Linear indices name the layers of an nn.Sequential — on {family.name} "
                                f"blocks name roles ({', '.join(ADAPTER_ROLES)}) or dotted paths")]
        expert_roles = moe_role_problem(family, self.modules)
        if expert_roles:
            return [("modules", expert_roles)]
        if "gate" in self.modules and not family.ffn.gate:
            return [("modules", f"role 'gate' does not exist in {family.name} models (their MLP has no gate "
                                "projection) — use up, down or the attention roles")]
        return []


@register_op(implementation="engine.ops.linear:concat_linear", per_block=True, builder_order=50, task_module=True,
             does="a Linear's output gains `size` features from a trainable expansion; the Linear reading it "
                  "(from the architecture data) gets `size` zero input columns",
             exact="yes",
             adds="`size` × (fan-in [+1]) per producer + fan-out × `size`",
             families="FFN `up` (with `gate` when gated; role or dotted path, read by `down`); any Linear but "
                      "the last of mlp (by index)")
class ConcatLinearParams(LinearOpParams):
    """A Linear's output gains `size` features from a trainable expansion (cat([W x, E x])); the
    module consuming that output gets `size` zero input columns, so the function is kept. The
    consumer comes from the architecture: a transformer FFN's up (and gate, grown together) is
    read by down; a Linear of an nn.Sequential by the next Linear."""

    op: Literal["concat_linear"] = "concat_linear"
    modules: ModuleNames = Field(["up"], min_length=1, description='roles "up"/"gate" or their dotted paths '
                                 "(a transformer FFN), or Linear indices of an nn.Sequential (not the last)")
    size: Int = Field(..., gt=0, le=MAX_UNITS, description="output features to add")
    init_std: Float | None = Field(None, gt=0, le=MAX_SCALE, description="std of the expansion's weights "
                                   "(default: that of the original weights)")

    # roles whose output a module of the block reads (the FFN's hidden units, read by down)
    PRODUCER_ROLES: ClassVar[tuple[str, ...]] = ("up", "gate")

    def model_problems(self, family) -> list[tuple[str, str]]:
        problems = super().model_problems(family)
        others = [m for m in self.modules if m in ADAPTER_ROLES and m not in self.PRODUCER_ROLES]
        if not problems and family.kind != "mlp" and others:
            problems.append(("modules", concat_consumer_message(others[0], family.name)))
        return problems


def concat_consumer_message(name, where: str) -> str:
    return (f"'{name}' ({where}): concat_linear needs a Linear whose outputs exactly one module reads — on "
            "transformer blocks the FFN's up (and gate) projection, read by down; attention widths grow with "
            "add_heads, the residual stream with widen_hidden")


@register_op(implementation="engine.ops.linear:parallel_linear", per_block=True, builder_order=60, task_module=True,
             does="y = W x + D x with W frozen-able and D full-rank trainable",
             exact="yes (`zeros`), no (`random`, `std`)",
             adds="one W-shaped D per module",
             families="roles q k v o up down gate, or dotted paths inside a block (`attn.c_attn`); Linear "
                      "indices of mlp")
class ParallelLinearParams(LinearOpParams):
    """Frozen W plus a trainable full-rank delta D of the same shape: y = W x + D x."""

    op: Literal["parallel_linear"] = "parallel_linear"
    modules: ModuleNames = Field(..., min_length=1, description="roles (q k v o up down gate) or dotted paths "
                                 "inside a block, or Linear indices of an nn.Sequential")
    init: Literal["zeros", "random"] = Field("zeros", description="zeros keeps the function")
    std: Float = Field(0.01, gt=0, le=MAX_SCALE, description="std of D for init = random")

    @model_validator(mode="after")
    def _std_only_for_random(self):
        if self.init == "zeros" and "std" in self.model_fields_set:
            raise ValueError('std sets the random delta of init = "random"; init = "zeros" starts at zero — '
                             'remove std or set init = "random"')
        return self


# Adapter roles: names for the projections of a block, resolved through the family description
# (fused-qkv families map q/k/v to their one fused projection).
ADAPTER_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "up", "down", "gate")
FFN_ROLES: tuple[str, ...] = ("up", "down", "gate")
ADAPTER_MODULES = ("roles to adapt (" + ", ".join(ADAPTER_ROLES) + ") or dotted paths inside a block to a Linear "
                   "or to an MoE block's expert tensors (\"mlp.experts.down_proj\")")


def moe_role_problem(family, roles) -> str | None:
    """Why FFN roles cannot be named for a Linear operator on a mixture-of-experts family (its
    experts are fused 3-D tensors, no Linear modules to wrap), or None."""
    named = [r for r in roles if r in FFN_ROLES]
    moe = getattr(family, "moe", None)
    if moe is None or not named:
        return None
    return (f"role{'s' if len(named) > 1 else ''} {', '.join(named)}: {family.name}'s FFN is a mixture of experts "
            f"fused in 3-D tensors ({moe.module}.{moe.gate_up}, {moe.module}.{moe.down}), not Linear modules — name "
            "the attention roles q, k, v, o (widen_ffn grows the experts' units, lora adapts them)")


# An adapter name is a PEFT adapter key (no '.': it would read as a module path) and may become a
# file name (task-specific modules): a letter, then letters, digits, '_' or '-', at most 64.
ADAPTER_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
_ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)


def adapter_name_problem(value: object) -> str | None:
    """Why `value` cannot name an adapter (a message with the fix), or None if it can."""
    problem = name_problem(value)
    if problem is None and not _ADAPTER_NAME.fullmatch(value):
        problem = (f"{value!r} cannot name an adapter — use 1 to 64 letters, digits, '_' or '-', starting "
                   "with a letter (it becomes a PEFT adapter key and a file name)")
    return problem


def _check_adapter_names(names: list[str]) -> list[str]:
    """Roles, or dotted paths inside a block (a Linear, or an MoE block's expert tensor)."""
    paths = [n for n in names if n not in ADAPTER_ROLES]
    bad = [n for n in paths if "." not in n or not all(part.strip() == part and part for part in n.split("."))]
    if bad:
        raise ValueError(f"{', '.join(repr(n) for n in bad)}: name a role ({', '.join(ADAPTER_ROLES)}) or a dotted "
                         "path inside a block (\"self_attn.q_proj\", \"mlp.experts.down_proj\")")
    if len(set(names)) != len(names):
        raise ValueError(f"modules repeat: {names}")
    return names


@register_op(implementation="engine.ops.heads:add_heads", per_block=True, builder_order=30,
             does="adds `size` attention heads per layer, zero output columns; GQA: whole groups with their own "
                  "k/v heads",
             exact="yes (`zero_out`), no (`random`)",
             adds="`size` × head_dim × (2 × d_model) + new k/v heads × head_dim × 2 × d_model (+ biases)",
             families="every block on T5 (it shares its position bias) — export needs a "
                      "config with explicit head_dim (llama family, all layers); a head count the config refuses "
                      "(LlamaConfig: d_model a multiple of the heads, even with head_dim stated) is refused up "
                      "front in one line naming sizes that fit — mistral and qwen2 take any count")
class AddHeadsParams(LayeredOpParams):
    """Add `size` attention heads per chosen layer; their output projection starts at zero."""

    op: Literal["add_heads"] = "add_heads"
    size: Int = Field(..., gt=0, le=MAX_HEADS, description="query heads to add per layer (a multiple of the GQA group size)")
    init: Literal["zero_out", "random"] = "zero_out"


@register_op(implementation="engine.ops.hidden:widen_hidden", in_order=True, builder_order=40,
             does="grows d_model by `size`. `duplicate` (size = (k − 1) × d_model, HyperCloning): the stream "
                  "becomes k copies of x, heads and k/v heads repeat k times (head_dim kept), readers get W/k "
                  "per copy. `lossless` (any other size that keeps whole heads, LEMON): k copies plus r pads "
                  "holding the stream's mean (LayerNorm) or zeros (RMSNorm); norm gains × √s, ε × s (s = "
                  "k·d/d′). `symmetry = split | noise` breaks the copies' twinship. `zero`: new dimensions start "
                  "at zero (new heads where head_dim derives from d_model). `masked` (MSG): as `zero`, with "
                  "every norm taking statistics over the old dimensions only while the new ones ramp in over "
                  "`ramp_steps` — see [Widening d_model](#widening-d_model)",
             exact="`duplicate`, `lossless`: yes, and the export reloads as is; `zero`: no — every "
                   "LayerNorm/RMSNorm now averages over more dimensions (measured, the note names the norms); "
                   "`masked`: yes at expansion, a plain norm once ramped (export refuses mid-ramp)",
             adds="every tensor touching the residual stream grows",
             families="")
class WidenHiddenParams(OpParams):
    """Grow d_model (the residual stream) of the whole model by `size` dimensions.

    init = "duplicate": size a multiple of d_model, (k - 1) x d_model; the stream becomes k copies
    of itself, heads repeat k times (HyperCloning; exact).
    init = "lossless": any other size that keeps whole heads; k copies and the rest padded with
    the stream's mean (LayerNorm) or zeros (RMSNorm), norm gains x sqrt(s) and epsilon x s for
    s = k d / d' (LEMON; exact, exports as is).
    init = "zero": any size that keeps whole heads; new dimensions start at zero, but norm
    statistics now include them (not exact: measured and reported).
    init = "masked": as zero, but every norm takes its statistics over the old dimensions only,
    the new ones weighted by a ramp rising from 0 to 1 over `ramp_steps` training steps (MSG):
    exact at expansion, a plain norm once the ramp is complete.
    symmetry (duplicate, lossless): how the copies stop being twins — "split": readers take
    unequal shares (1 + scale t_c) / k of each weight, t_c spread over [-1, 1]; "noise": readers
    get paired noise of std scale x (weight std / k) that sums to zero over the copies. Both exact."""

    op: Literal["widen_hidden"] = "widen_hidden"
    size: Int = Field(..., gt=0, le=MAX_UNITS, description="dimensions to add to d_model (duplicate: a multiple "
                      "of d_model)")
    init: Literal["duplicate", "lossless", "zero", "masked"] = "duplicate"
    init_std: Float | None = Field(None, ge=0, le=MAX_SCALE, description="lossless/zero/masked: std of the new input "
                                   "columns of modules reading the stream (default: the std of their weights; 0: zeros)")
    ramp_steps: Int = Field(1000, ge=1, le=MAX_STEPS, description="masked: training steps over which the new dimensions "
                            "enter the norm statistics")
    symmetry: Literal["none", "split", "noise"] = Field("none", description="duplicate/lossless: how the copies of "
                                                        "the stream stop being twins (split: unequal reader shares; "
                                                        "noise: paired reader noise that cancels)")
    symmetry_scale: Float = Field(0.2, gt=0, lt=1, description="split: shares (1 +- scale)/k at the ends; noise: "
                                  "std relative to the weight's std / k")

    @model_validator(mode="after")
    def _settings_of_other_inits(self):
        if self.init == "duplicate" and self.init_std is not None:
            raise ValueError('init_std sets the new input columns of init = "lossless", "zero" or "masked"; '
                             'init = "duplicate" copies every weight — remove init_std')
        if self.init != "masked" and "ramp_steps" in self.model_fields_set:
            raise ValueError(f'ramp_steps belongs to init = "masked" (got init = "{self.init}") — remove '
                             'it or set init = "masked"')
        if self.init in ("zero", "masked") and self.symmetry != "none":
            raise ValueError(f'symmetry breaks the copies of init = "duplicate" or "lossless"; init = "{self.init}" '
                             'makes none — remove symmetry')
        if self.symmetry == "none" and "symmetry_scale" in self.model_fields_set:
            raise ValueError('symmetry_scale belongs to symmetry = "split" or "noise" — remove it or set symmetry')
        return self

    def growth_defaults(self) -> dict:
        if self.init in ("duplicate", "lossless") and "symmetry" not in self.model_fields_set:
            return {"symmetry": GROWTH_SYMMETRY}
        return {}


class AdapterOpParams(LayeredOpParams):
    """Keys shared by the adapter operators (PEFT layers injected into the chosen projections)."""

    modules: list[str] = Field(..., min_length=1, description=ADAPTER_MODULES)
    name: str | None = Field(None, description="adapter name (default: '<op>_stage<N>'); names task-specific "
                             "modules; letters, digits, '_', '-', starting with a letter")
    # the default name picked when the op is applied, so that every stack of a multi-stack model
    # (T5 encoder and decoder) joins the same adapter instead of getting a second, suffixed name
    _default_name: str | None = PrivateAttr(None)

    @field_validator("modules")
    @classmethod
    def _known_roles(cls, v):
        return _check_adapter_names(v)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        problem = None if v is None else adapter_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    def model_problems(self, family) -> list[tuple[str, str]]:
        """(field, message) for roles this model family lacks (e.g. `gate` on a non-gated MLP).
        Dotted paths, and what a role resolves to in each block (a Linear, or an MoE block's
        expert tensor), are checked on the model (engine.ops.adapters)."""
        problems = []
        gated = bool(family.moe or (family.ffn and family.ffn.gate))  # experts are always gated (gate_up)
        for key in ("modules", "feedforward"):
            if "gate" in (getattr(self, key, None) or []) and not gated:
                problems.append((key, f"role 'gate' does not exist in {family.name} models (their MLP has "
                                      f"no gate projection) — use: {', '.join(r for r in ADAPTER_ROLES if r != 'gate')}"))
        return problems


@register_op(implementation="engine.ops.adapters:lora", per_block=True, builder_order=110, task_module=True,
             does="PEFT LoRA on roles `q k v o up down gate` or dotted paths (a fused projection — qkv in "
                  "gpt2/neox, gate_up — gets one adapter covering it); each virtual twin its own adapter",
             exact="yes (B = 0)",
             adds="r × (fan-in + fan-out) per module; × the experts on an expert tensor",
             families="MoE families: up/gate (the fused gate_up tensor) and down adapt every expert of a sparse "
                      "block, one rank-r pair per expert (PEFT `target_parameters`; no dropout there); dense "
                      "blocks' FFNs as Linears")
class LoRAParams(AdapterOpParams):
    """Low-rank adapters (PEFT LoRA) on the chosen projections: W x + (alpha / r) B A x, B = 0 at init."""

    op: Literal["lora"] = "lora"
    modules: list[str] = Field(["q", "v"], min_length=1, description=ADAPTER_MODULES)
    r: Int = Field(8, gt=0, le=MAX_RANK, description="rank")
    alpha: Float = Field(16, gt=0, le=1e6, description="scaling numerator: the update is scaled by alpha / r")
    dropout: Float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (training only)")


@register_op(implementation="engine.ops.adapters:ia3", per_block=True, builder_order=120, task_module=True,
             does="PEFT IA3 scaling vectors (ones at init)",
             exact="yes",
             adds="fan-out (fan-in for `feedforward` roles) per module",
             families="MoE families: attention roles, Linears and dense blocks' FFNs; not the expert tensors "
                      "(PEFT's IA3 adapts modules only: use lora)")
class IA3Params(AdapterOpParams):
    """IA3 (PEFT): learned scaling vectors, ones at init. Feed-forward roles scale the projection's
    input, the others its output."""

    op: Literal["ia3"] = "ia3"
    modules: list[str] = Field(["k", "v", "down"], min_length=1, description=ADAPTER_MODULES)
    feedforward: list[str] | None = Field(None, description="names among `modules` whose input is scaled "
                                          "(default: \"down\" if it is adapted)")

    @field_validator("feedforward")
    @classmethod
    def _known_ff_roles(cls, v):
        return v if v is None else _check_adapter_names(v)

    def feedforward_roles(self) -> list[str]:
        return [r for r in self.modules if r == "down"] if self.feedforward is None else list(self.feedforward)

    @model_validator(mode="after")
    def _feedforward_in_modules(self):
        missing = [r for r in self.feedforward_roles() if r not in self.modules]
        if missing:
            raise ValueError(f"feedforward roles {missing} are not in modules {self.modules} — "
                             "every feedforward role must also be adapted")
        return self


# ---------------------------------------------------------------------------------------------
# depth operators (engine/ops/depth.py)


@register_op(implementation="engine.ops.depth:insert_identity", block_list=True, builder_order=70,
             does="after each chosen block, a copy with zero attention-output and FFN-down projections (and "
                  "cross-attention output in T5 decoders) — LLaMA Pro",
             exact="yes",
             adds="one block per chosen layer",
             families="")
class InsertIdentityParams(LayeredOpParams):
    """Insert, after each chosen block, a copy of it whose attention output and FFN down
    projections are zero (LLaMA Pro / Net2DeeperNet): an exact identity; only the copies are new."""

    op: Literal["insert_identity"] = "insert_identity"

    def num_layers_after(self, num_layers: int) -> int:
        return num_layers + (num_layers if self.layers == "all" else len(self.layers))


@register_op(implementation="engine.ops.depth:split_residual", block_list=True, builder_order=80,
             does="a block becomes `k` copies each adding F(x)/k",
             exact="no (measured)",
             adds="(k − 1) blocks per chosen layer",
             families="")
class SplitResidualParams(LayeredOpParams):
    """Replace each chosen block by `k` copies that each add F(x)/k (attention output and FFN down
    projections scaled by 1/k): approximately the same function, k times deeper there."""

    op: Literal["split_residual"] = "split_residual"
    k: Int = Field(2, ge=2, le=64, description="copies per chosen block")

    def num_layers_after(self, num_layers: int) -> int:
        return num_layers + (self.k - 1) * (num_layers if self.layers == "all" else len(self.layers))


LayerKind = Literal["real", "virtual"]


class KeepEnds(BaseModel):
    """First and last blocks kept once, the middle ones stretched evenly to `depth` blocks."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    depth: Int = Field(..., ge=2, le=MAX_DEPTH, description="number of blocks after the mapping")


class DepthUpScaling(BaseModel):
    """SOLAR depth up-scaling: `copies` copies of the stack, `drop` blocks removed at every seam
    (the first copy loses its last `drop` blocks, the next its first `drop`, ...)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    copies: Int = Field(2, ge=2, le=16, description="copies of the stack")
    drop: Int = Field(..., ge=0, le=MAX_DEPTH, description="blocks dropped on each side of every seam")


@register_op(implementation="engine.ops.depth:map_layers", block_list=True, builder_order=90,
             does="target block i = source block `mapping[i]`, real or virtual (weight-tied) repeats; "
                  "`keep_ends`, `dus`, `repeat` (G_stack: the whole stack g times), `stack_middle` (MIDAS: the "
                  "middle blocks copied once), `scale`",
             exact="the identity mapping only",
             adds="a block per real repeat; 0 per virtual one",
             families="per stack on T5")
class MapLayersParams(OpParams):
    """Rebuild the stack: target block i is source block mapping[i], a real copy (own weights) or
    a virtual one (weight-tied to its source: one tensor, gradients from every use add up)."""

    op: Literal["map_layers"] = "map_layers"
    mapping: list[Int] | None = Field(None, min_length=1, max_length=MAX_DEPTH, description="target i = source block mapping[i]")
    keep_ends: KeepEnds | None = Field(None, description="helper: {depth = N}")
    dus: DepthUpScaling | None = Field(None, description="helper: {copies = 2, drop = 8} (SOLAR)")
    repeat: Int | None = Field(None, ge=2, le=64, description="helper: the whole stack this many times, "
                               "0..n-1 then 0..n-1 again (G_stack); relative to the depth, so a growth can repeat it")
    stack_middle: Int | None = Field(None, ge=1, le=MAX_DEPTH, description="helper: the middle this many blocks "
                                     "copied once, after themselves (MIDAS); relative to the depth, so a growth can "
                                     "repeat it (2 -> 4 -> 6 -> 8 with stack_middle = 2)")
    kinds: LayerKind | list[LayerKind] | None = Field(
        None, description='"real" | "virtual" per target, or one for all (default: a source\'s first '
                          'occurrence holds its own block, repeats are virtual — real when `scale` is set)')
    scale: Float | None = Field(None, gt=0, le=MAX_SCALE, description="multiplies the attention output and FFN down "
                                "projections of every repeat (e.g. 0.7071); repeats must then be real")

    source_field: ClassVar[str] = "mapping"

    @field_validator("mapping")
    @classmethod
    def _non_negative(cls, v):
        if v is not None:
            bad = [i for i in v if i < 0]
            if bad:
                raise ValueError(f"mapping entries are source block indices, >= 0 — got {bad}")
        return v

    @model_validator(mode="after")
    def _one_way_and_kinds(self):
        given = [k for k in ("mapping", "keep_ends", "dus", "repeat", "stack_middle") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of mapping, keep_ends, dus, repeat, stack_middle — "
                             + (f"got {' and '.join(given)}" if given else
                                "e.g. mapping = [0, 1, 1, 2, 2, 3] or keep_ends = {depth = 8}"))
        if isinstance(self.kinds, list) and self.mapping is not None and len(self.kinds) != len(self.mapping):
            raise ValueError(f"kinds has {len(self.kinds)} entries but mapping has {len(self.mapping)} — "
                             "give one per target block, or one string for all")
        if self.mapping is not None:
            self._check_scaled_kinds(self.mapping)
        elif self.scale is not None and self.kinds == "virtual":
            raise ValueError(_SCALED_VIRTUAL)
        return self

    def _check_scaled_kinds(self, mapping: list[int]) -> None:
        if self.scale is None or self.kinds is None:
            return
        kinds = self.resolve_kinds(mapping)
        seen, bad = set(), []
        for i, (source, kind) in enumerate(zip(mapping, kinds)):
            if source in seen and kind == "virtual":
                bad.append(i)
            seen.add(source)
        if bad:
            raise ValueError(f"{_SCALED_VIRTUAL} (targets {bad})")

    def resolve(self, num_layers: int) -> list[int]:
        """The mapping for a model of `num_layers` blocks (helpers expanded); ValueError if the
        helper does not fit that depth."""
        n = num_layers
        if self.mapping is not None:
            return list(self.mapping)
        if self.repeat is not None:
            if n * self.repeat > MAX_DEPTH:
                raise ValueError(f"repeat = {self.repeat} makes {n * self.repeat} blocks of a {n}-block model — at "
                                 f"most {MAX_DEPTH}: use repeat <= {max(1, MAX_DEPTH // n)}")
            return list(range(n)) * self.repeat
        if self.stack_middle is not None:
            k = self.stack_middle
            if k > n:
                raise ValueError(f"stack_middle = {k} copies more blocks than the {n}-block model has — use "
                                 f"stack_middle <= {n}")
            if n + k > MAX_DEPTH:
                raise ValueError(f"stack_middle = {k} makes {n + k} blocks — at most {MAX_DEPTH}")
            return FAMILIES_BY_NAME["midas"].mapping(n, n + k, times=2)  # the middle band once more
        if self.keep_ends is not None:
            depth = self.keep_ends.depth
            if n == 1:
                return [0] * depth
            if n == 2 or depth < n:
                # too few middle blocks to stretch (or shrinking): spread evenly, ends included
                return [min(n - 1, (i * n) // depth) if i < depth - 1 else n - 1 for i in range(depth)]
            middle = [1 + (j * (n - 2)) // (depth - 2) for j in range(depth - 2)]
            return [0] + middle + [n - 1]
        copies, drop = self.dus.copies, self.dus.drop
        keep_inner = n - 2 * drop if copies > 2 else n - drop
        if keep_inner < 1:
            raise ValueError(f"drop = {drop} leaves no blocks of a {n}-block model in "
                             f"{'a middle' if copies > 2 else 'each'} copy — use drop < "
                             f"{(n + 1) // 2 if copies > 2 else n}")
        mapping = []
        for c in range(copies):
            start = drop if c > 0 else 0
            stop = n - drop if c < copies - 1 else n
            mapping.extend(range(start, stop))
        return mapping

    def resolve_kinds(self, mapping: list[int]) -> list[str]:
        if isinstance(self.kinds, list):
            if len(self.kinds) != len(mapping):
                raise ValueError(f"kinds has {len(self.kinds)} entries but the mapping has {len(mapping)} "
                                 "targets — give one per target block, or one string for all")
            return list(self.kinds)
        if isinstance(self.kinds, str):
            return [self.kinds] * len(mapping)
        seen, kinds = set(), []
        for source in mapping:
            kinds.append("real" if source not in seen or self.scale is not None else "virtual")
            seen.add(source)
        return kinds

    def source_layers(self) -> list[int]:
        return sorted(set(self.mapping)) if self.mapping is not None else []

    def depth_problems(self, num_layers: int) -> list[tuple[str, str]]:
        if self.mapping is not None:
            return []
        try:
            mapping = self.resolve(num_layers)
        except ValueError as e:
            field = next(k for k in ("keep_ends", "dus", "repeat", "stack_middle") if getattr(self, k) is not None)
            return [(field, str(e))]
        try:
            self._check_scaled_kinds(mapping)
            self.resolve_kinds(mapping)
        except ValueError as e:
            return [("kinds", str(e))]
        return []

    def num_layers_after(self, num_layers: int) -> int:
        try:
            return len(self.resolve(num_layers))
        except ValueError:
            return num_layers  # reported by depth_problems


_SCALED_VIRTUAL = ("scale changes the weights of repeated blocks, but a virtual block shares its "
                   "source's weights — make the repeats real (kinds = \"real\", or leave kinds out)")


@register_op(implementation="engine.ops.depth:unshare", block_list=True, builder_order=100,
             does="gives virtual blocks their own tensors",
             exact="yes",
             adds="the shared tensors of each chosen block",
             families="")
class UnshareParams(LayeredOpParams):
    """Give the chosen (virtual, weight-tied) blocks their own copy of every shared tensor."""

    op: Literal["unshare"] = "unshare"


# ---------------------------------------------------------------------------------------------
# mixture-of-experts operators (engine/ops/experts.py; the maths: docs/moe.md)

MAX_EXPERTS = 1 << 10      # experts of one sparse block after an operator


@register_op(implementation="engine.ops.experts:upcycle", builder_order=130,
             does="each chosen block's dense FFN becomes a sparse MoE block of `experts` experts, `top_k` per "
                  "token: the MoE class of transformers that matches the family (llama, mistral → Mixtral, qwen2 → "
                  "Qwen2-MoE, qwen3 → Qwen3-MoE), which the model then is; `init = copy | drop | noise`, `router = "
                  "random | zero | kmeans` — see docs/moe.md",
             exact="`copy`: yes (the top-k weights are renormalized); `drop`, `noise`: no; Qwen2-MoE with "
                   "`shared_expert = \"whole\"`: yes for every init",
             adds="(`experts` − 1) × the FFN + `experts` × d_model (router) per layer (Qwen2-MoE: + the shared "
                  "expert's d_model gate)",
             families="Mixtral has no dense blocks: every layer or none")
class UpcycleParams(LayeredOpParams):
    """Turn the dense FFN of each chosen block into a sparse mixture of experts (sparse
    upcycling): `experts` experts made from the FFN, `top_k` of them per token, picked by a new
    router. The model becomes the MoE family its own upcycles to (ArchFamily.upcycle_to).

    init = "copy": every expert a copy of the FFN; the top-k weights are renormalized to sum to 1,
    so the block computes the FFN exactly whatever the router picks.
    init = "drop" (Drop-Upcycling): each expert re-draws a random fraction `drop` of its
    intermediate units (their gate and up rows, their down column) from a normal with the mean and
    std of that matrix, a different subset per expert. Not exact.
    init = "noise": copies plus Gaussian noise of std `noise` × each matrix's std. Not exact.
    router = "random" (std `router_std`), "zero" (ties: the first top_k experts take every token and
    copies stay twins), "kmeans" (row e points at centroid e of a spherical k-means of the block's
    FFN inputs on the probe batch, as long as a random row of std `router_std`).
    shared_expert (Qwen2-MoE, whose sparse blocks always have one): "half" — the shared expert is
    the FFN and its sigmoid gate starts at weight 0 (σ(0) = 1/2) while the routed experts' down
    projections are halved; "whole" — the shared expert is the FFN with its down projection
    doubled, the routed experts' down projections start at zero."""

    op: Literal["upcycle"] = "upcycle"
    experts: Int = Field(..., ge=2, le=MAX_EXPERTS, description="experts per upcycled block")
    top_k: Int = Field(2, ge=1, le=MAX_EXPERTS, description="experts each token goes through")
    init: Literal["copy", "drop", "noise"] = "copy"
    drop: Float = Field(0.5, gt=0, le=1, description="drop: the share of each expert's intermediate units re-drawn")
    noise: Float = Field(0.01, gt=0, le=MAX_SCALE, description="noise: its std, relative to each matrix's std")
    router: Literal["random", "zero", "kmeans"] = "random"
    router_std: Float = Field(0.02, gt=0, le=MAX_SCALE, description="random: the std of the router's weights; "
                              "kmeans: the rows' length is that of such a random row")
    shared_expert: Literal["half", "whole"] | None = Field(
        None, description='Qwen2-MoE\'s shared expert: "half" or "whole" (see above); default "half" there',
        json_schema_extra={"default_text": "half where the family has one"})

    model_kinds: ClassVar[tuple[str, ...]] = ("causal_lm",)

    @model_validator(mode="after")
    def _fits(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k = {self.top_k} > experts = {self.experts}: a token cannot go through more "
                             "experts than the block has — lower top_k or raise experts")
        for key, owner in (("drop", "drop"), ("noise", "noise")):
            if key in self.model_fields_set and self.init != owner:
                raise ValueError(f'{key} belongs to init = "{owner}" (got init = "{self.init}") — remove it or '
                                 f'set init = "{owner}"')
        if "router_std" in self.model_fields_set and self.router == "zero":
            raise ValueError('router_std sizes a random or k-means router; router = "zero" has none — remove it')
        return self


@register_op(implementation="engine.ops.experts:add_experts", builder_order=140,
             does="every sparse block goes from E to `experts` experts: new expert j copies expert j mod E and "
                  "its router row; for `experts` = m·E, top_k becomes m·k (an expert's m copies share its "
                  "probability) — m× the expert compute per token; `symmetry = \"noise\"` breaks the twins "
                  "exactly — see docs/moe.md",
             exact="yes for `experts` = m·E with `top_k` = m·k (the default there); no otherwise (measured)",
             adds="(`experts` − E) × (an expert + d_model) per sparse block",
             families="MoE families, and dense ones once upcycled")
class AddExpertsParams(OpParams):
    """Grow every sparse block from E to `experts` experts. New expert j is a copy of expert
    j mod E with a copy of its router row. With `experts` = m·E and top_k raised to m·k (the
    default), the m copies of an expert have equal logits, share its probability p as m shares
    p/m, and top-(m·k) picks every copy of the old top k: the block computes what it did, with or
    without renormalization. Any other count or top_k changes the routing (measured).
    symmetry = "noise": the copies' down projections get paired noise that sums to zero over an
    expert's copies (std `symmetry_scale` × their std / m): exact while the copies are picked
    together with equal weights, as they are at growth, and the copies no longer stay twins."""

    op: Literal["add_experts"] = "add_experts"
    experts: Int = Field(..., ge=2, le=MAX_EXPERTS, description="experts per sparse block after the op")
    top_k: Int | None = Field(None, ge=1, le=MAX_EXPERTS, description="experts per token after the op",
                              json_schema_extra={"default_text": "m·k when experts = m·E, else k"})
    symmetry: Literal["none", "noise"] = Field("none", description="how an expert's copies stop being twins; "
                                               "inside [stages.grow] the default is noise")
    symmetry_scale: Float = Field(0.5, gt=0, lt=1, description="noise: std relative to the down projections' "
                                  "std / copies")

    model_kinds: ClassVar[tuple[str, ...]] = ("causal_lm",)

    @model_validator(mode="after")
    def _fits(self):
        if self.top_k is not None and self.top_k > self.experts:
            raise ValueError(f"top_k = {self.top_k} > experts = {self.experts}: a token cannot go through more "
                             "experts than the block has — lower top_k or raise experts")
        if self.symmetry == "none" and "symmetry_scale" in self.model_fields_set:
            raise ValueError('symmetry_scale belongs to symmetry = "noise" — remove it or set symmetry')
        return self

    def growth_defaults(self) -> dict:
        if "symmetry" not in self.model_fields_set:
            return {"symmetry": GROWTH_SYMMETRY}
        return {}
