"""Adapter operators: LoRA and IA3 (PEFT layers) injected in place into the chosen projections.

The model stays the plain Hugging Face model the rest of widen uses: adapters are put in with
``peft.inject_adapter_in_model`` (no ``PeftModel`` wrapper), targeting the *exact dotted names* of
the chosen layers' projections. Roles (``q k v o up down gate``) resolve through the family
description; fused-qkv families (GPT-2 ``c_attn``, NeoX ``query_key_value``) map q/k/v to the one
fused projection, which the adapter then covers as a whole.

Virtual layers (``engine.ops.depth``: distinct block modules whose Parameters are the source
block's) each get their *own* adapter, since PEFT wraps module objects: twins share the frozen base
weight and differ only by their adapters, as in the virtual-layer-stacking note. An adapter put on a
block *before* it is repeated virtually is tied like the rest of the block: add adapters after the
mapping to give every twin its own.

A projection adapted again by a later stage is wrapped once more: a LoRA and an IA3 adapter on one
projection nest (the newer outside, its ``base_layer`` the older); two LoRA adapters share one
PEFT layer. A name reused on more modules joins that adapter, with the same kind and settings.

Several adapters can live in one model (one per stage or task); ``set_active_adapters`` switches
them (task-specific modules), and every new injection keeps the existing ones active (PEFT alone
would make only the newest adapter active).

Export: PEFT layers are not plain modules and have no ``materialize`` method; call
``merge_adapters(model)`` (or ``materialize_adapter_layer`` per layer) before the export's
materialize pass. Merging writes into the base weight, so a weight shared by virtual twins is
first *untied* (the merged layer gets its own copy): the twin keeps the original weight and its
own adapter. ``adapter_state_dict`` / ``load_adapter_state`` save one adapter's tensors with
PEFT's key layout (``<module>.lora_A.weight``, ``<module>.ia3_l``; ``<module>`` is the plain
model's path, see ``plain_module_path``; an expert tensor's PEFT nesting, see ``_peft_path``),
safetensors-ready.

Mixture-of-experts blocks: the roles up/gate/down of a sparse block name its experts' fused 3-D
tensors (``MoELayout.gate_up`` / ``down``; up and gate are one tensor, adapted as a whole), which
PEFT's LoRA adapts as parameters (``LoraConfig.target_parameters``, a ``lora.ParamWrapper`` around
the experts module: A [r·E, in], B [out, r·E], one rank-r pair per expert, [E, in, out] read where
the experts module says ``is_transposed``). IA3 adapts modules only, and the ParamWrapper has no
dropout: both are refused on expert tensors. Dense blocks (Qwen's ``mlp_only_layers``) keep their
Linears.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from engine.model.view import get_submodule, holds_experts
from engine.ops.params import ADAPTER_ROLES, AdapterOpParams, IA3Params, LoRAParams
from engine.ops.registry import OpResult
from engine.ops.width import shapes_only

__all__ = ["lora", "ia3", "role_module_names", "block_target", "adapter_names", "set_active_adapters",
           "adapter_state_dict", "load_adapter_state", "merge_adapters", "materialize_adapter_layer", "adapter_layers",
           "plain_module_path", "adapted_path"]


# ---------------------------------------------------------------------------------------------
# roles and dotted paths -> dotted target names


def _role_path(view, layer: int, role: str) -> tuple[str, str, tuple[str, ...]]:
    """(container inside the block, attribute, the roles that attribute holds) of `role` in block
    `layer`: a fused projection holds several (qkv; gate_up of Phi-3 and of every expert)."""
    family = view.family
    att, ffn, moe = family.attention, family.ffn, family.moe
    if role in ("q", "k", "v"):
        return att.module, att.qkv or getattr(att, role), ("q", "k", "v") if att.qkv else (role,)
    if role == "o":
        return att.module, att.out, (role,)
    if holds_experts(family, view.blocks()[layer]):  # a sparse block: the experts' fused 3-D tensors
        path = moe.down if role == "down" else moe.gate_up
        container, _, leaf = f"{moe.module}.{path}".rpartition(".")
        return container, leaf, (role,) if role == "down" else ("gate", "up")
    if role == "gate" and not ffn.gate:
        raise ValueError(f"modules: role 'gate' does not exist in {family.name} models (their MLP has no gate "
                         "projection) — use up, down or the attention roles")
    fused = ffn.gate_up_fused and role in ("gate", "up")
    return ffn.module, getattr(ffn, role), ("gate", "up") if fused else (role,)


def _lookup(root: nn.Module, dotted: str):
    """The object at `dotted`, looking through PEFT layers (an adapted experts module keeps the
    tensors on its ``base_layer``, which PEFT's names leave out)."""
    obj = root
    for part in dotted.split("."):
        while not hasattr(obj, part) and isinstance(getattr(obj, "base_layer", None), nn.Module):
            obj = obj.base_layer
        obj = getattr(obj, part)
    return obj


def _resolve(view, layer: int, container: str, leaf: str) -> str:
    """Dotted name (from the model root) of `leaf` in block `layer`, looking through wrappers that
    keep the original module as `.base` (e.g. a parallel-widened FFN) and through PEFT layers."""
    path = f"{view.family.blocks}.{layer}" + (f".{container}" if container else "")
    module = _lookup(view.model, path)
    while True:
        held = module
        while not hasattr(held, leaf) and isinstance(getattr(held, "base_layer", None), nn.Module):
            held = held.base_layer
        if hasattr(held, leaf) or not isinstance(getattr(held, "base", None), nn.Module):
            break
        path, module = path + ".base", held.base
    if not hasattr(held, leaf):
        raise ValueError(f"modules: no '{leaf}' in layer {layer} ({path}, a {type(module).__name__})")
    return f"{path}.{leaf}"


def block_target(view, layer: int, name: str) -> str:
    """Dotted name (from the model root) of `name` — a role, or a dotted path inside the block —
    in block `layer`; ValueError naming it if the block has no such thing."""
    if name in ADAPTER_ROLES:
        return _resolve(view, layer, *_role_path(view, layer, name)[:2])
    container, _, leaf = name.rpartition(".")
    try:
        return _resolve(view, layer, container, leaf)
    except (AttributeError, ValueError):
        att = view.family.attention
        raise ValueError(f"modules: no module '{name}' in layer {layer} — name a role ({', '.join(ADAPTER_ROLES)}) "
                         f"or a dotted path inside the block such as '{att.module}.{att.out}'") from None


def _targets(view, layers: list[int], names: list[str]) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """dotted target name -> (the names that chose it, the roles it holds), in layer order."""
    targets: dict[str, tuple[list[str], tuple[str, ...]]] = {}
    for layer in layers:
        for name in names:
            held = _role_path(view, layer, name)[2] if name in ADAPTER_ROLES else ()
            targets.setdefault(block_target(view, layer, name), ([], held))[0].append(name)
    return targets


def role_module_names(view, layers: list[int], roles: list[str]) -> dict[str, list[str]]:
    """dotted target name -> the roles (or paths) it serves, in layer order (fused roles share one
    name; in a sparse MoE block up/gate/down name the experts' 3-D tensors)."""
    return {target: named for target, (named, _) in _targets(view, layers, roles).items()}


def _expert_tensor(view, target: str) -> bool:
    """Whether `target` is one of an MoE block's fused expert tensors (the layout's gate_up / down)."""
    moe = view.moe
    if moe is None or not isinstance(_lookup(view.model, target), nn.Parameter):
        return False
    return target.rpartition(".")[2] in {path.rpartition(".")[2] for path in (moe.gate_up, moe.down)}


def _check_targets(view, params: AdapterOpParams, targets: dict, experts: set[str]) -> None:
    """One ValueError for a target the op cannot adapt: what PEFT wraps as a layer is a Linear
    (Conv1D); an expert tensor only LoRA adapts (PEFT's ParamWrapper, which has no dropout)."""
    from transformers.pytorch_utils import Conv1D

    for target, (named, _) in targets.items():
        what = f"'{'/'.join(named)}' ({target})"
        if target in experts:
            if params.op != "lora":
                raise ValueError(f"modules: {what} is a fused 3-D expert tensor of {view.family.name}: PEFT's "
                                 f"{params.op.upper()} adapts modules only, not tensors — adapt the experts with "
                                 "op = \"lora\", or name other roles")
            if params.dropout:
                raise ValueError(f"dropout: {what} is a fused 3-D expert tensor, which PEFT's LoRA adapts without "
                                 "dropout (lora.ParamWrapper) — set dropout = 0, or name other roles")
            continue
        module = _lookup(view.model, target)
        base = module
        while isinstance(getattr(base, "base_layer", None), nn.Module):
            base = base.base_layer
        if not isinstance(base, (nn.Linear, Conv1D)) and not hasattr(module, "materialize"):
            moe = view.moe
            experts_hint = f" or an expert tensor ({moe.module}.{moe.gate_up}, {moe.module}.{moe.down})" if moe else ""
            raise ValueError(f"modules: {what} is a {type(base).__name__}, not a Linear{experts_hint} — name a "
                             "projection")


# ---------------------------------------------------------------------------------------------
# the adapter layers in a model


def _tuner_layer_cls():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, PEFT layer) for every adapter layer, outermost first (named_modules order)."""
    cls = _tuner_layer_cls()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def _layer_adapters(layer) -> dict[str, str]:
    """adapter name -> kind ('lora' / 'ia3') held by one PEFT layer."""
    found = {}
    for attr, kind in (("lora_A", "lora"), ("ia3_l", "ia3")):
        for name in getattr(layer, attr, {}) or {}:
            found[name] = kind
    return found


def adapter_names(model: nn.Module) -> dict[str, str]:
    """Every adapter in the model: name -> kind."""
    found: dict[str, str] = {}
    for _, layer in adapter_layers(model):
        found.update(_layer_adapters(layer))
    return found


@contextmanager
def _keep_requires_grad(model: nn.Module):
    """PEFT's injection and set_adapter change requires_grad; freezing is the Freezer's job."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def set_active_adapters(model: nn.Module, names=None) -> None:
    """Make exactly `names` active (None: every adapter). Adapters not named are skipped in the
    forward pass — the frozen base is shared, so switching task switches only these modules."""
    if isinstance(names, str):
        names = [names]
    present = adapter_names(model)
    unknown = [n for n in names or [] if n not in present]
    if unknown:  # a typo would otherwise silently switch every adapter off
        raise ValueError(f"no adapter {', '.join(repr(n) for n in unknown)} in the model — adapters: "
                         f"{', '.join(present) or 'none'}")
    inactive = set() if names is None else set(present) - set(names)
    model._widen_inactive_adapters = inactive
    _reactivate(model)


