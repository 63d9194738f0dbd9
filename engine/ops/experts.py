"""Mixture-of-experts operators: `upcycle` (a dense FFN becomes a sparse MoE block) and
`add_experts` (a sparse block goes from E to E′ experts). The maths, what is exact and why, and
the limits: docs/moe.md.

upcycle: the dense family's entry names the MoE family its model types become
(``ArchFamily.upcycle_to``: llama, mistral → mixtral, qwen2 → qwen2_moe, qwen3 → qwen3_moe). The
chosen blocks' FFN module is replaced by that family's transformers MoE block, built from a
target config derived from the live one (``moe_config``); the live model keeps its class, and
its config gets the MoE fields and ``widen_family`` = the target, so every later operator and
view sees the MoE family. ``as_moe_class`` (export) rebuilds the model as the target class.

With `init = "copy"` every expert is the FFN and the top-k weights are renormalized (Mixtral
always does; ``norm_topk_prob`` is set where the family has the flag), so the block computes
Σ_i w_i·FFN(x) = FFN(x) whatever the router picks: exact. Qwen2-MoE adds a shared expert behind
a sigmoid gate; its gate starts at weight 0 (σ(0) = 1/2) and the FFN's output is split between
it and the routed experts ("half": shared = FFN, routed downs halved) or carried by it alone
("whole": shared down doubled, routed downs zero).

add_experts: new expert j copies expert j mod E and its router row. For E′ = m·E and top_k m·k
the m copies of an expert have equal logits, so softmax gives each p/m and top-(m·k) takes all
copies of the old top k: Σ over the copies is p again, with or without renormalization (GPT-OSS's
softmax over the top-k logits alike). Any other E′ or top_k changes the routing (measured).

The optimizer state follows (engine.grow.growth.carry_optimizer_state): an upcycled expert's
slices are ``Placement``s of the dense tensors (their moments copied there), an expert's copies
``Split``s of the fused tensors along the expert axis (each copy gets 1/m of the gradient).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from engine.model.families import FAMILY_OVERRIDE_ATTR, ArchFamily, family_for, family_named
from engine.model.forward import forward_logits
from engine.model.view import get_submodule
from engine.ops.expert_units import (
    GROUPED_MM_BYTES,
    ExpertsWithNewUnits,
    ExpertWeights,
    gate_up_positions,
    refuse_adapted_experts,
    unit_dims,
    write_experts,
)
from engine.ops.params import AddExpertsParams, UpcycleParams
from engine.ops.registry import OpResult, Placement, Split
from engine.ops.width import mask_on, value_std

# attributes transformers' MoE modules cache the counts in (router, experts, block): kept equal
# to the config when add_experts changes it
COUNT_ATTRS = {"num_experts": "experts", "top_k": "top_k"}
KMEANS_ITERATIONS = 25
# config keys that name the source class rather than describe the model
_NOT_CARRIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map",
                FAMILY_OVERRIDE_ATTR)


# ---------------------------------------------------------------------------------------------
# the target family and its transformers classes


def upcycle_target(family: ArchFamily, config) -> ArchFamily:
    """The MoE family a dense `family` model with `config` upcycles to (ValueError: none)."""
    model_type = getattr(config, "model_type", None)
    name = family.upcycle_to.get(model_type)
    if name is None:
        known = ", ".join(f"{t} → {n}" for t, n in family.upcycle_to.items()) or "none"
        raise ValueError(f"op: model type {model_type!r} has no mixture-of-experts class in transformers to "
                         f"upcycle to — the {family.name} entry upcycles: {known}")
    return family_named(name)


def upcycled_from(config) -> ArchFamily | None:
    """The dense family of a model upcycled in widen (its model type's family upcycles to the family
    its config names), or None: a model of its own class."""
    named = getattr(config, FAMILY_OVERRIDE_ATTR, None)
    try:
        home = family_for(getattr(config, "model_type", None))
    except ValueError:
        return None
    return home if named and home.upcycle_to.get(config.model_type) == named else None


def moe_config(config, target: ArchFamily, changes: dict | None = None):
    """The transformers config of the target MoE class describing the live `config` (with
    `changes`): every field carried over, and the target's bias flags set to what the dense
    model's projections have (the structure check in `upcycle` refuses what no flag describes)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_CARRIED}
    fields.update(changes or {})
    fields.pop(FAMILY_OVERRIDE_ATTR, None)
    model_type = target.hf_model_type or target.model_types[0]
    source = upcycled_from(config) or family_for(config.model_type)
    rules = {**target.biases, **target.biases_by_type.get(model_type, {})}
    for group, rule in rules.items():
        if isinstance(rule, tuple):  # a config flag: the target keeps the source's projections' biases
            fields[rule[0]] = source.has_bias(group, config)
    made = AutoConfig.for_model(model_type, **fields)
    made._experts_implementation = getattr(config, "_experts_implementation", None) or "eager"
    return made


