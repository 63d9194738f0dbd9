"""Mapping sweeps (`widen sweep mapping`, the TUI's sweep screen): score stacked models built from
a source by layer mappings, without training, and show them as a heatmap (rows = mappings, cells =
source layer, last = perplexity). The verb and its options are widen_tui.cli.sweep's.

Start-up stays light: torch, transformers and engine.grow.sweep are imported inside the functions.
A problem with the inputs raises SweepError (one line for the user).
"""

from __future__ import annotations

import csv
from pathlib import Path

from rich.color import Color
from rich.style import Style
from rich.table import Table
from rich.text import Text

from engine.errors import WidenError
from engine.runs.rundir import dumps_json

# The strip's colour ramp (viridis at five stops): dark blue, blue, teal, green, yellow.
RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
# The family label column's widest (labels are at most ~17 characters: "every 5th from 12").
LABEL_WIDTH = 18


class SweepError(WidenError, ValueError):
    """A sweep that cannot run as asked (a source, task, device or sequence length); one line."""


# ---------------------------------------------------------------------------------------------
# resolving the source, the task and the batches


def _as_run(source: str):
    """The RunDir that `source` names (a run directory, id, prefix, "last" or name), or None."""
    from engine.runs.rundir import RunDir, runs_root

    path = Path(source).expanduser()
    if path.is_dir():
        return RunDir(path) if (path / "plan.toml").exists() else None
    if source.startswith("builtin:") or "/" in source:  # built-in model or hub name
        return None
    from widen_tui.index import RunIndex, RunNotFound

    try:
        run_id = RunIndex(runs_root()).resolve(source)
    except RunNotFound:
        return None
    run = RunDir(runs_root() / run_id)
    if not run.exists():
        raise SweepError(f"run {run_id} is in the index but its directory is gone — `widen db rebuild`")
    return run


def _load_source(source: str, tokenizer_spec: str | None, device: str):
    """(model, tokenizer, plan or None, run id or None): a run's trained model with its plan's
    tokenizer, or a model by name / directory / builtin (engine.model.sources.load_model: hub and local
    alike)."""
    from engine.grow.sweep import StackReplay
    from engine.model.sources import check_vocabulary, load_model
    from engine.plan import ModelSpec
    from engine.train.data import load_tokenizer

    run = _as_run(source)
    if run is not None:
        if tokenizer_spec is not None:
            raise SweepError("--tokenizer: a run uses its plan's tokenizer — leave --tokenizer out")
        from engine.exports.hf_directory import load_run_model  # the training stack: only for runs

        model, _, tokenizer, plan = load_run_model(run.path, device=device)
        return model, tokenizer, plan, run.id
    tokenizer = load_tokenizer(tokenizer_spec or "bytes", ModelSpec(source=source))
    model, _ = load_model(ModelSpec(source=source), seed=0)
    StackReplay(model)  # refuses T5 / unsupported families first: the more basic problem
    check_vocabulary(model, tokenizer)
    return model.to(device), tokenizer, None, None


def _task_spec(task: str, plan):
    """A run plan's task by name, else a builtin corpus, local text or dataset name as a source."""
    from engine.plan import TaskSpec

    if plan is not None and task in plan.tasks:
        return task, plan.tasks[task]
    if plan is not None and not task.startswith("builtin:") and not Path(task).expanduser().exists():
        raise SweepError(f"--task '{task}' is not a task of the run's plan ({', '.join(plan.tasks)}), a builtin "
                         "corpus (builtin:pydoc) or a local text file/directory")
    return "sweep", TaskSpec(source=task)


def _batches(task_spec, name: str, tokenizer, batch_size: int, seq_len: int, n_batches: int):
    from engine.runs.rundir import runs_root
    from engine.train.data import eval_batches, load_task

    data = load_task(name, task_spec, tokenizer, runs_root() / ".cache")
    return eval_batches(data.eval, batch_size, seq_len, n_batches)


def _check_positions(model, seq_len: int) -> None:
    """Learned absolute positions (GPT-2, GPT-Neo) end somewhere: say so instead of an IndexError."""
    from engine.model.view import ArchView, get_submodule

    path = ArchView.of(model).family.position_embeddings
    positions = get_submodule(model, path).num_embeddings if path else None
    if positions is not None and seq_len > positions:
        raise SweepError(f"--seq-len {seq_len}: the model has {positions} learned positions — "
                         f"use --seq-len {positions} or less")


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SweepError("--device cuda: torch sees no CUDA device — use --device cpu")
    return choice


# ---------------------------------------------------------------------------------------------
# rendering