def _reactivate(model: nn.Module) -> None:
    inactive = getattr(model, "_widen_inactive_adapters", set())
    with _keep_requires_grad(model):
        for _, layer in adapter_layers(model):
            layer.set_adapter([n for n in _layer_adapters(layer) if n not in inactive])


# ---------------------------------------------------------------------------------------------
# the operators


def _default_name(view, params: AdapterOpParams) -> str:
    """'<op>_stage<N>' (the stage comes from the view, set by apply_stage), made unique in the model.
    Picked once per application: the other stacks of a multi-stack model reuse it."""
    if params._default_name is not None:
        return params._default_name
    stage = getattr(view, "stage_index", None)
    base = f"{params.op}_stage{stage}" if stage is not None else params.op
    taken, name, k = set(adapter_names(view.model)), base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    params._default_name = name
    return name


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    while hasattr(module, "base_layer"):
        module = module.base_layer
    return isinstance(module, Conv1D)


def _check_joinable(name: str, existing, params: AdapterOpParams) -> None:
    """An adapter saved in PEFT format has one config: a name reused on more modules (a later
    stage, or the other stack of a T5) must keep the kind and the LoRA settings it has."""
    kind = "lora" if hasattr(existing, "lora_alpha") else "ia3"
    if kind != params.op:
        raise ValueError(f"name: adapter '{name}' is already a {kind} adapter — give this {params.op} "
                         "adapter another name")
    if kind == "lora":
        have = {"r": existing.r, "alpha": existing.lora_alpha, "dropout": existing.lora_dropout}
        want = {"r": params.r, "alpha": params.alpha, "dropout": params.dropout}
        differ = [k for k in have if float(have[k]) != float(want[k])]
        if differ:
            raise ValueError(f"{differ[0]}: adapter '{name}' already has {', '.join(f'{k} = {have[k]}' for k in differ)}; "
                             f"adding it to more modules needs the same settings — set "
                             f"{', '.join(f'{k} = {have[k]}' for k in differ)} or use another name")


