"""Export a grown model as a plain Hugging Face directory.

The grown model holds modules no stock ``from_pretrained`` knows: parallel FFN paths, weight-tied
("virtual") layers, PEFT adapters injected in place. ``materialize`` turns it into the stock
architecture of its family — shared parameters untied so every block owns its tensors, adapters
merged into the weights, every module with a ``materialize()`` (the protocol of
``engine.ops.registry``) replaced by its plain equivalent, innermost first — and rewrites the
config fields that describe the new shape (FFN width, depth, per-layer fields). ``export_model``
writes that directory (safetensors weights, config, tokenizer, ``widen_export.json``), which
loads with ``AutoModelForCausalLM.from_pretrained`` and no widen code.

``build_from_plan`` builds a plan's model and applies its operators without training, measuring
each on the same probe batch a run uses; ``load_run_model`` rebuilds a run's model and loads its
latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from engine.arch import ArchView, get_submodule
from engine.expand import Freezer, apply_stage, count_params, probe
from engine.plan import Plan, load_plan
from engine.rundir import RunDir, runs_root
from engine.train import op_generator, probe_batch, replay_expansions, task_eval_batches

EXPORT_MANIFEST = "widen_export.json"
ADAPTER_DIR = "adapter"


class ExportError(ValueError):
    """A model that cannot be exported as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# building the grown model


def _cache_dir() -> Path:
    return runs_root() / ".cache"


