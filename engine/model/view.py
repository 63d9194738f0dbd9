"""The uniform view over a model: blocks, FFNs and config fields, via the family description.

``ArchView`` works from a config alone (for plan checks and parameter previews) or over a live
model (for the operators).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from engine.model.families import (
    FAMILIES,
    ArchFamily,
    AttentionLayout,
    FFNLayout,
    UnsupportedArchitecture,
    family_for,
    family_of,
)

if TYPE_CHECKING:  # torch is imported on use: plan checks read configs without it
    from torch import nn

__all__ = ["ArchView", "ArchFamily", "AttentionLayout", "FFNLayout", "FAMILIES", "UnsupportedArchitecture", "family_for",
           "family_of", "module_tree_differences"]


def get_submodule(root, dotted: str):
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class ArchView:
    """``family`` is the description resolved for this model: the gated FFN layout when the
    config says so, and for multi-stack models (T5) the paths of one stack (``stack``; default the
    first). ``stacks()`` gives a view per stack, so operators only ever see one stack.

    A model without a config (a plain nn.Sequential) gets the MLP view: ``ArchView.of(model)``
    or ``ArchView(None, model)`` return an ``MLPView`` (below)."""

    def __new__(cls, config=None, model=None, stack: str | None = None):
        if cls is ArchView and config is None and model is not None:
            return super().__new__(MLPView)  # Python then runs MLPView.__init__
        return super().__new__(cls)

    @classmethod
    def of(cls, model) -> "ArchView":
        """The view of a live model: its config's family, or the MLP view without a config."""
        return ArchView(getattr(model, "config", None), model)

    def __init__(self, config, model=None, stack: str | None = None):
        self.config = config
        self.model = model
        family = family_of(config)
        self.base_family = family
        if family.gated_ffn is not None and getattr(config, family.gated_ffn_flag, False):
            family = replace(family, ffn=family.gated_ffn)
        self.stack = None
        if family.stacks:
            names = [s.name for s in family.stacks]
            if stack is not None and stack not in names:
                raise ValueError(f"stack: {family.name} models have stacks {', '.join(names)} — got '{stack}'")
            chosen = next(s for s in family.stacks if s.name == (stack or names[0]))
            family = replace(family, blocks=chosen.blocks, num_layers_field=chosen.num_layers_field,
                             ffn=replace(family.ffn, module=chosen.ffn_module), extra_outputs=chosen.extra_outputs)
            self.stack = chosen.name
        elif stack is not None:
            raise ValueError(f"stack: {family.name} models have one stack of blocks — leave stack out")
        self.family = family

    def stacks(self, name: str | None = None) -> list["ArchView"]:
        """One view per stack (all, or the one named); single-stack models: this view."""
        if not self.base_family.stacks:
            if name is not None:
                ArchView(self.config, self.model, name)  # raises the clear error
            return [self]
        names = [name] if name is not None else [s.name for s in self.base_family.stacks]
        views = [ArchView(self.config, self.model, n) for n in names]
        for view in views:
            view.stage_index = getattr(self, "stage_index", None)
        return views

    def depth_followers(self) -> dict:
        """Config fields that must equal a stack's depth besides its depth field (T5:
        `decoder_layers`, by which generate() sizes the decoder's KV cache; without it, it uses
        num_layers, the encoder's depth, and fails on a deeper decoder)."""
        if self.model is None:
            return {}
        return {s.generation_cache_field: len(get_submodule(self.model, s.blocks))
                for s in self.base_family.stacks if s.generation_cache_field}

    def update_stack_configs(self, changes: dict) -> None:
        """Stack modules keeping their own config copy (T5Stack.config, read when the decoder
        builds its KV cache) get `changes` too, each with its own stack's depth."""
        if self.model is None:
            return
        for layout in self.base_family.stacks:
            if layout.config_copy is None:
                continue
            own = get_submodule(self.model, layout.config_copy)
            for key, value in changes.items():
                setattr(own, key, value)
            setattr(own, self.base_family.num_layers_field, len(get_submodule(self.model, layout.blocks)))

    def refresh(self) -> None:
        """Resolve the family again from the config, for an operator that changed the family it
        names (upcycle: a dense model becomes its MoE family), so the operators after it see that."""
        ArchView.__init__(self, self.config, self.model, self.stack)

    def check_applies(self, op: str) -> None:
        """Raise the family's one-line refusal if `op` does not apply to it (ArchFamily.refused_ops)."""
        message = self.base_family.refusal(op)
        if message:
            raise ValueError(message)

    # -- facts from the config ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(getattr(self.config, self.family.num_layers_field))

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, self.family.hidden_size_field))

    @property
    def ffn_size(self) -> int:
        """The FFN width; each expert's in a MoE model without dense blocks (Mixtral, or a Qwen3-MoE
        whose every block is sparse)."""
        if self.family.moe and (self.family.ffn_size_field is None or len(self.sparse_layers()) == self.num_layers):
            return self.expert_size
        value = getattr(self.config, self.family.ffn_size_field, None)
        if value is None and self.family.ffn_size_default == "4*hidden_size":
            return 4 * self.hidden_size
        return int(value)

    # -- the live model ----------------------------------------------------------------------
    def blocks(self):
        if self.model is None:
            raise RuntimeError("ArchView built from a config has no blocks")
        return get_submodule(self.model, self.family.blocks)

    def ffn(self, layer: int):
        return get_submodule(self.blocks()[layer], self.family.ffn.module)

    def set_ffn(self, layer: int, module) -> None:
        self._set_in_block(layer, self.family.ffn.module, module)

    def attention(self, layer: int):
        return get_submodule(self.blocks()[layer], self.family.attention.module)

    def set_attention(self, layer: int, module) -> None:
        self._set_in_block(layer, self.family.attention.module, module)

    def _set_in_block(self, layer: int, dotted: str, module) -> None:
        parent_path, _, name = dotted.rpartition(".")
        parent = get_submodule(self.blocks()[layer], parent_path) if parent_path else self.blocks()[layer]
        setattr(parent, name, module)

    @property
    def num_heads(self) -> int:
        return int(getattr(self.config, self.family.attention.num_heads_field))

    @property
    def num_kv_heads(self) -> int:
        field = self.family.attention.num_kv_heads_field
        value = getattr(self.config, field, None) if field else None
        return int(value) if value else self.num_heads

    # -- mixture of experts (the family's `moe` layout; config facts work without a model) -------
    @property
    def moe(self):
        """The family's sparse-FFN layout, or None for a dense family."""
        return self.family.moe

    def is_sparse(self, layer: int) -> bool:
        """Whether block `layer` holds a sparse MoE FFN, as the config describes it (Qwen2/3-MoE:
        not in the dense list and (layer + 1) % step == 0; Mixtral, OLMoE, GPT-OSS: every block)."""
        return is_sparse_block(self.family, self.config, layer)

    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_sparse(i)]

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.family.moe.num_experts_field)) if self.family.moe else 0

    @property
    def top_k(self) -> int:
        """Experts each token goes through."""
        return int(getattr(self.config, self.family.moe.top_k_field))

    @property
    def expert_size(self) -> int:
        """Each expert's intermediate size (the config's; widen_ffn in place keeps it current)."""
        return int(getattr(self.config, self.family.moe.expert_size_field))

    def moe_block(self, layer: int):
        """The sparse MoE module of block `layer` (ValueError for a dense block)."""
        if not self.is_sparse(layer):
            raise ValueError(f"layers: block {layer} of this {self.family.name} model is dense (no experts)")
        return get_submodule(self.blocks()[layer], self.family.moe.module)

    def experts(self, layer: int):
        """The fused experts module of block `layer` (a widen wrapper around it when one was added)."""
        return get_submodule(self.moe_block(layer), self.family.moe.experts)

    def set_experts(self, layer: int, module) -> None:
        parent, _, name = self.family.moe.experts.rpartition(".")
        setattr(get_submodule(self.moe_block(layer), parent) if parent else self.moe_block(layer), name, module)



