"""Task-specific modules: each stage's expansion modules belong to that stage's task.

With ``task_modules = true`` in a plan the base model is shared by every task and frozen after the
first stage; what a later stage adds is a *separate path* owned by its task — a parallel FFN path
(``widen_ffn``/``widen_mlp`` with ``mode = "parallel"``), a parallel or concatenated Linear path
(``parallel_linear``, ``concat_linear``), a LoRA or IA3 adapter. Evaluating or training task t
activates exactly t's modules and bypasses all others, so a task's outputs do not change when later
stages add modules for other tasks: forgetting is zero when the task is known at evaluation.

Which ops qualify (their descriptors' ``task_module`` and ``parallel_mode`` capabilities,
``engine.ops.params.OPS``; the plan check ``engine.plan.checks.task_module_problems``): only those
that leave the base untouched and whose additions can be switched off. In-place widening, new heads,
d_model growth and depth operators rewrite the shared base, so they are refused after the first
stage (the first stage may still shape the base: ``engine.plan.checks.stage_problems``).

How modules are named (stable keys). A switchable module is a wrapper that keeps what it wraps as
``.base`` (``FFNWithNewUnits``, ``ConcatLinear``, ``WiderInputLinear``, ``ParallelLinear``) or a
named PEFT adapter. A wrapper's key is its module path with the ``base`` hops of wrappers (and the
``base_layer`` hops of PEFT layers) left out, plus its level in the chain of wrappers at that place
counted from the original module: ``transformer.h.0.mlp[1]`` is the first parallel path added to
block 0's FFN, ``transformer.h.0.mlp[2]`` the second (which wraps the first). Wrapping a module
again never renames what is inside, so keys recorded at one stage still hold after later stages.
Tensor keys are ``<key>.<parameter>`` (``transformer.h.0.mlp[1].up.weight``) for wrappers and
``<module>.<lora_A|lora_B|ia3_l>.<adapter>[.<parameter>]`` for adapters
(``transformer.h.0.attn.attention.q_proj.lora_A.lora_stage2.weight``); an adapter on an MoE
block's expert tensor is keyed by the tensor (``model.layers.0.mlp.experts.down_proj.lora_A...``),
since the adapters of one experts module's two tensors nest at one module path.

Switching: wrappers have an ``active`` attribute (inactive: the new tensors contribute nothing);
adapters go through ``engine.ops.adapters.set_active_adapters``. ``materialize()`` (export) follows
the function the model computes now: with every module active (the default, and
``activate(model, None)``) an export merges every path as before; after ``activate(model, task)``
it merges only that task's paths (inactive wrappers are dropped, inactive adapters too, as
``merge_adapters`` already does) — that is a task's export.

Modules nobody claimed (a plan without task_modules, or the base's own stage) are left on for
every task. This module imports no torch at import time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# finding switchable modules in a model


def _unwrap(model):
    """The model itself under DDP / torch.compile wrappers (their paths have extra prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _wrapper_types() -> tuple[type, ...]:
    from engine.ops.expert_units import ExpertsWithNewUnits
    from engine.ops.linear import LinearStandIn
    from engine.ops.width import FFNWithNewUnits

    return (FFNWithNewUnits, LinearStandIn, ExpertsWithNewUnits)


def _canonical(model, path: str, wrappers: tuple[type, ...], tuner: type) -> str:
    """`path` without the `base` hops of wrappers and the `base_layer` hops of PEFT layers."""
    module, parts = model, []
    for part in path.split(".") if path else []:
        hop = (part == "base" and isinstance(module, wrappers)) or (part == "base_layer" and isinstance(module, tuner))
        if not hop:
            parts.append(part)
        module = getattr(module, part)
    return ".".join(parts)


def _level(module, wrappers: tuple[type, ...]) -> int:
    level, inner = 1, module.base
    while isinstance(inner, wrappers):
        level, inner = level + 1, inner.base
    return level


def _tuner_cls():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def switchable_modules(model) -> dict:
    """Stable key (see the module docstring) -> every wrapper module in the model."""
    model = _unwrap(model)
    wrappers, tuner = _wrapper_types(), _tuner_cls()
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, wrappers):
            found[f"{_canonical(model, path, wrappers, tuner)}[{_level(module, wrappers)}]"] = module
    return found


def own_parameters(module) -> dict:
    """A wrapper's own tensors (the new path): everything but what it wraps (`base`, and the
    FFN activation it shares with the base) — name relative to the wrapper -> Parameter."""
    shared = {id(p) for p in module.base.parameters()}
    act = getattr(module, "act", None)
    if act is not None:
        shared |= {id(p) for p in act.parameters()}
    return {name: p for name, p in module.named_parameters() if id(p) not in shared}