def _chosen(view, params: AdapterOpParams) -> tuple[dict, set[str]]:
    """(target name -> (the names that chose it, the roles it holds), the targets that are expert
    tensors), every target checked (`_check_targets`)."""
    layers = params.layer_indices(view.num_layers)
    bad = [i for i in layers if not 0 <= i < view.num_layers]
    if bad:
        raise ValueError(f"layers: layer {', '.join(map(str, bad))} out of range — the model has "
                         f"{view.num_layers} layers (0..{view.num_layers - 1}); use those indices or \"all\"")
    targets = _targets(view, layers, params.modules)
    experts = {t for t in targets if _expert_tensor(view, t)}
    _check_targets(view, params, targets, experts)
    return targets, experts


def _adapter_layer(model: nn.Module, target: str, experts: set[str]):
    """The PEFT layer adapting `target` (None before one does): the module itself, or for an
    expert tensor the ParamWrapper of that tensor in the chain around its experts module."""
    if target not in experts:
        return get_submodule(model, target)
    holder, _, leaf = target.rpartition(".")
    layer = get_submodule(model, holder)
    while isinstance(layer, _tuner_layer_cls()):
        if getattr(layer, "parameter_name", None) == leaf:
            return layer
        layer = layer.base_layer
    return None


def _notes(targets: dict, experts: set[str], view) -> str:
    """What a fused target or an expert tensor means for the adapter."""
    fused = {t.rsplit(".", 1)[1]: "/".join(held) for t, (_, held) in targets.items() if len(held) > 1}
    notes = [f"fused projection {leaf}: one adapter covers {held}" for leaf, held in sorted(fused.items())]
    if experts:
        leaves = ", ".join(sorted({t.rsplit(".", 1)[1] for t in experts}))
        notes.append(f"expert tensors {leaves}: one low-rank pair per expert ({view.num_experts} experts)")
    return "; ".join(notes)