def holds_experts(family: ArchFamily, block) -> bool:
    """Whether a live block module holds the family's MoE block (a copied block keeps its source's
    kind whatever its index)."""
    return family.moe is not None and not _missing(block, f"{family.moe.module}.{family.moe.experts}")


def is_sparse_block(family: ArchFamily, config, layer: int) -> bool:
    """Whether block `layer` of a `family` model with `config` is a sparse MoE block."""
    moe = family.moe
    if moe is None or not int(getattr(config, moe.num_experts_field, 0) or 0):
        return False
    dense = (getattr(config, moe.dense_layers_field, None) or []) if moe.dense_layers_field else []
    step = int(getattr(config, moe.sparse_step_field, 1) or 1) if moe.sparse_step_field else 1
    return layer not in dense and (layer + 1) % step == 0


# -- does a model have the module tree its family describes? ([model] family = "...") -------------

def _described_leaves(family: ArchFamily, sparse: bool = False) -> list[str]:
    """Paths inside a block that the description names (projections, norms, activation; the
    MoE block's router, experts and shared expert in a sparse block)."""
    att, ffn, moe = family.attention, family.ffn, family.moe
    names = [att.out, att.q, att.k, att.v, att.qkv, *att.qk_norms, *att.head_params]
    leaves = [f"{att.module}.{n}" for n in names if n]
    if sparse:
        paths = [moe.router, moe.experts, moe.gate_up, moe.down, moe.act, moe.gate_up_bias, moe.down_bias,
                 moe.shared_expert_gate]
        shared = moe.shared_expert
        if shared:
            paths += [f"{shared.module}.{n}" for n in (shared.up, shared.down, shared.gate, shared.act) if n]
        leaves += [f"{moe.module}.{n}" for n in paths if n]
    else:
        leaves += [f"{ffn.module}.{n}" for n in (ffn.up, ffn.down, ffn.gate, ffn.act) if n]
    return leaves + list(family.norms) + list(family.post_norms)


