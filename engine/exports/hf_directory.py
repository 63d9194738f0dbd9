"""Export a grown model as a plain Hugging Face directory.

The grown model holds modules no stock ``from_pretrained`` knows: parallel FFN paths, weight-tied
("virtual") layers, PEFT adapters injected in place. ``materialize`` turns it into the stock
architecture of its family — shared parameters untied so every block owns its tensors, adapters
merged into the weights, every module with a ``materialize()`` (the protocol of
``engine.ops.registry``) replaced by its plain equivalent, innermost first — and rewrites the
config fields that describe the new shape (FFN width, depth, per-layer fields). ``export_model``
writes that directory (safetensors weights, config, tokenizer, ``widen_export.json``), which
loads with ``AutoModelForCausalLM.from_pretrained`` (``AutoModelForSeq2SeqLM`` for a seq2seq
family) and no widen code; with ``keep_adapters`` the adapters stay unmerged, one PEFT directory
each under ``adapter/<name>`` (``load_export`` is the recipe).

``build_from_plan`` builds a plan's model and applies its operators without training, measuring
each on the same probe batch a run uses; ``load_run_model`` rebuilds a run's model and loads its
latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from engine.grow.apply import probe
from engine.model.view import ArchView, count_params, get_submodule, holds_experts
from engine.ops.adapters import (
    adapter_layers,
    adapter_names,
    adapter_state_dict,
    merge_adapters,
    plain_module_path,
)
from engine.ops.depth import compact_attention_types, untie
from engine.ops.experts import as_moe_class
from engine.plan import Plan
from engine.runs.rundir import dumps_json
from engine.train.build import BuildError, build_from_plan, load_run_model, stage_probe  # noqa: F401  (export's API)

EXPORT_MANIFEST = "widen_export.json"
ADAPTER_DIR = "adapter"


class ExportError(BuildError):
    """A model that cannot be exported as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# materializing