def _inject(view, params: AdapterOpParams, make_config, targets: dict,
            experts: set[str]) -> tuple[str, OpResult]:
    model = view.model
    # widen's own wrappers (a parallel path, a wider input) are not modules PEFT can adapt
    wrapped = [t for t in targets if t not in experts and hasattr(get_submodule(model, t), "materialize")]
    if wrapped:
        kind = type(get_submodule(model, wrapped[0])).__name__
        raise ValueError(f"modules: '{'/'.join(targets[wrapped[0]][0])}' is {wrapped[0]}, a {kind} an earlier "
                         f"operator made, which PEFT cannot adapt — put {params.op} before that operator in the plan, "
                         "or adapt other roles")
    name = params.name or _default_name(view, params)
    clash = [t for t in targets if name in _layer_adapters(_adapter_layer(model, t, experts))]
    if clash:
        raise ValueError(f"name: adapter '{name}' already exists on {clash[0]} — choose another name")
    existing_configs = dict(getattr(model, "peft_config", {}) or {})
    if name in existing_configs:  # joining an adapter on more modules: one kind, one set of settings
        _check_joinable(name, existing_configs[name], params)

    before = {id(p) for p in model.parameters()}
    from peft import inject_adapter_in_model

    # GPT-2's Conv1D stores weights transposed: PEFT needs fan_in_fan_out per group of targets;
    # expert tensors go with the Linears (PEFT's target_parameters)
    groups: dict[bool, list[str]] = {}
    for target in targets:
        if target not in experts:
            groups.setdefault(_is_conv1d(get_submodule(model, target)), []).append(target)
    if experts and False not in groups:
        groups[False] = []
    configs = {}
    with _keep_requires_grad(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for conv1d, group in groups.items():
            if "peft_config" in model.__dict__:
                del model.peft_config  # one tuner per injection; the registry is rebuilt below
            config = make_config(group, [t for t in targets if t in experts and not conv1d], conv1d)
            inject_adapter_in_model(config, model, adapter_name=name)
            configs[conv1d] = config
    model.peft_config = {**existing_configs, name: configs[False] if False in configs else configs[True]}
    _reactivate(model)

    new_params = [p for p in model.parameters() if id(p) not in before]
    for p in new_params:
        p.requires_grad_(True)
    result = OpResult(new_params=new_params, exact=True, note=_notes(targets, experts, view))
    return name, result


def lora(view, params: LoRAParams, gen: torch.Generator) -> OpResult:
    """LoRA on the chosen projections; A ~ PEFT's kaiming-uniform (drawn from `gen`), B = 0. An
    expert tensor [experts, ...] gets PEFT's ParamWrapper: A [r·experts, in], B [out, r·experts],
    one rank-r pair per expert."""
    from peft import LoraConfig

    targets, experts = _chosen(view, params)

    def make_config(modules, tensors, conv1d):
        return LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout,
                          target_modules=list(modules), target_parameters=list(tensors) or None,
                          fan_in_fan_out=conv1d, bias="none")

    name, result = _inject(view, params, make_config, targets, experts)
    with torch.no_grad():  # deterministic under the stage's generator (PEFT draws from the global RNG)
        for target in targets:
            layer = _adapter_layer(view.model, target, experts)
            a = layer.lora_A[name].weight
            bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) as PEFT and nn.Linear
            with shapes_only(a):  # a meta adapter (the preview) draws nothing
                a.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) * bound)
            layer.lora_B[name].weight.zero_()
    result.note = "; ".join(x for x in (f"adapter '{name}' on {len(targets)} modules", result.note) if x)
    return result