def decoder_layer(target_config, layer: int) -> nn.Module:
    """A decoder block of the target class on the meta device (shapes only)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(target_config)]
    layer_class = getattr(sys.modules[model_class.__module__], model_class._no_split_modules[0])
    with torch.device("meta"):
        return layer_class(target_config, layer)


def _block_difference(block: nn.Module, ffn_path: str, target_layer: nn.Module, moe_path: str) -> str | None:
    """How `block` differs from `target_layer` outside their FFNs (parameter names and shapes), or None."""
    def shapes(module, skip):
        return {name: tuple(p.shape) for name, p in module.named_parameters()
                if not (name + ".").startswith(skip + ".")}

    ours, theirs = shapes(block, ffn_path), shapes(target_layer, moe_path)
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs:
            return f"it has {name}, which the target block lacks"
        if name not in ours:
            return f"the target block has {name}, which it lacks"
        if ours[name] != theirs[name]:
            return f"{name} is {list(ours[name])} here, {list(theirs[name])} there"
    return None


# ---------------------------------------------------------------------------------------------
# upcycle


def upcycle(view, params: UpcycleParams, gen: torch.Generator) -> OpResult:
    family, config = view.family, view.config
    target = upcycle_target(view.base_family, config)
    moe, layout = target.moe, family.ffn
    layers = params.layer_indices(view.num_layers)
    if moe.dense_layers_field is None and len(layers) != view.num_layers:
        raise ValueError(f"layers: {target.name} blocks are all sparse (its config has no per-layer dense/sparse "
                         "choice), so a partly upcycled model could not be one — upcycle every layer (layers = "
                         "\"all\")")
    shared_mode = _shared_mode(params, target)
    if layout.gate is None or layout.gate_up_fused or family.has_bias("ffn", config):
        raise ValueError(f"op: {target.name} experts are gated FFNs without biases (gate, up, down) — this "
                         f"{family.name} model's FFN is not")
    mlps = _plain_ffns(view, layers)
    sizes = {int(getattr(mlp, layout.up).weight.shape[0]) for mlp in mlps.values()}
    if len(sizes) > 1:
        raise ValueError(f"layers: the chosen blocks' FFNs have widths {sorted(sizes)}, but an MoE config has one "
                         "expert size — widen them alike first, or upcycle them in separate operators")
    units = sizes.pop()
    _check_kernel_widths(units, view.hidden_size, getattr(next(iter(mlps.values())), layout.up).weight)
    changes = _config_changes(view, target, params, layers, units)
    target_config = moe_config(config, target, changes)
    names = {id(p): name for name, p in view.model.named_parameters()}
    inputs = _ffn_inputs(view, layers, mlps) if params.router == "kmeans" else {}
    result = OpResult(exact=params.init == "copy" or shared_mode == "whole")
    for layer in layers:
        target_layer = decoder_layer(target_config, layer)
        difference = _block_difference(view.blocks()[layer], layout.module, target_layer, moe.module)
        if difference:
            raise ValueError(f"op: block {layer} is not a {target.name} block outside its FFN ({difference}) — "
                             "upcycle before operators that change or wrap its modules")
        block = get_submodule(target_layer, moe.module)
        mlp = mlps[layer]
        like = getattr(mlp, layout.up).weight
        if not like.is_meta:
            block = block.to_empty(device=like.device)
            for buffer in block.buffers():
                buffer.zero_()
        block = block.to(like.dtype)
        _fill_block(block, mlp, layout, moe, params, shared_mode, inputs.get(layer), gen, names, result)
        view.set_ffn(layer, block)
        result.new_params.extend(block.parameters())
    for key, value in changes.items():  # now, so that the view below already sees the MoE family
        setattr(config, key, value)
    view.refresh()  # the config names another family now
    result.config_changes = changes
    result.note = _upcycle_note(params, target, shared_mode, len(layers))
    return result


def _shared_mode(params: UpcycleParams, target: ArchFamily) -> str | None:
    if target.moe.shared_expert is None:
        if params.shared_expert is not None:
            raise ValueError(f"shared_expert: {target.name} blocks have no shared expert — remove it")
        return None
    return params.shared_expert or "half"


def _check_kernel_widths(units: int, hidden: int, like: torch.Tensor) -> None:
    """transformers runs fused experts through torch's grouped_mm by default (the export reloads
    so), which needs 16-byte strides: the expert width and d_model in multiples of 16 bytes."""
    multiple = max(1, GROUPED_MM_BYTES // like.element_size())
    bad = [f"{what} {value}" for what, value in (("the FFN width", units), ("d_model", hidden)) if value % multiple]
    if bad:
        raise ValueError(f"op: the experts would run through torch's grouped_mm (transformers' default), which needs "
                         f"widths in multiples of {multiple} here (16-byte strides) — {', '.join(bad)} is not; widen "
                         "to a multiple first (widen_ffn in place, widen_hidden)")


def _plain_ffns(view, layers: list[int]) -> dict[int, nn.Module]:
    """The chosen blocks' FFN modules, each a plain dense MLP of the family and the block's own."""
    layout, owners, mlps = view.family.ffn, {}, {}
    for layer in range(view.num_layers):
        owners.setdefault(id(view.ffn(layer)), layer)
    for layer in layers:
        mlp = view.ffn(layer)
        if owners[id(mlp)] != layer:
            raise ValueError(f"layers: block {layer} shares its FFN with block {owners[id(mlp)]} (a virtual repeat) — "
                             "give it its own tensors first (op = \"unshare\")")
        parts = [getattr(mlp, name, None) for name in (layout.up, layout.gate, layout.down)]
        if not all(type(p) is nn.Linear for p in parts):
            raise ValueError(f"layers: block {layer}'s FFN is not a plain {view.family.name} MLP "
                             f"({type(mlp).__name__}) — upcycle before operators that wrap it (a parallel "
                             "widen_ffn path, adapters on up, gate or down)")
        mlps[layer] = mlp
    return mlps


def _config_changes(view, target: ArchFamily, params: UpcycleParams, layers: list[int], units: int) -> dict:
    """The config fields of the target family that describe the upcycled model."""
    moe = target.moe
    changes = {FAMILY_OVERRIDE_ATTR: target.name, moe.num_experts_field: params.experts,
               moe.top_k_field: params.top_k, moe.expert_size_field: units, moe.output_router_logits_field: False}
    if moe.norm_topk_field:  # copies are exact only when the k weights sum to 1
        changes[moe.norm_topk_field] = True
    if moe.shared_expert_size_field:
        changes[moe.shared_expert_size_field] = units
    if moe.dense_layers_field:
        changes[moe.dense_layers_field] = [i for i in range(view.num_layers) if i not in layers]
        changes[moe.sparse_step_field] = 1
    defaults = moe_config(view.config, target, changes)  # the target class's own defaults
    for key in (moe.aux_loss_field, moe.z_loss_field):  # the losses' coefficients, for the trainer
        if key and hasattr(defaults, key) and not hasattr(view.config, key):
            changes[key] = getattr(defaults, key)
    return changes


@torch.no_grad()
def _fill_block(block, mlp, layout, moe, params: UpcycleParams, shared_mode, inputs, gen, names, result) -> None:
    gate_p, up_p, down_p = (getattr(mlp, name).weight for name in (layout.gate, layout.up, layout.down))
    experts = get_submodule(block, moe.experts)
    router = get_submodule(block, moe.router)
    count, hidden, units = params.experts, gate_p.shape[1], gate_p.shape[0]
    meta = gate_p.is_meta
    gate, up, down = (p.detach().float() for p in (gate_p, up_p, down_p))
    kept = [torch.arange(units)] * count  # units of each expert that keep the FFN's values
    if meta:
        gates, ups, downs = (t.expand(count, *t.shape) for t in (gate, up, down))
    else:
        gates, ups, downs = _expert_weights(params, gate, up, down, gen, kept)
    if shared_mode == "whole":
        downs = torch.zeros_like(downs)
    elif shared_mode == "half":
        downs = downs / 2
    made = write_experts(experts, moe, ExpertWeights(gates, ups, downs))
    if meta:
        return
    router.weight.copy_(_router_weight(params, count, hidden, inputs, gen).to(router.weight))
    if moe.router_bias:
        router.bias.zero_()
    if shared_mode is not None:
        shared = get_submodule(block, moe.shared_expert.module)
        for name, value in ((moe.shared_expert.gate, gate), (moe.shared_expert.up, up),
                            (moe.shared_expert.down, down * (2 if shared_mode == "whole" else 1))):
            getattr(shared, name).weight.copy_(value)
        get_submodule(block, moe.shared_expert_gate).weight.zero_()  # sigmoid(0) = 1/2
        for name, source in ((moe.shared_expert.gate, gate_p), (moe.shared_expert.up, up_p),
                             (moe.shared_expert.down, down_p)):
            result.placements.append(Placement(getattr(shared, name).weight, (), names[id(source)]))
    gate_up, stored_down = made[moe.gate_up], made[moe.down]
    for e, rows in enumerate(kept):
        result.placements += _expert_placements(moe, gate_up, stored_down, e, rows, units, names[id(gate_p)],
                                                names[id(up_p)], names[id(down_p)] if shared_mode != "whole" else None)


def _expert_weights(params: UpcycleParams, gate, up, down, gen, kept: list) -> tuple:
    """gate, up [E, I, H] and down [E, H, I] of the experts: copies, Drop-Upcycling or noisy copies."""
    count, units = params.experts, gate.shape[0]
    gates, ups, downs = (t.expand(count, *t.shape).clone() for t in (gate, up, down))
    if params.init == "noise":
        for stack, source in ((gates, gate), (ups, up), (downs, down)):
            noise = torch.randn(stack.shape, generator=gen) * (params.noise * value_std(source))
            stack += noise.to(stack.device)
    elif params.init == "drop":
        # Drop-Upcycling: per expert, a random subset of round(drop · I) units is re-drawn from
        # N(mean, std) of each whole matrix; the rest keep the FFN's values
        dropped = max(1, round(params.drop * units))
        stats = [(float(t.mean()), value_std(t)) for t in (gate, up, down)]
        for e in range(count):
            order = torch.randperm(units, generator=gen)
            drop, kept[e] = order[:dropped].sort().values, order[dropped:].sort().values
            for (mean, std), stack, dim in zip(stats, (gates, ups, downs), (0, 0, 1)):
                shape = list(stack[e].shape)
                shape[dim] = dropped
                values = (torch.randn(shape, generator=gen) * std + mean).to(stack.device)
                stack[e].index_copy_(dim, drop.to(stack.device), values)
    return gates, ups, downs


def _expert_placements(moe, gate_up, down, e: int, rows: torch.Tensor, units: int, gate_name: str,
                       up_name: str, down_name: str | None) -> list[Placement]:
    """Where expert e's kept units of the dense gate, up and down sit in the fused tensors."""
    gate_pos, up_pos = gate_up_positions(moe, units)
    gate_dim, down_dim = unit_dims(moe)

    def index(dim: int, positions: torch.Tensor) -> tuple:  # expert e, the positions along `dim`
        return (e,) + (slice(None),) * (dim - 1) + (positions,)

    placed = [Placement(gate_up, index(gate_dim, gate_pos[rows]), gate_name, (rows,)),
              Placement(gate_up, index(gate_dim, up_pos[rows]), up_name, (rows,))]
    if down_name is not None:
        placed.append(Placement(down, index(down_dim, rows), down_name, (slice(None), rows)))
    return placed