def module_tree_differences(family: ArchFamily, model) -> list[str]:
    """What differs between `model` and the module tree `family` describes, each in a few words
    (empty when it matches): a missing path, a norm without the gain the family's norm kind has,
    or a parametrised module of a block that the description does not know (its operators would
    ignore it, e.g. the q_norm of a Qwen3 described as Llama)."""
    problems = []
    for path in (family.blocks, family.embeddings, family.final_norm, family.lm_head, family.position_embeddings):
        if path and _missing(model, path):
            problems.append(f"no {path}")
    if problems:
        return problems
    blocks = get_submodule(model, family.blocks)
    if len(blocks) != int(getattr(model.config, family.num_layers_field, -1)):
        problems.append(f"{family.blocks} has {len(blocks)} blocks but config.{family.num_layers_field} is "
                        f"{getattr(model.config, family.num_layers_field, None)}")
    # the first block of each kind: dense, and sparse where the family has experts
    firsts = {}
    for index in range(len(blocks)):
        firsts.setdefault(is_sparse_block(family, model.config, index), index)
    for sparse, index in firsts.items():
        problems += _block_differences(family, blocks[index], f"{family.blocks}.{index}", sparse)
    return problems


def _block_differences(family: ArchFamily, block, where: str, sparse: bool) -> list[str]:
    import torch

    leaves = _described_leaves(family, sparse)
    problems = [f"no {where}.{leaf}" for leaf in leaves if _missing(block, leaf)]
    for path in [*family.norms, *family.post_norms, *(f"{family.attention.module}.{n}" for n in family.attention.qk_norms)]:
        gain = None if _missing(block, path) else getattr(get_submodule(block, path), "weight", None)
        if not _missing(block, path) and not isinstance(gain, torch.nn.Parameter):
            problems.append(f"{where}.{path} has no gain (a {family.norm_kind} has one)")

    def known(path: str) -> bool:
        return any(path == leaf or path.startswith(leaf + ".") for leaf in leaves)

    # a module is known when it is described, or each of its own parameters is (GPT-OSS's sinks)
    unknown = [name for name, module in block.named_modules()
               if module._parameters and not known(name)
               and not all(known(f"{name}.{p}" if name else p) for p in module._parameters)]
    problems += [f"{where}.{name} ({type(get_submodule(block, name)).__name__}) is not in the "
                 f"{family.name} description" for name in unknown]
    return problems


def _missing(root, dotted: str) -> bool:
    try:
        get_submodule(root, dotted)
    except AttributeError:
        return True
    return False



def count_params(model) -> int:
    """Every parameter's element count (a tied tensor once: ``parameters()`` deduplicates)."""
    return sum(p.numel() for p in model.parameters())