def adapter_parameters(model, name: str) -> dict:
    """Tensor key (see the module docstring) -> Parameter, for adapter `name`."""
    from torch import nn

    from engine.ops.adapters import adapted_path, adapter_layers

    model = _unwrap(model)
    wrappers, tuner = _wrapper_types(), _tuner_cls()
    found = {}
    for layer_path, layer in adapter_layers(model):
        path = adapted_path(_canonical(model, layer_path, wrappers, tuner), layer)
        for attr in getattr(layer, "adapter_layer_names", ()):
            container = getattr(layer, attr, None)
            if container is None or name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Parameter):
                found[f"{path}.{attr}.{name}"] = item
            else:
                for pname, p in item.named_parameters():
                    found[f"{path}.{attr}.{name}.{pname}"] = p
    return found


# ---------------------------------------------------------------------------------------------
# the registry


class TaskModules:
    """Which task owns which modules; switching, saving and loading them per task.

    The model is passed to ``claim`` / ``activate`` (and remembered: ``state_dict``, ``save``... use
    the last one unless given `model=`). Keys are stable across later stages (module docstring).
    """

    def __init__(self, model=None):
        self.model = _unwrap(model) if model is not None else None
        self._tasks: dict[str, dict[str, list[str]]] = {}
        self.active: str | None = None  # the task last activated (None: every module on)

    # -- ownership -------------------------------------------------------------------------------
    def bind(self, model) -> "TaskModules":
        """Remember `model` as the one the modules live in."""
        self.model = _unwrap(model)
        return self

    def _model(self, model):
        if model is not None:
            return self.bind(model).model
        if self.model is None:
            raise ValueError("TaskModules has no model yet — pass model= (or call claim/activate/bind first)")
        return self.model

    def tasks(self) -> list[str]:
        """Tasks claimed so far, in claim order (a task may own no modules: the bare base)."""
        return list(self._tasks)

    def modules(self, task: str) -> list[str]:
        """Keys of the wrapper modules `task` owns."""
        return list(self._tasks.get(task, {}).get("modules", []))

    def adapters(self, task: str) -> list[str]:
        """Names of the adapters `task` owns."""
        return list(self._tasks.get(task, {}).get("adapters", []))

    def owner(self, key_or_adapter: str) -> str | None:
        """The task owning a wrapper key or an adapter name (None: shared, unclaimed)."""
        for task, owned in self._tasks.items():
            if key_or_adapter in owned["modules"] or key_or_adapter in owned["adapters"]:
                return task
        return None

    def claim(self, task: str, model, growth, allow_shared: bool = False) -> dict:
        """Record what an applied stage (or a progressive growth) added as `task`'s modules.

        `growth`: the ``engine.grow.apply.StageGrowth`` of ``apply_stage``. Call right after applying
        it; several claims for one task accumulate; a claim with nothing new registers the task
        (it then runs on the bare base). Anything added outside a switchable module (in-place
        growth, new blocks or heads) is an error — unless `allow_shared` (the first stage, which
        builds the base): then it joins the shared base. Returns {"modules", "adapters", "params"}
        of this claim."""
        from engine.ops.adapters import adapter_names
        from engine.plan.checks import supported_text

        model = self._model(model)
        results = list(getattr(growth, "results", growth or []))
        new_ids = {id(p) for result in results for p in result.new_params}
        grown = {id(p) for result in results for p, _ in result.grown}
        found_modules, found_adapters, covered, params = [], [], set(), 0
        for key, module in switchable_modules(model).items():
            own = own_parameters(module).values()
            if {id(p) for p in own} & new_ids:
                found_modules.append(key)
                covered |= {id(p) for p in own}
                params += sum(p.numel() for p in own)
        for name in adapter_names(model):
            own = adapter_parameters(model, name).values()
            if {id(p) for p in own} & new_ids:
                found_adapters.append(name)
                covered |= {id(p) for p in own}
                params += sum(p.numel() for p in own)
        if not allow_shared:
            live = {id(p): name for name, p in model.named_parameters()}
            # ids no longer in the model were merged away (an in-place widening over a parallel path)
            outside = [live[i] for i in (new_ids - covered) | grown if i in live]
            if outside:
                shown = ", ".join(sorted(outside)[:3]) + ("…" if len(outside) > 3 else "")
                raise ValueError(f"task_modules: task '{task}' would change the shared base ({shown}): only "
                                 f"separate paths can belong to a task — {supported_text()}")
        taken = [(k, self.owner(k)) for k in found_modules + found_adapters]
        taken = [(k, t) for k, t in taken if t not in (None, task)]
        if taken:
            key, other = taken[0]
            what = f"adapter '{key}'" if key in found_adapters else f"module {key}"
            hint = " — give this task's adapter another name" if key in found_adapters else ""
            raise ValueError(f"task_modules: {what} already belongs to task '{other}', not '{task}'{hint}")
        owned = self._tasks.setdefault(task, {"modules": [], "adapters": []})
        owned["modules"] += [k for k in found_modules if k not in owned["modules"]]
        owned["adapters"] += [n for n in found_adapters if n not in owned["adapters"]]
        return {"task": task, "modules": found_modules, "adapters": found_adapters, "params": params}

    # -- switching -------------------------------------------------------------------------------
    def activate(self, model, task: str | None) -> None:
        """Turn on exactly `task`'s modules, every other task's off (unclaimed modules stay on:
        they are the shared base). A task that owns nothing (or was never claimed) runs on the
        bare base. None: every module on."""
        from engine.ops.adapters import adapter_names, set_active_adapters

        model = self._model(model)
        modules = switchable_modules(model)
        present = adapter_names(model)
        self._check_present(modules, present)
        owners = {k: t for t, owned in self._tasks.items() for k in owned["modules"]}
        for key, module in modules.items():
            module.active = task is None or owners.get(key, task) == task
        if present:
            adapter_owners = {n: t for t, owned in self._tasks.items() for n in owned["adapters"]}
            set_active_adapters(model, None if task is None else
                                [n for n in present if adapter_owners.get(n, task) == task])
        self.active = task

    def _check_present(self, modules: dict, adapters: dict) -> None:
        for task, owned in self._tasks.items():
            missing = [k for k in owned["modules"] if k not in modules] + \
                      [f"adapter '{n}'" for n in owned["adapters"] if n not in adapters]
            if missing:
                raise ValueError(f"task_modules: task '{task}' owns {missing[0]}, which the model does not have — "
                                 "build the model with the same stages before restoring the task modules")

    # -- tensors ---------------------------------------------------------------------------------
    def parameters(self, task: str, model=None) -> dict:
        """Tensor key -> live Parameter of every module `task` owns."""
        from engine.ops.adapters import adapter_names

        model = self._model(model)
        if task not in self._tasks:
            raise ValueError(f"task_modules: no task '{task}' — tasks: {', '.join(self._tasks) or 'none'}")
        modules = switchable_modules(model)
        self._check_present(modules, adapter_names(model))
        found = {}
        for key in self._tasks[task]["modules"]:
            for name, p in own_parameters(modules[key]).items():
                found[f"{key}.{name}"] = p
        for name in self._tasks[task]["adapters"]:
            found.update(adapter_parameters(model, name))
        return found

    def state_dict(self, task: str, model=None) -> dict:
        """`task`'s module tensors (detached contiguous copies), keyed as in the module docstring."""
        return {key: p.detach().clone().contiguous() for key, p in self.parameters(task, model).items()}

    def load_state_dict(self, task: str, tensors: Mapping, model=None) -> None:
        """Copy `tensors` (from ``state_dict``) into `task`'s modules; keys and shapes must match."""
        import torch

        live = self.parameters(task, model)
        missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        if missing or unexpected:
            def shown(keys):
                return "[" + ", ".join(keys[:3]) + (f", … {len(keys) - 3} more" if len(keys) > 3 else "") + "]"
            raise ValueError(f"task_modules: tensors for task '{task}' do not fit its modules: missing "
                             f"{shown(missing)}, unexpected {shown(unexpected)}")
        bad = [(k, tuple(tensors[k].shape), tuple(p.shape)) for k, p in live.items()
               if tuple(tensors[k].shape) != tuple(p.shape)]
        if bad:
            key, got, want = bad[0]
            raise ValueError(f"task_modules: {key}: shape {got} does not fit {want} (task '{task}')")
        with torch.no_grad():
            for key, p in live.items():
                p.copy_(tensors[key])

    def save(self, task: str, path, model=None) -> None:
        """`task`'s module tensors as one safetensors file (the ownership record in its metadata)."""
        from safetensors.torch import save_file

        tensors = {k: v.cpu() for k, v in self.state_dict(task, model).items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": "pt", "task": task,
                                                 "task_modules": json.dumps(self._tasks[task])})

    def load(self, task: str, path, model=None) -> None:
        """Load a file written by ``save`` into `task`'s modules (strict, as ``load_state_dict``)."""
        from safetensors.torch import load_file

        self.load_state_dict(task, load_file(str(path)), model)

    # -- checkpoints -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The ownership record (JSON-ready): {"version", "tasks": {task: {"modules", "adapters"}}}."""
        return {"version": FORMAT_VERSION,
                "tasks": {t: {"modules": list(o["modules"]), "adapters": list(o["adapters"])}
                          for t, o in self._tasks.items()}}

    @classmethod
    def from_json(cls, data, model=None) -> "TaskModules":
        """The registry `to_json` wrote (a dict or its JSON text). The model must have been rebuilt
        with the same stages (the keys are checked at the next ``activate``)."""
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        if not isinstance(data, Mapping) or not isinstance(data.get("tasks"), Mapping):
            raise ValueError("task_modules: not a task-modules record (expected {\"version\", \"tasks\"})")
        if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"task_modules: record version {data.get('version')} — this widen reads {FORMAT_VERSION}")
        registry = cls(model)
        for task, owned in data["tasks"].items():
            registry._tasks[str(task)] = {"modules": [str(k) for k in owned.get("modules", [])],
                                          "adapters": [str(n) for n in owned.get("adapters", [])]}
        return registry

    def __repr__(self) -> str:
        parts = [f"{t}: {len(o['modules'])} paths, {len(o['adapters'])} adapters" for t, o in self._tasks.items()]
        return f"TaskModules({'; '.join(parts)})"
