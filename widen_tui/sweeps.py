"""Mapping sweeps (`widen sweep mapping`, the TUI's sweep screen): score stacked models built from
a source by layer mappings, without training, and show them as a heatmap (rows = mappings, cells =
source layer, last = perplexity). The verb and its options are widen_tui.cli.sweep's.

Start-up stays light: torch, transformers and engine.grow.sweep are imported inside the functions.
A problem with the inputs raises SweepError (one line for the user).
"""

from __future__ import annotations

import csv
from pathlib import Path

from rich.table import Table
from rich.text import Text

from engine.errors import WidenError
from engine.runs.rundir import dumps_json

# One colour per source layer, from the 16 standard ANSI colours (any terminal shows them), each
# with a text colour that stays readable on it; layers beyond the palette reuse it (the index is
# printed in the cell anyway).
PALETTE = ("black on bright_white", "white on blue", "black on green", "white on red", "black on cyan",
           "white on magenta", "black on yellow", "bright_white on black", "black on bright_blue",
           "black on bright_green", "black on bright_red", "black on bright_cyan", "black on bright_magenta",
           "black on bright_yellow", "white on bright_black")


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
    """Rows = mappings (best first), one coloured cell per target layer holding its source
    layer, then the perplexity and its ratio to the reference (the unexpanded model)."""
    depth = result["depth"] or result["source_layers"]
    reference = next(r for r in result["rows"] if r["reference"])
    table = Table(caption_justify="left", header_style="bold")
    table.add_column("#", justify="right")
    for i in range(depth):
        table.add_column(str(i), justify="center", min_width=2)
    table.add_column("ppl", justify="right")
    table.add_column("× ref", justify="right")
    rank = 0
    for row in result["rows"]:
        if row["reference"]:
            layers = list(range(result["source_layers"]))
            label = Text("ref", style="bold")
            cells = [_cell(x) for x in layers[:depth]] + [Text("")] * (depth - len(layers))
            if len(layers) > depth:
                cells[-1] = Text("…")
        else:
            rank += 1
            label = Text(str(rank))
            cells = [_cell(x) for x in row["mapping"]]
        ratio = row["ppl"] / reference["ppl"] if reference["ppl"] else float("nan")
        style = "bold" if row["reference"] else ""
        table.add_row(label, *cells, Text(f"{row['ppl']:.3f}", style=style), Text(f"{ratio:.3f}", style=style))
    table.caption = "cells: the source layer each target layer runs; ref: the unexpanded model " \
                    f"({result['source_layers']} layers)"
    return table


def _cell(source: int) -> Text:
    return Text(f" {source} ", style=PALETTE[source % len(PALETTE)])


def speedup_line(result: dict) -> str:
    calls = result["block_calls"]
    cached = f"prefix sharing: {result['cached_s']:.3f} s for {len(result['rows']) - 1} mappings " \
             f"({calls['cached']} block calls)"
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
        writer.writerow(["reference", "ppl", "loss", "mapping", *(f"layer_{i}" for i in range(depth))])
        for row in result["rows"]:
            mapping = row["mapping"] or []
            writer.writerow([int(row["reference"]), f"{row['ppl']:.6g}", f"{row['loss']:.6g}",
                             " ".join(map(str, mapping)), *mapping, *[""] * (depth - len(mapping))])


# ---------------------------------------------------------------------------------------------
# the sweep


def run_mapping_sweep(model_ref: str, depth: int, keep_ends: bool, mappings_file: Path | None, task: str,
                      limit: int | None, tokenizer: str | None, batch_size: int, seq_len: int, n_batches: int,
                      naive: bool, device: str) -> dict:
    """The sweep's result (JSON-ready): the source, the options, and one row per mapping with its
    perplexity (engine.grow.sweep.mapping_sweep), the unexpanded model's row first."""
    import torch
    import transformers

    from engine.grow.sweep import StackReplay, default_mappings, load_mappings, mapping_sweep, spread

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
        mappings = default_mappings(num_layers, depth, keep_ends=keep_ends, limit=limit)
    name, spec = _task_spec(task, plan)
    batches = [(torch.as_tensor(x), torch.as_tensor(y))
               for x, y in _batches(spec, name, tok, batch_size, seq_len, n_batches)]
    result = mapping_sweep(model, batches, mappings, measure_naive=naive)
    return {"model": model_ref, "run": run_id, "task": task, "keep_ends": keep_ends if mappings_file is None else None,
            "mappings_file": str(mappings_file) if mappings_file else None, **result,
            "depth": depth, "batch_size": batch_size, "seq_len": seq_len, "batches": n_batches}