def active_params(model) -> int:
    """The parameters a token goes through: every parameter (``count_params``), less in each block
    holding experts (``MoELayout``) the experts a token skips — E − top_k of its E experts' fused
    tensors (gate_up, down, their biases, a parallel widening's new units: each [E, ...]). The
    router and a shared expert run for every token and count whole. A dense model: all of them."""
    total = count_params(model)
    if getattr(model, "config", None) is None:
        return total
    view = ArchView.of(model)
    moe = view.family.moe
    if moe is None or view.family.kind != "causal_lm":
        return total
    experts, top_k = view.num_experts, view.top_k
    skipped, seen = 0, set()
    for block in view.blocks():
        if not holds_experts(view.family, block):
            continue
        for p in get_submodule(block, f"{moe.module}.{moe.experts}").parameters():
            if id(p) not in seen:
                seen.add(id(p))
                skipped += p.numel() // experts * (experts - top_k)
    return total - skipped


# ---------------------------------------------------------------------------------------------
# The view of a plain nn.Sequential MLP.
#
# The architecture view of a plain ``nn.Sequential`` MLP (the small experiments' models).
#
# Hidden layer i is the output of the i-th layer child (an ``nn.Linear``, or a module an operator
# put in its place), read by the (i+1)-th through elementwise children (activations, dropout).
# Which children are layers and which are elementwise is data: the "mlp" entry of
# ``engine.model.families``. Operators reach Linears by index (``linear(i)`` / ``set_linear``).
#
# Build it with ``ArchView.of(model)`` or ``ArchView(None, model)``: a model without a config is
# an MLP.

MLP_MODEL_TYPE = "sequential"
MLP_OPS_HINT = "an nn.Sequential MLP has no transformer blocks — grow it with widen_mlp, concat_linear or parallel_linear"


class MLPView(ArchView):
    def __init__(self, config=None, model=None, stack: str | None = None):
        from torch import nn

        if not isinstance(model, nn.Sequential):
            raise UnsupportedArchitecture(f"a model without a config must be a plain nn.Sequential MLP — got "
                                          f"{type(model).__name__}")
        if stack is not None:
            raise ValueError("stack: an nn.Sequential MLP has one stack of layers — leave stack out")
        self.config = config  # None: a Sequential has no config
        self.model = model
        self.family = self.base_family = family_for(MLP_MODEL_TYPE)
        self.stack = None

    # -- layers --------------------------------------------------------------------------------
    def _is_layer(self, module: "nn.Module") -> bool:
        # a wrapper an operator put in a Linear's place computes one Linear (engine.ops.linear)
        return type(module).__name__ in self.family.layer_types or callable(getattr(module, "materialize", None))

    def _positions(self) -> list[int]:
        """Indices in the Sequential of its layer children."""
        return [i for i, m in enumerate(self.model) if self._is_layer(m)]

    @property
    def num_linears(self) -> int:
        return len(self._positions())

    @property
    def num_layers(self) -> int:
        """Hidden layers: one between each pair of consecutive Linears."""
        return max(self.num_linears - 1, 0)

    def linear(self, index: int) -> "nn.Module":
        return self.model[self._positions()[index]]

    def set_linear(self, index: int, module: "nn.Module") -> None:
        self.model[self._positions()[index]] = module

    def check_hidden_layer(self, layer: int, field: str = "layers") -> None:
        """ValueError unless hidden layer `layer` exists and reaches the next Linear through
        elementwise children only (so it can gain units)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{field}: hidden layer {layer} out of range — this MLP has {self.num_layers} hidden "
                             f"layers (0..{self.num_layers - 1}; hidden layer i is the output of Linear i)")
        positions = self._positions()
        for child in range(positions[layer] + 1, positions[layer + 1]):
            name = type(self.model[child]).__name__
            if name not in self.family.elementwise_types:
                raise ValueError(f"{field}: hidden layer {layer} passes through {name} (child {child}) on its way "
                                 f"to Linear {layer + 1}; only elementwise modules ({', '.join(self.family.elementwise_types[:6])}, "
                                 "...) can take more units — choose another layer")

    # -- transformer facts an MLP does not have ------------------------------------------------
    def blocks(self):
        raise ValueError(MLP_OPS_HINT)

    def ffn(self, layer: int):
        raise ValueError(MLP_OPS_HINT)

    def attention(self, layer: int):
        raise ValueError(MLP_OPS_HINT)

    @property
    def hidden_size(self) -> int:
        raise ValueError(MLP_OPS_HINT)

    @property
    def ffn_size(self) -> int:
        raise ValueError(MLP_OPS_HINT)

    @property
    def num_heads(self) -> int:
        raise ValueError(MLP_OPS_HINT)