def ia3(view, params: IA3Params, gen: torch.Generator) -> OpResult:
    """IA3 scaling vectors (ones at init) on the chosen projections."""
    from peft import IA3Config

    targets, experts = _chosen(view, params)  # IA3 on an expert tensor is refused there
    ff_names = set(params.feedforward_roles())
    feedforward = [t for t, (named, _) in targets.items() if ff_names & set(named)]
    for target in targets:  # PEFT fixes the input/output choice per layer, at its first IA3 adapter
        layer = get_submodule(view.model, target)
        if hasattr(layer, "ia3_l") and bool(layer.is_feedforward) != (target in feedforward):
            raise ValueError(f"feedforward: {target} already has an IA3 adapter scaling its "
                             f"{'input' if layer.is_feedforward else 'output'}; a second IA3 adapter there must "
                             f"do the same — {'add' if layer.is_feedforward else 'remove'} its role in feedforward")

    def make_config(modules, _tensors, conv1d):
        return IA3Config(target_modules=list(modules), feedforward_modules=[t for t in feedforward if t in modules],
                         fan_in_fan_out=conv1d, init_ia3_weights=True)

    name, result = _inject(view, params, make_config, targets, experts)
    result.note = "; ".join(x for x in (f"adapter '{name}' on {len(targets)} modules", result.note) if x)
    return result


# ---------------------------------------------------------------------------------------------
# saving / loading one adapter


def plain_module_path(path: str) -> str:
    """The path a module has in the plain model: adapters of later stages wrap earlier ones, so an
    inner adapter layer sits at ``...o_proj.base_layer``; saved alone in PEFT format, it adapts
    ``...o_proj``."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def adapted_path(path: str, layer: nn.Module) -> str:
    """What a PEFT layer at `path` (its plain path) adapts: the module there, or for an expert
    tensor's ParamWrapper the tensor (``...mlp.experts.down_proj``) — the wrappers of one experts
    module's two tensors nest at one plain path."""
    parameter = getattr(layer, "parameter_name", None)
    return f"{path}.{parameter}" if parameter else path


def _peft_path(path: str, layer: nn.Module, covered: dict[str, set[str]]) -> str:
    """The module path PEFT gives an adapter layer at plain `path`: the path itself, but for an
    expert tensor PEFT nests one ParamWrapper per tensor the adapter covers on that experts module,
    in the module's registration order (the first innermost: ``...experts.base_layer`` when the
    adapter covers gate_up_proj and down_proj)."""
    parameter = getattr(layer, "parameter_name", None)
    if parameter is None:
        return path
    order = [n for n in layer.get_base_layer()._parameters if n in covered[path]]
    return path + ".base_layer" * (len(order) - 1 - order.index(parameter))


