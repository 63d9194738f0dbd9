"""Depth operators: insert, split and re-map whole blocks.

- insert_identity  after each chosen block, a copy of it whose attention output projection and
                   FFN down projection (weights and biases) are zero: an exact identity in a
                   pre-norm residual block (LLaMA Pro, Net2DeeperNet). Only the copies are new.
                   Families with post-norms (OLMo-2, Gemma) zero those norms' gains instead.
- split_residual   each chosen block becomes k copies, each adding F(x)/k (the two output
                   projections scaled by 1/k): x + F(x) ~ k small steps. Not exact; measured.
- map_layers       target block i = source block mapping[i], e.g. [0, 1, 1, 1, 2, 2, 2, 3], with
                   the helpers keep_ends = {depth}, dus = {copies, drop} (SOLAR) and repeat = g
                   (G_stack: the whole stack g times). A repeat is *real* (a deep copy, own
                   tensors) or *virtual* (weight-tied to its source). As a growth mid-run
                   (``[stages.grow]``) a real repeat starts with its source's optimizer state
                   (``OpResult.copies``), a virtual one shares its source's Parameters and so
                   its state.
- unshare          give virtual blocks their own tensors (exact).

Virtual blocks are plain Hugging Face block modules, new module objects whose ``nn.Parameter``
objects ARE the source's: one tensor in memory, gradients from every use add up, parameter
counts (``model.parameters()`` de-duplicates) and optimizers see it once. Being distinct modules,
each keeps its own layer index (its own KV-cache slot) and can get its own adapters (PEFT wraps
each twin's projections separately, the base weights stay shared). Nothing marks a block as
virtual: a block is tied when it holds a Parameter that another block also holds
(``layer_kinds`` reports it).

Export: blocks are plain modules, so no ``materialize()`` is needed, but shared tensors must be
untied before saving (safetensors refuses tensors that share memory, and a reload would tie
nothing). ``engine.exports.hf_directory`` should call ``untie(model)`` first, and in any case BEFORE merging
adapters into base weights: merging LoRA of twin A into a tensor twin B also holds would merge
it twice. ``untie`` leaves the intended input/output embedding tie alone.

Every depth change goes through ``_install``: the ModuleList is refilled in place, the layer
index attributes named by the family (``layer_idx`` / ``layer_id``) are renumbered, and the config
follows: depth field, the family's per-layer fields (GPT-Neo ``attention_layers`` and its compact
``attention_types``) and ``layer_types`` where the config has one, each entry taken from the
source block; a stack-level table one block computes for all (T5's relative position bias)
stays with whatever block comes first. A block keeps its own attention kind (GPT-Neo's local
window lives in the module), so the config is renumbered to describe what the modules already do.
Note: GPT-2 with ``scale_attn_by_inverse_layer_idx`` fixes a block's scaling from its index at
construction; a moved block keeps its source's scaling, which a reload from the config would not.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from engine.model.view import get_submodule, holds_experts
from engine.ops.params import InsertIdentityParams, MapLayersParams, SplitResidualParams, UnshareParams
from engine.ops.registry import OpResult

# ---------------------------------------------------------------------------------------------
# copies


def clone_block(block: nn.Module, config, share_weights: bool) -> nn.Module:
    """A new block module. `share_weights`: its Parameters are the source's own objects (virtual);
    else it gets copies (real). The model config is never copied (modules read it at run time)."""
    memo = {id(config): config}
    if share_weights:
        for p in block.parameters():
            memo[id(p)] = p
    return copy.deepcopy(block, memo)


def _output_projections(view, block: nn.Module) -> list[nn.Module]:
    """The attention output and FFN down projections of a block (innermost FFN when widened in
    parallel: the extension's own down projection is included too; a sparse block's shared
    expert's down projection — its experts' down tensors are ``_expert_outputs``)."""
    family = view.family
    attn = get_submodule(block, family.attention.module)
    modules = [getattr(attn, family.attention.out)]
    modules += [get_submodule(block, path) for path in family.extra_outputs]  # e.g. T5 cross-attention
    if holds_experts(view.family, block):
        shared = family.moe.shared_expert
        if shared:
            moe = get_submodule(block, family.moe.module)
            modules.append(getattr(get_submodule(moe, shared.module), shared.down))
        return modules
    mlp = get_submodule(block, family.ffn.module)
    while isinstance(mlp, nn.Module):
        down = getattr(mlp, family.ffn.down, None)
        if down is None:
            down = getattr(mlp, "down", None)  # a parallel extension (engine.ops.width)
        if isinstance(down, nn.Module):
            modules.append(down)
        mlp = getattr(mlp, "base", None)
    return modules


def _expert_outputs(view, block: nn.Module) -> list[nn.Parameter]:
    """A sparse block's expert tensors that write the residual stream: every expert's down
    projection and bias (GPT-OSS), in the experts module and in any parallel new units beside it,
    and the LoRA B of an adapter on the down tensors (PEFT's ParamWrapper adds B·A to them)."""
    if not holds_experts(view.family, block):
        return []
    moe = view.family.moe
    experts = get_submodule(get_submodule(block, moe.module), moe.experts)
    down = moe.down.rpartition(".")[2]
    tensors = []
    for module in experts.modules():  # the wrapper's base and new experts modules, adapter layers
        for path in (moe.down, moe.down_bias):
            p = module._parameters.get(path.rpartition(".")[2]) if path else None
            if p is not None:
                tensors.append(p)
        if getattr(module, "parameter_name", None) == down:
            tensors += [p for m in module.lora_B.values() for p in m.parameters()]
    return tensors


def residual_outputs(view, block: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """The tensors through which `block` writes the residual stream, each with the offset its
    stored value carries: multiplying every (tensor + offset) by c multiplies the block's residual
    contributions by c. They are the output projections' weights and biases; under PEFT adapters,
    the innermost base layer and the LoRA B matrices of every adapter layer around it (adapters of
    later stages wrap earlier ones: LoRA inside IA3 must be scaled too; IA3 multiplies what it
    wraps, so scaling inside it suffices); a sparse block's expert down tensors.

    Families whose sub-layer outputs pass a norm before the residual add (OLMo-2, Gemma 2/3:
    ``post_norms``) write through those norms' gains instead (offset: the family's
    ``norm_offset``, Gemma's 1 + w) and biases, if any: the norm would undo a scaled projection.
    Each tensor once (a block never holds one twice, but a tied twin block holds its source's)."""
    if view.family.post_norms:
        found = []
        for path in view.family.post_norms:
            norm = get_submodule(block, path)
            while "weight" not in norm._parameters and isinstance(getattr(norm, "norm", None), nn.Module):
                norm = norm.norm  # a masked norm of widen_hidden wraps the gain's module
            found.append((norm.weight, view.family.norm_offset))
            if norm._parameters.get("bias") is not None:
                found.append((norm.bias, 0.0))
        return found
    tensors = []
    for module in _output_projections(view, block):
        chain = [module]  # the projection and every layer it wraps (PEFT keeps it as base_layer)
        while isinstance(getattr(chain[-1], "base_layer", None), nn.Module):
            chain.append(chain[-1].base_layer)
        base = chain[-1]
        own = [base._parameters.get("weight"), base._parameters.get("bias")]
        if hasattr(base, "materialize"):  # a widen wrapper (parallel_linear, concat): linear in every tensor
            own = list(base.parameters())
        tensors += own
        for layer in chain[:-1]:
            lora_b = getattr(layer, "lora_B", None)
            if isinstance(lora_b, nn.ModuleDict):
                tensors += [p for m in lora_b.values() for p in m.parameters()]
    tensors += _expert_outputs(view, block)
    unique = {id(p): p for p in tensors if p is not None}
    return [(p, 0.0) for p in unique.values()]


@torch.no_grad()
def _scale_outputs(view, block: nn.Module, factor: float) -> None:
    """Multiply the block's residual contributions by `factor`, through ``residual_outputs``: a
    tensor stored with an offset (Gemma's 1 + w) scales the sum, so factor 0 gives weight =
    -offset. Post-norm families scale the norms' gains, not the projections: a zero gain (with
    the projections kept) still lets the block learn."""
    scale_residual_outputs(residual_outputs(view, block), factor)


@torch.no_grad()
def scale_residual_outputs(tensors: list[tuple[nn.Parameter, float]], factor: float) -> None:
    """(tensor + offset) -> (tensor + offset) · factor for each of ``residual_outputs``' pairs (an
    offset sum in float32 at least, as the norms compute it)."""
    for p, offset in tensors:
        if offset:
            p.copy_((p.to(torch.promote_types(p.dtype, torch.float32)) + offset) * factor - offset)
        else:
            p.mul_(factor)


def _shared_ids(blocks, skip: int | None = None) -> set[int]:
    """ids of Parameters held by any block other than index `skip`."""
    return {id(p) for i, b in enumerate(blocks) if i != skip for p in b.parameters()}


def _own_params(block: nn.Module, shared: set[int]) -> list[nn.Parameter]:
    """Give `block` its own copy of each Parameter whose id is in `shared`; returns the copies."""
    copies: dict[int, nn.Parameter] = {}
    for module in block.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) not in shared:
                continue
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            module._parameters[name] = copies[id(p)]
    return list(copies.values())


def layer_kinds(view) -> list[str]:
    """"virtual" for a block that shares a Parameter with an earlier block, else "real"."""
    seen: set[int] = set()
    kinds = []
    for block in view.blocks():
        ids = {id(p) for p in block.parameters()}
        kinds.append("virtual" if ids & seen else "real")
        seen |= ids
    return kinds


def untie(model: nn.Module) -> int:
    """Give every Parameter held by more than one module its own copy, except the input/output
    embedding tie. Call before export (and before merging adapters). Returns how many were made."""
    keep = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            keep.add(id(module.weight))
    seen: set[int] = set()
    made = 0
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in seen and id(p) not in keep:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                made += 1
            seen.add(id(p))
    return made


# ---------------------------------------------------------------------------------------------
# installing a new stack


def compact_attention_types(types: list[str]) -> list:
    """Run-length form accepted by GPTNeoConfig.attention_types: [[["global"], 1], [["local"], 3]]."""
    runs: list = []
    for t in types:
        if runs and runs[-1][0] == [t]:
            runs[-1][1] += 1
        else:
            runs.append([[t], 1])
    return runs


def _first_block_keeps_stack_embedding(layout, old_first: nn.Module, new_blocks: list[nn.Module]) -> None:
    """T5 computes its relative position bias in the stack's first block and passes it on: the
    table belongs to the stack. Whatever block lands first gets the table the old first block
    held (the same Parameter, so a mapping may move or drop block 0); copies placed later hold
    none (they would never read it)."""
    name, flag = layout.per_head_embedding, layout.per_head_embedding_flag
    if name is None or flag is None:
        return
    table = getattr(get_submodule(old_first, layout.module), name)
    for index, block in enumerate(new_blocks):
        attention = get_submodule(block, layout.module)
        if index == 0:
            setattr(attention, name, table)
        elif getattr(attention, flag):
            delattr(attention, name)
        setattr(attention, flag, index == 0)


def _install(view, new_blocks: list[nn.Module], sources: list[int]) -> dict:
    """Replace the stack by `new_blocks` (new block i came from old block sources[i]); renumber
    layer indices and update the config. Returns the config fields changed."""
    family = view.family
    config = view.config
    blocks = view.blocks()
    _first_block_keeps_stack_embedding(family.attention, blocks[0], new_blocks)
    del blocks[:]
    blocks.extend(new_blocks)
    for index, block in enumerate(blocks):
        for module in block.modules():
            for attr in family.attention.layer_index_attrs:
                if hasattr(module, attr):
                    setattr(module, attr, index)
    changes = {family.num_layers_field: len(new_blocks)}
    for name in dict.fromkeys((*family.per_layer_fields, "layer_types")):
        old = getattr(config, name, None)
        if isinstance(old, (list, tuple)):
            changes[name] = [old[s] for s in sources]
    if "attention_layers" in changes and hasattr(config, "attention_types"):
        changes["attention_types"] = compact_attention_types(changes["attention_layers"])
    changes.update(_sparse_layer_fields(view, sources))
    # the config must describe the new stack now: models read it in forward (e.g. Llama iterates
    # layers[:num_hidden_layers]); apply_stage sets these again from OpResult.config_changes
    for name, value in changes.items():
        setattr(config, name, value)
    if "attention_layers" in changes:  # GPT-Neo attention modules keep the list (read at init only)
        for module in blocks.modules():
            if isinstance(getattr(module, "attention_layers", None), list):
                module.attention_layers = changes["attention_layers"]
    return changes


def _sparse_layer_fields(view, sources: list[int]) -> dict:
    """A family whose config lists its dense blocks (Qwen2/3-MoE: mlp_only_layers and a sparse
    step) gets the list of the new stack, each block of its source's kind, and step 1 (a step
    cannot describe an arbitrary mapping)."""
    moe = view.family.moe
    if moe is None or moe.dense_layers_field is None:
        return {}
    changes = {moe.dense_layers_field: [i for i, s in enumerate(sources) if not view.is_sparse(s)]}
    if moe.sparse_step_field:
        changes[moe.sparse_step_field] = 1
    return changes


# ---------------------------------------------------------------------------------------------
# operators


def _chosen_layers(params, num_layers: int) -> list[int]:
    """The blocks an operator acts on; a clear error for one the model does not have (the plan
    check reports these too, but Python callers skip it)."""
    chosen = params.layer_indices(num_layers)
    bad = [i for i in chosen if i >= num_layers]
    if bad:
        raise ValueError(f"layers: layer {', '.join(map(str, bad))} out of range — the model has {num_layers} "
                         f"layers (0..{num_layers - 1}); use those indices or \"all\"")
    return chosen


def insert_identity(view, params: InsertIdentityParams, gen: torch.Generator) -> OpResult:
    n = view.num_layers
    after = set(_chosen_layers(params, n))
    old = list(view.blocks())
    new_blocks, sources, added = [], [], []
    for i, block in enumerate(old):
        new_blocks.append(block)
        sources.append(i)
        if i in after:
            twin = clone_block(block, view.config, share_weights=False)
            _scale_outputs(view, twin, 0.0)
            new_blocks.append(twin)
            sources.append(i)
            added.append(twin)
    changes = _install(view, new_blocks, sources)
    return OpResult(new_params=[p for b in added for p in b.parameters()], exact=True,
                    config_changes=changes,
                    note=f"{len(added)} identity blocks inserted ({_zeroed(view)}): {n} -> {len(new_blocks)}")


def _zeroed(view) -> str:
    return "zero post-norm gains" if view.family.post_norms else "zero output projections"


def split_residual(view, params: SplitResidualParams, gen: torch.Generator) -> OpResult:
    n, k = view.num_layers, params.k
    chosen = set(_chosen_layers(params, n))
    old = list(view.blocks())
    new_blocks, sources, added, untied = [], [], [], 0
    for i, block in enumerate(old):
        if i not in chosen:
            new_blocks.append(block)
            sources.append(i)
            continue
        shared = {id(p) for p in block.parameters()} & _shared_ids(old, skip=i)
        if shared:  # scaling a tied tensor in place would scale its twins too
            untied += len(_own_params(block, shared))
        copies = [clone_block(block, view.config, share_weights=False) for _ in range(k - 1)]
        for b in [block, *copies]:
            _scale_outputs(view, b, 1.0 / k)
        new_blocks.extend([block, *copies])
        sources.extend([i] * k)
        added.extend(copies)
    changes = _install(view, new_blocks, sources)
    note = f"{len(chosen)} blocks split into {k} copies adding F(x)/{k} each: {n} -> {len(new_blocks)} (approximate)"
    if untied:
        note += f"; {untied} tensors of tied blocks were given their own copy before scaling"
    return OpResult(new_params=[p for b in added for p in b.parameters()], exact=False,
                    config_changes=changes, note=note)


def map_layers(view, params: MapLayersParams, gen: torch.Generator) -> OpResult:
    n = view.num_layers
    mapping = params.resolve(n)
    bad = sorted({m for m in mapping if m >= n})
    if bad:
        raise ValueError(f"mapping: layer {', '.join(map(str, bad))} out of range — the model has {n} layers")
    kinds = params.resolve_kinds(mapping)
    old = list(view.blocks())
    new_blocks, added, seen, copies = [], [], set(), []
    counts = {"real": 0, "virtual": 0}
    for source, kind in zip(mapping, kinds):
        block = old[source]
        if source not in seen:  # a source's first occurrence holds the source block itself
            seen.add(source)
            new_blocks.append(block)
            continue
        if kind == "virtual" and params.scale is not None:
            raise ValueError("map_layers: scale needs real repeats — kinds = \"real\" or leave kinds out")
        twin = clone_block(block, view.config, share_weights=kind == "virtual")
        if kind == "real":
            if params.scale is not None:
                _scale_outputs(view, twin, params.scale)
            added.append(twin)
            sources = dict(block.named_parameters())
            copies += [(p, sources[name]) for name, p in twin.named_parameters() if name in sources]
        counts[kind] += 1
        new_blocks.append(twin)
    changes = _install(view, new_blocks, mapping)
    exact = mapping == list(range(n))
    dropped = sorted(set(range(n)) - set(mapping))
    note = (f"{n} -> {len(mapping)} blocks {mapping}: {len(seen)} sources, {counts['real']} real repeats, "
            f"{counts['virtual']} virtual (weight-tied) repeats")
    if dropped:
        note += f"; source blocks {dropped} dropped"
    if params.scale is not None and len(mapping) > len(seen):
        note += f"; repeats' output projections scaled by {params.scale}"
    if counts["virtual"]:
        note += "; virtual repeats add no parameters (freeze = \"base\" trains none of them: add adapters)"
    return OpResult(new_params=[p for b in added for p in b.parameters()], exact=exact,
                    config_changes=changes, note=note, copies=copies)


def unshare(view, params: UnshareParams, gen: torch.Generator) -> OpResult:
    blocks = list(view.blocks())
    made: list[nn.Parameter] = []
    for i in _chosen_layers(params, len(blocks)):
        shared = {id(p) for p in blocks[i].parameters()} & _shared_ids(blocks, skip=i)
        if shared:
            made.extend(_own_params(blocks[i], shared))
    return OpResult(new_params=made, exact=True,
                    note=f"{len(made)} shared tensors copied" if made else "no chosen block shared tensors")