def _materialize_modules(module: nn.Module) -> None:
    """Replace every child with a materialize() method by its result, innermost first."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        _materialize_modules(child)
        while callable(getattr(child, "materialize", None)):
            child = child.materialize()
            _materialize_modules(child)
        module._modules[name] = child


def materialize(model: nn.Module, keep_adapters: bool = False) -> nn.Module:
    """The grown model as its family's stock architecture (in place; returns the model): shared
    parameters untied (virtual layers become real), adapters merged — or, with `keep_adapters`,
    removed unmerged (save them with ``adapter_exports`` first) — inserted modules materialized,
    config updated. Raises ExportError when a stock config cannot describe the result."""
    untie(model)  # first: merging an adapter into a tensor its twin also holds would merge it twice
    if keep_adapters:
        strip_adapters(model)
    elif adapter_layers(model):
        merge_adapters(model)
    _materialize_modules(model)
    update_config(model, ArchView(model.config, model))
    try:  # a dense model upcycled in widen becomes the MoE class its config now describes
        return as_moe_class(model)
    except ValueError as e:
        raise ExportError(str(e)) from e


def strip_adapters(model: nn.Module) -> None:
    """Replace every PEFT layer by its base layer, unmerged (innermost first)."""
    for path, layer in sorted(adapter_layers(model), key=lambda item: -item[0].count(".")):
        parent_path, _, attr = path.rpartition(".")
        parent = get_submodule(model, parent_path) if parent_path else model
        setattr(parent, attr, layer.get_base_layer())
    for attr in ("peft_config", "_widen_inactive_adapters"):
        model.__dict__.pop(attr, None)


def adapter_exports(model: nn.Module) -> list[dict]:
    """Each adapter as PEFT saves it: name, a PEFT config whose target_modules are the exact module
    paths it adapts, and its tensors keyed like PEFT's adapter_model.safetensors. Call on the
    untied model, before ``strip_adapters``. Adapters inside a module that export rebuilds (a
    parallel FFN path) cannot be kept: their base changes shape."""
    configs = getattr(model, "peft_config", {}) or {}
    inactive = getattr(model, "_widen_inactive_adapters", set())
    kinds = adapter_names(model)
    if len(set(kinds.values())) > 1:
        # PEFT loads adapters of one kind onto a model (PeftMixedModel does not take IA3 either)
        listed = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
        raise ExportError(f"--keep-adapters: the model has adapters of different kinds ({listed}), which "
                          "PEFT cannot load onto one model — export without --keep-adapters (adapters merged)")
    exports = []
    for name, kind in kinds.items():
        layers = [(path, layer) for path, layer in adapter_layers(model)
                  if name in getattr(layer, "lora_A", {}) or name in getattr(layer, "ia3_l", {})]
        inside = [path for path, _ in layers if ".base." in f".{path}."]
        if inside:
            raise ExportError(f"adapter '{name}' sits inside a widened module ({inside[0]}), which export "
                              "rebuilds as wider matrices — export without --keep-adapters (adapters merged)")
        config = copy.deepcopy(configs[name])
        # Linears by module path; expert tensors (PEFT's ParamWrapper names its parameter) by
        # parameter path: PEFT wraps no experts module as a target module
        config.target_modules = sorted(path for path, layer in layers if not hasattr(layer, "parameter_name"))
        config.target_parameters = sorted({f"{plain_module_path(path)}.{layer.parameter_name}"
                                           for path, layer in layers if hasattr(layer, "parameter_name")}) or None
        if kind == "ia3":
            config.feedforward_modules = sorted(path for path, layer in layers if layer.is_feedforward)
        config.inference_mode = True
        state = {f"base_model.model.{key}": tensor for key, tensor in adapter_state_dict(model, name).items()}
        exports.append({"name": name, "kind": kind, "config": config, "state": state,
                        "active": name not in inactive})
    return exports


def save_adapters(exports: list[dict], out_dir: Path) -> None:
    """Write each adapter in PEFT format to out_dir/<name>/ (adapter_config.json,
    adapter_model.safetensors): ``PeftModel.from_pretrained(base, out_dir/<name>)`` loads it."""
    from safetensors.torch import save_file

    for item in exports:
        folder = out_dir / item["name"]
        folder.mkdir(parents=True, exist_ok=True)
        item["config"].save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in item["state"].items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})


def _ffn_width(view: ArchView, layer: int) -> tuple[str, int]:
    """(the config field describing block `layer`'s FFN width, that width): the dense FFN's, or
    each expert's in a sparse MoE block."""
    if holds_experts(view.family, view.blocks()[layer]):
        from engine.ops.expert_units import read_experts

        experts = get_submodule(view.blocks()[layer], f"{view.moe.module}.{view.moe.experts}")
        return view.moe.expert_size_field, read_experts(experts, view.moe).units
    return view.family.ffn_size_field, _dense_ffn_width(view, layer)


def _dense_ffn_width(view: ArchView, layer: int) -> int:
    layout = view.family.ffn
    mlp = view.ffn(layer)
    up = getattr(mlp, layout.up, None)
    if up is None or getattr(up, "weight", None) is None:
        raise ExportError(f"layer {layer}: the FFN ({type(mlp).__name__}) has no '{layout.up}' weight "
                          "after materializing — an operator left a module without materialize()")
    rows = int(up.weight.shape[1] if layout.conv1d else up.weight.shape[0])
    return rows // 2 if layout.gate_up_fused else rows  # Phi-3's gate_up_proj holds gate and up: 2 x F rows


def _check_attention_widths(view: ArchView) -> None:
    """Every block's attention must have the width the config implies (heads x head_dim): a
    family that derives head_dim from hidden_size / heads cannot describe added heads."""
    layout = view.family.attention
    heads = view.num_heads
    head_dim = getattr(view.config, "head_dim", None) or view.hidden_size // heads
    for layer in range(view.num_layers):
        out = getattr(view.attention(layer), layout.out)
        width = out.weight.shape[0] if layout.conv1d else out.weight.shape[1]
        if width != heads * head_dim:
            raise ExportError(f"layer {layer}: attention is {width} wide but the config describes {heads} heads "
                              f"x {head_dim} = {heads * head_dim} — a stock {view.family.name} config cannot "
                              "describe heads added to these layers (llama-family models with every layer "
                              "grown can); export the plan without add_heads")


def _check_config_saves(config) -> None:
    """transformers validates a config when saving it (LlamaConfig: hidden_size a multiple of the
    head count): say so in one line before writing anything. The operators refuse such growths
    up front; this catches a model grown some other way."""
    from engine.ops.hidden import config_problem

    problem = config_problem(config, {})
    if problem:
        raise ExportError(f"the grown model's config would not load in transformers ({problem}) — export the "
                          "plan with sizes its config can describe")


def update_config(model: nn.Module, view: ArchView) -> dict:
    """Make the config describe the model's blocks — every stack (T5: encoder and decoder): FFN
    width (one for all blocks), depths, per-layer fields. Returns the fields it set."""
    config, changes, widths = model.config, {}, {}  # widths: config field -> width -> blocks
    for stack in view.stacks():
        label = f"{stack.stack} layers" if stack.stack else "layers"
        for i in range(len(stack.blocks())):
            field, width = _ffn_width(stack, i)
            widths.setdefault(field, {}).setdefault(width, []).append(f"{label} {i}")
        _check_attention_widths(stack)
        changes[stack.family.num_layers_field] = len(stack.blocks())
    for field, found in widths.items():
        if len(found) > 1:
            what = "expert widths" if view.moe and field == view.moe.expert_size_field else "FFN widths"
            described = ", ".join(f"{w}: {', '.join(where)}" for w, where in found.items())
            raise ExportError(f"layers have {what} {{{described}}}: a standard config cannot describe "
                              "that — widen every layer by the same size")
        changes[field] = next(iter(found))
    for key, value in changes.items():
        setattr(config, key, value)
    for stack in view.stacks():
        changes.update(_per_layer_fields(config, stack.family, stack.blocks()))
    return changes


def _per_layer_fields(config, family, blocks) -> dict:
    """Per-layer config lists (GPT-Neo's global/local attention, layer_types) must have one entry
    per block and name what each block does."""
    n, changes = len(blocks), {}
    # what the blocks themselves say (a copied GPT-Neo block keeps its source's attention type)
    actual = []
    for block in blocks:
        kinds = [m.attention_type for m in block.modules() if isinstance(getattr(m, "attention_type", None), str)]
        actual.append(kinds[0] if kinds else None)
    for field in dict.fromkeys((*family.per_layer_fields, "layer_types")):
        value = getattr(config, field, None)
        if not isinstance(value, (list, tuple)):
            continue
        value = list(value)
        if field == "attention_layers" and all(actual) and len(actual) == n:
            value = actual
        elif len(value) != n:
            if len(set(value)) == 1:
                value = value[:1] * n
            else:
                raise ExportError(f"config.{field} has {len(value)} entries for {n} layers — the "
                                  "operator that changed the depth did not update it")
        setattr(config, field, value)
        changes[field] = value
        expand = getattr(config, "expand_attention_types_params", None)
        if field == "attention_layers" and hasattr(config, "attention_types") \
                and not (callable(expand) and expand(config.attention_types) == value):
            # GPT-Neo rebuilds attention_layers from attention_types on load: write runs
            runs = compact_attention_types(value)
            config.attention_types = runs
            changes["attention_types"] = runs
    return changes


# ---------------------------------------------------------------------------------------------
# writing


def export_model(model: nn.Module, tokenizer, out_dir: Path | str,
                 keep_adapters: bool = False, source: dict | None = None,
                 reports: list[dict] | None = None) -> dict:
    """Materialize the model and write a Hugging Face directory: safetensors weights, config,
    tokenizer and ``widen_export.json`` (source, config changes, per-operator summary).
    With `keep_adapters`, the base goes to `out_dir` and the adapters in PEFT format to
    `out_dir/adapter`. Returns the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    had_adapters = bool(adapter_layers(model))
    keep_adapters = keep_adapters and had_adapters  # nothing to keep: a plain export
    params_before = count_params(model)
    exports = []
    if keep_adapters:
        untie(model)
        exports = adapter_exports(model)
    model = materialize(model, keep_adapters=keep_adapters)
    view = ArchView(model.config, model)
    _check_config_saves(model.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save(out_dir)
    if exports:
        save_adapters(exports, out_dir / ADAPTER_DIR)
    manifest = export_manifest(model, view, source, reports, params_before,
                               adapters="kept" if keep_adapters else ("merged" if had_adapters else "none"),
                               exports=exports)
    write_manifest(out_dir, manifest)
    return manifest


def export_manifest(model: nn.Module, view: ArchView, source: dict | None, reports: list[dict] | None,
                    params_before: int, adapters: str = "none", exports: list[dict] | None = None) -> dict:
    """``widen_export.json`` of a materialized model: where it came from, its shape, its operators."""
    return {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source or {},
        "family": view.family.name,
        "model_type": model.config.model_type,
        "model_class": model_class_name(view),
        "num_layers": view.num_layers,
        "ffn_size": view.ffn_size,
        "params": count_params(model),
        "params_before_materialize": params_before,
        "adapters": adapters,
        "kept_adapters": [{"name": e["name"], "kind": e["kind"], "active": e["active"],
                           "path": f"{ADAPTER_DIR}/{e['name']}"} for e in exports or []],
        "operators": [_op_summary(r) for r in reports or []],
    }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (Path(out_dir) / EXPORT_MANIFEST).write_text(dumps_json(manifest, indent=1) + "\n")


def model_class_name(view: ArchView) -> str:
    """The transformers Auto class that loads the export."""
    return "AutoModelForSeq2SeqLM" if view.family.kind == "seq2seq" else "AutoModelForCausalLM"


def _op_summary(report: dict) -> dict:
    keys = ("stage", "op", "layers", "settings", "params_added", "exact", "max_abs_logit_delta",
            "loss_before", "loss_after")
    return {k: report[k] for k in keys if k in report}


def plan_op_summary(plan: Plan) -> list[dict]:
    """The operators a plan applies (no measurements): for a run without expansion reports."""
    return [{"stage": i, **spec.model_dump()} for i, stage in enumerate(plan.stages) for spec in stage.expand]


@torch.no_grad()
def reference_logits(model: nn.Module, batch) -> torch.Tensor:
    """Logits of the in-widen model on the probe batch (before materializing)."""
    return probe(model, *batch)[0]


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers on the CLI's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def verify_export(out_dir: Path | str, batch, reference: torch.Tensor) -> float:
    """Reload the export with plain from_pretrained, compare its logits on the probe batch with
    the in-widen model's, and record the figure in the manifest. Returns max |Δlogits|."""
    delta = reload_delta(out_dir, batch[0], reference)
    manifest_path = Path(out_dir) / EXPORT_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["parity"] = {"max_abs_logit_delta": delta, "probe_shape": list(batch[0].shape),
                          "against": "the in-widen model before materializing"}
    manifest_path.write_text(dumps_json(manifest, indent=1) + "\n")
    return delta


def load_export(out_dir: Path | str):
    """Load an export the way a user without widen would: the Auto class named in the manifest,
    plus the kept adapters through PEFT (the active ones active). Returns the model in eval mode."""
    import transformers

    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / EXPORT_MANIFEST).read_text())
    model = getattr(transformers, manifest.get("model_class", "AutoModelForCausalLM")).from_pretrained(str(out_dir))
    kept = manifest.get("kept_adapters") or []
    if kept:
        from peft import PeftModel

        first, *rest = kept
        model = PeftModel.from_pretrained(model, str(out_dir / first["path"]), adapter_name=first["name"])
        for item in rest:
            model.load_adapter(str(out_dir / item["path"]), adapter_name=item["name"])
        model.base_model.set_adapter([item["name"] for item in kept if item["active"]])
    return model.eval()


@torch.no_grad()
def reload_delta(out_dir: Path | str, inputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Reload the export as a user would (``load_export``); max |Δlogits| against `reference`."""
    from engine.model.forward import forward_logits

    logits = forward_logits(load_export(out_dir), inputs.to("cpu")).float()
    return float((logits - reference.to("cpu").float()).abs().max())