def _adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """PEFT-layout key (plain module path, see ``_peft_path``) -> the live parameter of adapter `name`."""
    layers = [(plain_module_path(path), layer) for path, layer in adapter_layers(model)
              if name in _layer_adapters(layer)]
    covered: dict[str, set[str]] = {}
    for path, layer in layers:
        covered.setdefault(path, set()).add(getattr(layer, "parameter_name", None))
    tensors = {}
    for path, layer in layers:
        path = _peft_path(path, layer, covered)
        for attr in ("lora_A", "lora_B"):
            modules = getattr(layer, attr, None)
            if modules is not None and name in modules:
                for pname, p in modules[name].named_parameters():
                    tensors[f"{path}.{attr}.{pname}"] = p
        scales = getattr(layer, "ia3_l", None)
        if scales is not None and name in scales:
            tensors[f"{path}.ia3_l"] = scales[name]
    return tensors


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors, keyed like PEFT's saved adapters without the adapter name
    (``model.layers.0.self_attn.q_proj.lora_A.weight``); contiguous copies, safetensors-ready."""
    tensors = _adapter_tensors(model, name)
    if not tensors:
        raise ValueError(f"no adapter '{name}' in the model — adapters: {', '.join(adapter_names(model)) or 'none'}")
    return {key: p.detach().clone().contiguous() for key, p in tensors.items()}


def load_adapter_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from ``adapter_state_dict``) into the existing adapter `name`; keys and shapes
    must match exactly."""
    tensors = _adapter_tensors(model, name)
    if not tensors:
        raise ValueError(f"no adapter '{name}' in the model — adapters: {', '.join(adapter_names(model)) or 'none'}")
    missing, unexpected = sorted(set(tensors) - set(state)), sorted(set(state) - set(tensors))
    if missing or unexpected:
        raise ValueError(f"adapter '{name}' state does not fit: missing {missing[:3]}"
                         f"{'…' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'…' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for key, p in tensors.items():
            if tuple(state[key].shape) != tuple(p.shape):
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} does not fit {tuple(p.shape)}")
            p.copy_(state[key])


# ---------------------------------------------------------------------------------------------
# merging (export)


def _untie(module: nn.Module, shared: set[int] | None) -> None:
    """Give `module`'s own parameters fresh copies (all of them, or those whose id is in `shared`)."""
    for pname, p in list(module.named_parameters(recurse=False)):
        if shared is None or id(p) in shared:
            setattr(module, pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


def materialize_adapter_layer(layer: nn.Module, shared: set[int] | None = None) -> nn.Module:
    """Merge a PEFT layer's active adapters into (a copy of) its base weight; return the plain base.

    The base module's parameters are copied before merging — all of them, or with `shared` only
    those whose id is in it — so a weight tied to a virtual twin is never written through.
    Nested PEFT layers must be materialized innermost first (``merge_adapters`` does that).
    """
    base = layer.base_layer
    if isinstance(base, _tuner_layer_cls()):
        raise ValueError("materialize the inner adapter layer first")
    _untie(base, shared)
    active = [n for n in layer.active_adapters if n in _layer_adapters(layer)]
    if active:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge(adapter_names=active)
    return base


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every active LoRA/IA3 adapter into the base weights and remove the PEFT layers, leaving
    a plain Hugging Face model with the same function. Inactive adapters are dropped (save them
    with ``adapter_state_dict`` first). A base weight shared with another module (a virtual twin)
    is untied before merging, so the twin's function does not change."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    shared = {pid for pid, n in counts.items() if n > 1}
    layers = adapter_layers(model)
    for path, layer in sorted(layers, key=lambda item: -item[0].count(".")):  # innermost first
        parent_path, _, attr = path.rpartition(".")
        parent = get_submodule(model, parent_path) if parent_path else model
        base = materialize_adapter_layer(layer, shared)
        setattr(parent, attr, base)
    for attr in ("peft_config", "_widen_inactive_adapters"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