def _load_tokenizer_and_model(plan: Plan, device: str):
    from engine.data import load_tokenizer
    from engine.models import load_model

    tokenizer = load_tokenizer(plan.model.tokenizer)
    model, view = load_model(plan.model, plan.seed)
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > vocab:
        raise ExportError(f"model.tokenizer: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                          f"vocabulary has {vocab} — use the model's own tokenizer")
    return tokenizer, model.to(device), view


def stage_probe(plan: Plan, stage: int, tokenizer, device: str = "cpu", cache_dir: Path | None = None):
    """The probe batch of `stage` (its task's first eval batch, PROBE_SEQUENCES rows), as tensors:
    the batch a run measures that stage's expansions on."""
    from engine.data import load_task

    name = plan.stages[stage].task
    data = load_task(name, plan.tasks[name], tokenizer, cache_dir or _cache_dir())
    return tuple(torch.as_tensor(t, device=device) for t in probe_batch(task_eval_batches(data, plan.train)))


def build_from_plan(plan: Plan, upto_stage: int | None = None, device: str = "cpu"):
    """Build the plan's model and apply the operators of every stage (through `upto_stage`,
    inclusive; None: all) in order, without training. Each operator is measured on its stage's
    probe batch, as in a run; `trainable` follows the stage's freeze policy.

    Returns (model, view, tokenizer, reports)."""
    tokenizer, model, view = _load_tokenizer_and_model(plan, device)
    last = len(plan.stages) - 1 if upto_stage is None else upto_stage
    if not 0 <= last < len(plan.stages):
        raise ExportError(f"upto_stage {upto_stage}: the plan has stages 0..{len(plan.stages) - 1}")
    freezer, reports, probes = Freezer(), [], {}
    for index in range(last + 1):
        stage = plan.stages[index]
        if not stage.expand:
            continue
        if stage.task not in probes:
            probes[stage.task] = stage_probe(plan, index, tokenizer, device)
        growth = apply_stage(model, view, index, stage.expand, probes[stage.task], op_generator(plan.seed, index))
        model.to(device)
        freezer.apply(model, stage.freeze, growth)
        trainable, total = freezer.trainable(model), count_params(model)
        for report in growth.reports:
            report.update(trainable=trainable, trainable_share=trainable / total)
            reports.append(report)
    freezer.apply(model, "none", None)  # drop the gradient-mask hooks; the export trains nothing
    model.eval()
    return model, view, tokenizer, reports


def load_run_model(run_dir: Path | str, device: str = "cpu"):
    """A run's latest weights: build from the run's plan.toml, replay the expansions its
    checkpoint had (as a resume does), load checkpoints/latest/model.safetensors.

    Returns (model, view, tokenizer, plan)."""
    from safetensors.torch import load_model as load_weights

    run = RunDir(run_dir)
    if not run.plan.exists():
        raise ExportError(f"{run.path} is not a run directory (no plan.toml)")
    latest = run.checkpoints / "latest"
    weights = latest / "model.safetensors"
    if not weights.exists():
        raise ExportError(f"run {run.id} has no checkpoint yet — wait for a stage to end "
                          f"(`widen watch {run.id}`)")
    plan = load_plan(run.plan)
    stages = len(plan.stages)
    state_file = latest / "trainer.pt"
    if state_file.exists():
        position = torch.load(state_file, weights_only=False, map_location="cpu")["position"]
        stages = position["stage"] + (1 if position.get("ops_applied") else 0)
    tokenizer, model, view = _load_tokenizer_and_model(plan, device)
    replay_expansions(model, view, plan, stages)
    model.to(device)
    try:
        load_weights(model, str(weights), strict=True, device=str(device))
    except RuntimeError as e:
        raise ExportError(f"run {run.id}: its checkpoint does not fit the rebuilt model "
                          f"({str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model, view, tokenizer, plan


# ---------------------------------------------------------------------------------------------
# materializing


def _optional(module: str):
    """A sibling engine module that may not exist yet (depth, adapters): None if absent."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """PEFT tuner layers (LoRA, IA3, ...) in the model. PEFT not imported: there are none."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def untie(model: nn.Module) -> None:
    """Give every block its own tensors: a module object reachable by several paths is copied for
    the extra paths, then a Parameter held by several modules is cloned for the extra holders.
    The input/output embeddings stay tied when they are (the config says so and HF reties them)."""
    depth = _optional("engine.ops.depth")
    if depth is not None and callable(getattr(depth, "untie", None)):
        depth.untie(model)
    seen: set[int] = set()

    def walk(module: nn.Module):
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) in seen:
                twin = copy.deepcopy(child)
                module._modules[name] = twin
                seen.update(id(m) for m in twin.modules())
                continue
            seen.add(id(child))
            walk(child)

    walk(model)
    tied: set[int] = set()
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_in is not None and emb_out is not None and emb_out.weight is emb_in.weight:
        tied.add(id(emb_in.weight))
    owned: set[int] = set()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in owned and id(p) not in tied:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            else:
                owned.add(id(p))


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into the weights it adapts and drop the adapter modules."""
    adapters = _optional("engine.ops.adapters")
    if adapters is not None and callable(getattr(adapters, "merge_adapters", None)):
        result = adapters.merge_adapters(model)
        model = result if isinstance(result, nn.Module) else model
    # whatever is left (or no helper): PEFT's own merge, deepest layers first
    layers = adapter_layers(model)
    for name, layer in sorted(layers, key=lambda item: -item[0].count(".")):
        layer.merge(safe_merge=True)
        parent_path, _, attr = name.rpartition(".")
        parent = get_submodule(model, parent_path) if parent_path else model
        setattr(parent, attr, layer.get_base_layer())
    return model


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


def materialize(model: nn.Module, view: ArchView | None = None, keep_adapters: bool = False) -> nn.Module:
    """The grown model as its family's stock architecture (in place; returns the model): shared
    parameters untied, adapters merged (unless `keep_adapters`), inserted modules materialized,
    config updated. Raises ExportError when a stock config cannot describe the result."""
    untie(model)
    if adapter_layers(model) and not keep_adapters:
        model = merge_adapters(model)
    _materialize_modules(model)
    view = ArchView(model.config, model)
    update_config(model, view)
    return model


def _ffn_width(view: ArchView, layer: int) -> int:
    layout = view.family.ffn
    mlp = view.ffn(layer)
    up = getattr(mlp, layout.up, None)
    if up is None or getattr(up, "weight", None) is None:
        raise ExportError(f"layer {layer}: the FFN ({type(mlp).__name__}) has no '{layout.up}' weight "
                          "after materializing — an operator left a module without materialize()")
    return int(up.weight.shape[1] if layout.conv1d else up.weight.shape[0])


def update_config(model: nn.Module, view: ArchView) -> dict:
    """Make the config describe the model's blocks: FFN width, depth, per-layer fields.
    Returns the fields it set."""
    family, config = view.family, model.config
    blocks = view.blocks()
    widths = {i: _ffn_width(view, i) for i in range(len(blocks))}
    if len(set(widths.values())) > 1:
        groups: dict[int, list[int]] = {}
        for layer, width in widths.items():
            groups.setdefault(width, []).append(layer)
        described = ", ".join(f"{w}: layers {_ranges(ls)}" for w, ls in groups.items())
        raise ExportError(f"layers have FFN widths {{{described}}}: a standard config cannot describe "
                          "that — widen every layer by the same size")
    changes = {family.num_layers_field: len(blocks)}
    if widths:
        changes[family.ffn_size_field] = next(iter(widths.values()))
    for key, value in changes.items():
        setattr(config, key, value)
    changes.update(_per_layer_fields(config, family, blocks))
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
            runs: list[list] = []
            for kind in value:
                if runs and runs[-1][0] == [kind]:
                    runs[-1][1] += 1
                else:
                    runs.append([[kind], 1])
            config.attention_types = runs
            changes["attention_types"] = runs
    return changes


def _ranges(layers: list[int]) -> str:
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# writing


def export_model(model: nn.Module, view: ArchView | None, tokenizer, out_dir: Path | str,
                 keep_adapters: bool = False, source: dict | None = None,
                 reports: list[dict] | None = None) -> dict:
    """Materialize the model and write a Hugging Face directory: safetensors weights, config,
    tokenizer and ``widen_export.json`` (source, config changes, per-operator summary).
    With `keep_adapters`, the base goes to `out_dir` and the adapters in PEFT format to
    `out_dir/adapter`. Returns the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    adapters = adapter_layers(model)
    if keep_adapters and adapters:
        _check_keep_adapters()
    elif keep_adapters:
        keep_adapters = False  # nothing to keep: a plain export
    params_before = count_params(model)
    model = materialize(model, view, keep_adapters=keep_adapters)
    view = ArchView(model.config, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save(out_dir)
    family = view.family
    manifest = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source or {},
        "family": family.name,
        "model_type": model.config.model_type,
        "num_layers": view.num_layers,
        "ffn_size": view.ffn_size,
        "params": count_params(model),
        "params_before_materialize": params_before,
        "adapters": "kept" if keep_adapters else ("merged" if adapters else "none"),
        "operators": [_op_summary(r) for r in reports or []],
    }
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest


def _check_keep_adapters() -> None:
    raise ExportError("--keep-adapters needs the adapters' PEFT configs, which the adapters "
                      "operator does not expose yet — export without it (adapters merged)")


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
    manifest_path.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return delta


@torch.no_grad()
def reload_delta(out_dir: Path | str, inputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Reload the export with plain from_pretrained; max |Δlogits| against `reference`."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    logits = reloaded(input_ids=inputs.to("cpu")).logits.float()
    return float((logits - reference.to("cpu").float()).abs().max())