def _router_weight(params: UpcycleParams, count: int, hidden: int, inputs, gen) -> torch.Tensor:
    if params.router == "random":
        return torch.randn(count, hidden, generator=gen) * params.router_std
    if params.router == "kmeans" and inputs is not None:
        # rows as long as a random row of std router_std (E‖w‖ ≈ std·√d), pointing at the centroids
        return spherical_kmeans(inputs, count, gen).cpu() * (params.router_std * math.sqrt(hidden))
    return torch.zeros(count, hidden)  # zero, or kmeans without a probe (a replay loads the router after)


@torch.no_grad()
def _ffn_inputs(view, layers: list[int], mlps: dict) -> dict[int, torch.Tensor]:
    """Each chosen block's FFN input on the probe batch ([tokens, d_model], float32): what the
    k-means router clusters. Empty without a probe batch (a replay, the meta preview)."""
    inputs = getattr(view, "probe_inputs", None)
    model = view.model
    if inputs is None or any(p.is_meta for p in model.parameters()):
        return {}
    captured = {}

    def keep(layer):
        def hook(_module, args):
            captured[layer] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    hooks = [mlps[layer].register_forward_pre_hook(keep(layer)) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        forward_logits(model, inputs)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return captured


def spherical_kmeans(x: torch.Tensor, k: int, gen: torch.Generator,
                     iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """k unit centroids of the rows of `x` by cosine similarity (k-means++ seeding, then Lloyd's
    steps): a router whose rows are these sends a token to its nearest centroids. With fewer
    rows than k, the centroids the rows cannot seed start as random directions."""
    x = nn.functional.normalize(x.float(), dim=1)
    seeded = min(k, x.shape[0])
    centres = [x[int(torch.randint(x.shape[0], (1,), generator=gen))]]
    for _ in range(1, seeded):
        distance = (1 - (x @ torch.stack(centres).T).max(dim=1).values).clamp_min(0).cpu()
        weights = distance if float(distance.sum()) > 0 else torch.ones_like(distance)
        centres.append(x[int(torch.multinomial(weights, 1, generator=gen))])
    extra = torch.randn(k - seeded, x.shape[1], generator=gen).to(x.device)
    centres = torch.cat([torch.stack(centres), nn.functional.normalize(extra, dim=1)])
    for _ in range(iterations):
        assign = (x @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = torch.bincount(assign, minlength=k) > 0  # an empty cluster keeps its centre
        centres = torch.where(filled[:, None], nn.functional.normalize(sums, dim=1), centres)
    return centres


def _upcycle_note(params: UpcycleParams, target: ArchFamily, shared_mode, layers: int) -> str:
    note = f"{layers} FFN(s) → {target.name} blocks of {params.experts} experts, top {params.top_k}"
    if shared_mode:
        note += f"; shared expert: {shared_mode}"
    if params.top_k == 1:
        note += ("; top_k 1 with renormalized weights: the one weight is always 1, so the router gets no "
                 "gradient from the language-model loss")
    if params.init == "copy" and params.router == "zero" and shared_mode != "whole":
        note += ("; zero router with copies: every token takes the first experts and the copies get equal "
                 "gradients (twins) until something else breaks the tie")
    return note


# ---------------------------------------------------------------------------------------------
# add_experts


def add_experts(view, params: AddExpertsParams, gen: torch.Generator) -> OpResult:
    moe = view.moe
    if moe is None:
        raise ValueError(f"op: {view.family.name} models have no experts — turn their FFNs into experts first "
                         "(op = \"upcycle\")")
    old, top_k = view.num_experts, view.top_k
    layers = view.sparse_layers()
    if not layers:
        raise ValueError(f"op: this {view.family.name} model has no sparse block to add experts to")
    if params.experts <= old:
        raise ValueError(f"experts: the blocks have {old} experts already — add_experts grows them (experts > {old})")
    copies, multiple = divmod(params.experts, old)
    new_k = params.top_k or (copies * top_k if multiple == 0 else top_k)
    if new_k > params.experts:
        raise ValueError(f"top_k: {new_k} > experts = {params.experts} — lower top_k")
    source = torch.arange(params.experts) % old  # new expert j copies expert j mod E
    counts = torch.bincount(source, minlength=old).float()[source]  # copies of each slot's expert
    exact = multiple == 0 and new_k == copies * top_k
    result = OpResult(exact=exact)
    done = set()
    for layer in layers:
        block = view.moe_block(layer)
        if id(block) in done:  # a virtual repeat holds its source's block: grown once
            continue
        done.add(id(block))
        experts = view.experts(layer)
        if isinstance(experts, ExpertsWithNewUnits):
            raise ValueError(f"op: block {layer}'s experts carry a parallel widen_ffn path — add experts before it, "
                             "or widen in place")
        refuse_adapted_experts(experts)
        router, rows = get_submodule(block, moe.router), torch.arange(params.experts) >= old
        tensors = [(router, "weight"), *([(router, "bias")] if moe.router_bias else []),
                   *((experts, path.rpartition(".")[2]) for path in (moe.gate_up, moe.down, moe.gate_up_bias,
                                                                    moe.down_bias) if path)]
        for module, name in tensors:
            before = getattr(module, name)
            with torch.no_grad():
                value = before.detach().index_select(0, source.to(before.device))
                if params.symmetry == "noise" and name == moe.down.rpartition(".")[2] and not before.is_meta:
                    value = value + _paired_noise(value, source, counts, params.symmetry_scale, gen)
            param = nn.Parameter(value.contiguous(), requires_grad=before.requires_grad)
            setattr(module, name, param)
            mask = rows.view(-1, *[1] * (param.dim() - 1)).expand(param.shape)  # the new experts' entries
            result.grown.append((param, mask_on(mask if param.is_meta else mask.clone(), param)))
            # each copy of an expert gets 1/copies of its gradient (its probability is split so)
            result.splits.append(Split(param, 0, source, torch.ones(params.experts), 1 / counts))
        for module in block.modules():  # the counts the modules cache
            for attr, kind in COUNT_ATTRS.items():
                if isinstance(vars(module).get(attr), int):
                    setattr(module, attr, params.experts if kind == "experts" else new_k)
    result.config_changes = {moe.num_experts_field: params.experts, moe.top_k_field: new_k}
    per_token = f"{new_k / top_k:g}× the expert compute per token"
    result.note = (f"{old} → {params.experts} experts, top {top_k} → {new_k} ({per_token})"
                   + ("" if exact else f"; not exact: {_inexact_reason(old, params.experts, top_k, new_k)}"))
    return result


def _paired_noise(down: torch.Tensor, source: torch.Tensor, counts: torch.Tensor, scale: float,
                  gen: torch.Generator) -> torch.Tensor:
    """Noise on the experts' down projections that sums to zero over each expert's copies
    (HyperCloning's paired noise): copies read the same activation with equal weights, so it
    cancels. Std scale × the down projections' std / copies before centring."""
    noise = torch.randn(down.shape, generator=gen).to(down.device, torch.float32)
    slot_counts = counts.to(down.device).view(-1, *[1] * (down.dim() - 1))
    noise = noise * (scale * value_std(down) / slot_counts)
    index = source.to(down.device)
    mean = torch.zeros((int(source.max()) + 1, *down.shape[1:]), device=down.device).index_add_(0, index, noise)
    mean = mean / torch.bincount(source).to(down.device).float().view(-1, *[1] * (down.dim() - 1))
    return (noise - mean[index]).to(down.dtype)


def _inexact_reason(old: int, new: int, top_k: int, new_k: int) -> str:
    if new % old:
        return (f"{new} is not a multiple of {old}: the copied experts' probability mass grows against the others "
                f"(exact counts: {old}·m with top_k {top_k}·m)")
    return f"top_k {new_k} ≠ {new // old}·{top_k}: the copies of the old top {top_k} are not all picked"


# ---------------------------------------------------------------------------------------------
# export


@torch.no_grad()
def as_moe_class(model: nn.Module) -> nn.Module:
    """A model upcycled in widen (its class still the dense one) rebuilt as the MoE class of the
    family its config names, holding the same tensors (no copy); any other model as it is."""
    from transformers import AutoModelForCausalLM

    config = model.config
    source = upcycled_from(config)
    if source is None:
        return model
    target = family_named(getattr(config, FAMILY_OVERRIDE_ATTR))
    target_config = moe_config(config, target)
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(target_config)
    ours, theirs = dict(model.state_dict()), rebuilt.state_dict()
    if set(ours) != set(theirs) or any(tuple(ours[k].shape) != tuple(theirs[k].shape) for k in ours):
        missing = sorted(set(theirs) - set(ours))[:1] or sorted(set(ours) - set(theirs))[:1] or \
            [k for k in ours if tuple(ours[k].shape) != tuple(theirs[k].shape)][:1]
        raise ValueError(f"the upcycled model does not fit a {target.name} model ({missing[0]}) — export it before "
                         "operators that change its blocks")
    rebuilt.load_state_dict(ours, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent ones too (rotary frequencies)
        owner, _, attr = name.rpartition(".")
        setattr(get_submodule(rebuilt, owner) if owner else rebuilt, attr, buffer)
    if getattr(config, "tie_word_embeddings", False):
        rebuilt.tie_weights()
    rebuilt.train(model.training)
    return rebuilt