def heatmap(result: dict) -> Table:
    """Rows = mappings (best first): the perplexity and its ratio to the reference (the
    unexpanded model) first, then the family label, then a strip of one character per target
    layer — the last digit of its source layer on that layer's colour. Only the strip shrinks
    (it is cropped on its right), so perplexity stays on screen at 80 columns and 60+ layers."""
    rows = result["rows"]
    source_layers = result["source_layers"]
    reference = next(r for r in rows if r["reference"])
    labelled = any(r.get("label") for r in rows)
    table = Table(caption_justify="left", header_style="bold", pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("ppl", justify="right", no_wrap=True)
    table.add_column("× ref", justify="right", no_wrap=True)
    if labelled:
        table.add_column("mapping", no_wrap=True, overflow="ellipsis", max_width=LABEL_WIDTH)
    # the one wrapable column: rich shrinks it alone when the table is too wide (its text has no
    # space to wrap at, so its right end is cut, marked …)
    table.add_column(f"source layer of target 0..{(result['depth'] or source_layers) - 1}", overflow="ellipsis")
    rank = 0
    for row in rows:
        if row["reference"]:
            label, name, mapping = Text("ref", style="bold"), Text("unexpanded", style="bold"), range(source_layers)
        else:
            rank += 1
            label, name, mapping = Text(str(rank)), Text(row.get("label") or ""), row["mapping"]
        ratio = row["ppl"] / reference["ppl"] if reference["ppl"] else float("nan")
        style = "bold" if row["reference"] else ""
        cells = [label, Text(_ppl(row["ppl"]), style=style), Text(f"{ratio:.3f}", style=style)]
        table.add_row(*cells, *([name] if labelled else []), layer_strip(mapping, source_layers))
    table.caption = (f"strip: one character per target layer, the last digit of its source layer, coloured "
                     f"by source layer (0 dark … {source_layers - 1} light); ref: the unexpanded model "
                     f"({source_layers} layers)")
    return table


def layer_strip(mapping, source_layers: int) -> Text:
    """One character per target layer: its source layer's last digit on that layer's colour."""
    strip = Text()
    for source in mapping:
        strip.append(str(source % 10), style=_layer_style(source, source_layers))
    return strip


def _layer_style(source: int, source_layers: int) -> Style:
    """Dark blue (layer 0) to yellow (the last): a viridis-like ramp, so neighbours look alike
    and a repeated band shows as a repeated stretch of colour. Rich lowers it to 256 or 16
    colours where the terminal has no true colour."""
    x = source / max(1, source_layers - 1)
    position = x * (len(RAMP) - 1)
    low = min(int(position), len(RAMP) - 2)
    t = position - low
    rgb = [round(a + (b - a) * t) for a, b in zip(RAMP[low], RAMP[low + 1])]
    light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140
    return Style(color="black" if light else "white", bgcolor=Color.from_rgb(*rgb))


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1000 else f"{value:,.0f}"


def speedup_line(result: dict) -> str:
    calls = result["block_calls"]
    ratio = result.get("sharing_ratio") or (calls["naive"] / calls["cached"] if calls.get("cached") else None)
    shared = f", {ratio:.2f}× fewer than from layer 0" if ratio else ""
    cached = f"prefix sharing: {result['cached_s']:.3f} s for {len(result['rows']) - 1} mappings " \
             f"({calls['cached']} block calls{shared})"
    if result.get("speedup") is None:
        return cached + " — naive timing skipped (--no-naive)"
    return (cached + f" vs {result['naive_s']:.3f} s each from layer 0 ({calls['naive']} block calls): "
            f"speed-up {result['speedup']:.2f}×, same perplexities (max |Δloss| {result['naive_max_loss_diff']:.1e})")


def to_json(result: dict) -> str:
    """Indented JSON with one line per row (a mapping split over `depth` lines reads badly)."""
    fields = []
    for key, value in result.items():
        if key == "rows":
            rows = ",\n".join(f"  {dumps_json(row)}" for row in value)
            fields.append(f' "rows": [\n{rows}\n ]')
        else:
            fields.append(f" {dumps_json(key)}: {dumps_json(value)}")
    return "{\n" + ",\n".join(fields) + "\n}"


def write_csv(result: dict, path: Path) -> None:
    depth = result["depth"] or result["source_layers"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["reference", "ppl", "loss", "family", "label", "mapping",
                         *(f"layer_{i}" for i in range(depth))])
        for row in result["rows"]:
            mapping = row["mapping"] or []
            writer.writerow([int(row["reference"]), f"{row['ppl']:.6g}", f"{row['loss']:.6g}",
                             row.get("family") or "", row.get("label") or "",
                             " ".join(map(str, mapping)), *mapping, *[""] * (depth - len(mapping))])


# ---------------------------------------------------------------------------------------------
# the sweep


def run_mapping_sweep(model_ref: str, depth: int, keep_ends: bool, mappings_file: Path | None, task: str,
                      limit: int | None, tokenizer: str | None, batch_size: int, seq_len: int, n_batches: int,
                      naive: bool, device: str, families: list[str] | None = None,
                      per_family: int | None = None) -> dict:
    """The sweep's result (JSON-ready): the source, the options, and one row per mapping with its
    perplexity, family and label (engine.grow.sweep.mapping_sweep), the unexpanded model's row first."""
    from engine.grow.sweep_mappings import resolve_families

    if families and mappings_file is not None:
        raise SweepError("--family and --mappings: give one — a mappings file is scored as it is")
    specs = resolve_families(families, "--family") if families else None  # a typo fails before the model loads

    import torch
    import transformers

    from engine.grow.sweep import StackReplay, load_mappings, mapping_sweep, spread, sweep_candidates

    transformers.logging.set_verbosity_error()  # no warnings or progress bars on the table
    transformers.utils.logging.disable_progress_bar()
    if mappings_file is not None and not mappings_file.exists():
        raise SweepError(f"--mappings {mappings_file}: no such file — give a JSON or TOML file of mappings")
    device = _device(device)
    model, tok, plan, run_id = _load_source(model_ref, tokenizer, device)
    num_layers = StackReplay(model).num_layers  # also refuses T5 / non-transformers, in one line
    _check_positions(model, seq_len)
    if mappings_file is not None:
        mappings = spread(load_mappings(mappings_file, num_layers, depth), limit)
    else:
        mappings = sweep_candidates(num_layers, depth, keep_ends, limit, specs, per_family, where="--family")
    name, spec = _task_spec(task, plan)
    batches = [(torch.as_tensor(x), torch.as_tensor(y))
               for x, y in _batches(spec, name, tok, batch_size, seq_len, n_batches)]
    result = mapping_sweep(model, batches, mappings, measure_naive=naive)
    drawn = sorted({row["family"] for row in result["rows"] if row.get("family")})
    return {"model": model_ref, "run": run_id, "task": task, "keep_ends": keep_ends if mappings_file is None else None,
            "mappings_file": str(mappings_file) if mappings_file else None,
            "families": [str(s) for s in specs] if specs else (drawn or None), **result,
            "depth": depth, "batch_size": batch_size, "seq_len": seq_len, "batches": n_batches}


# ---------------------------------------------------------------------------------------------
# the families, without a model


def families_table(num_layers: int | None = None, depth: int | None = None, families: list[str] | None = None,
                   per_family: int | None = None, limit: int | None = None, keep_ends: bool = True
                   ) -> tuple[Table, str | None]:
    """(table, sharing line): the registry (name, parameters, what fits, description); given a
    shape, the candidates a sweep of it would score, each as a strip, and their prefix-sharing
    ratio (block forwards from layer 0 / with sharing) overall and per family. No torch."""
    from engine.grow.sweep_mappings import block_forwards, resolve_families, sweep_candidates
    from engine.ops.mapping_families import FAMILIES

    if num_layers is None or depth is None:
        table = Table(header_style="bold")
        for name in ("family", "parameters", "fits", "what it builds"):
            table.add_column(name, overflow="fold")
        for f in FAMILIES:
            table.add_row(f.name, "\n".join(f"{p.name}: {p.help}" for p in f.params), f.fits, f.description)
        return table, None
    specs = resolve_families(families, "--family") if families else None
    candidates = sweep_candidates(num_layers, depth, keep_ends, limit, specs, per_family, where="--family")
    table = Table(header_style="bold",
                  caption=f"{len(candidates)} mappings of {num_layers} -> {depth} layers", caption_justify="left")
    table.add_column("mapping", no_wrap=True, overflow="ellipsis", max_width=LABEL_WIDTH)
    table.add_column(f"source layer of target 0..{depth - 1}", overflow="ellipsis")  # shrinks alone (see heatmap)
    for c in candidates:
        table.add_row(c.label or "non-decreasing", layer_strip(c.mapping, num_layers))
    groups: dict[str, list] = {}
    for c in candidates:
        groups.setdefault(c.family or "non-decreasing", []).append(c.mapping)
    calls = block_forwards(c.mapping for c in candidates)
    per_group = ", ".join(f"{name} {_ratio(block_forwards(ms))}" for name, ms in groups.items())
    line = (f"prefix sharing: {calls['shared']} block forwards per batch instead of {calls['naive']} from layer 0 — "
            f"ratio {_ratio(calls)} (per family alone: {per_group})")
    return table, line


def _ratio(calls: dict) -> str:
    return f"{calls['naive'] / calls['shared']:.2f}×" if calls["shared"] else "–"
