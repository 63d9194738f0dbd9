"""`widen sweep mapping`: the options of a mapping sweep (widen_tui.sweeps runs and renders it).

A problem prints one line (`error: ...`) and exits 1 here, not in main(): the TUI's sweep screen
and in-process callers read that line from stderr like any other output of this verb."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from engine.errors import WidenError
from engine.ops.mapping_families import FAMILY_NAMES, HANDFUL, MAX_NON_DECREASING
from widen_tui.cli.common import err
from widen_tui.sweeps import families_table, heatmap, run_mapping_sweep, speedup_line, to_json, write_csv

sweep_app = typer.Typer(help="Score grown models without training.", no_args_is_help=True)

# Piped output gets a wider page than the other verbs' (a strip is one character per target
# layer); on a terminal the table fits its width, the strip cropped first.
console = Console()
if not console.is_terminal:
    console = Console(width=160)


@sweep_app.command("mapping")
def mapping(
    model_ref: Annotated[str, typer.Option("--model", "-m", metavar="SRC",
                                           help="hub name, local model directory, builtin:tiny-neo, or a run "
                                                "(id, prefix, last, name, run directory: its trained model)")],
    depth: Annotated[int, typer.Option("--depth", "-d", min=1, help="layers of the stacked models")],
    keep_ends: Annotated[bool, typer.Option("--keep-ends/--no-keep-ends",
                                            help="generated non-decreasing mappings keep the first and last "
                                                 "source layers in place (every family's do)")] = True,
    mappings_file: Annotated[Optional[Path], typer.Option("--mappings", metavar="FILE",
                                                          help="JSON or TOML file with a list of mappings "
                                                               "(instead of the generated non-decreasing "
                                                               "ones)")] = None,
    task: Annotated[str, typer.Option("--task", "-t",
                                      help="held-out text: builtin:pydoc, builtin:stdlib-python, a local text "
                                           "file/dir, or a task of the run's plan")] = "builtin:pydoc",
    families: Annotated[Optional[list[str]], typer.Option(
        "--family", "-f", metavar="NAME[:P=V,...]",
        help=f"draw mappings from this family (repeat for several; all: every one): {', '.join(FAMILY_NAMES)}; "
             "fix parameters with e.g. band:times=3 (`widen sweep families` lists them). Default: every "
             f"non-decreasing mapping, or every family when growing and those are over "
             f"{MAX_NON_DECREASING}")] = None,
    per_family: Annotated[Optional[int], typer.Option("--per-family", min=1, metavar="N",
                                                      help=f"at most N mappings of each family, spread over its "
                                                           f"parameters, canonical first (default {HANDFUL})")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-k", min=1,
                                                 help="at most K mappings: families' taken in turn, non-decreasing "
                                                      "ones evenly spread (the most identity-like kept)")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer",
                                                     help='"bytes" (default) or a tokenizer directory / hub name; '
                                                          "a run uses its plan's")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2)] = 64,
    batches: Annotated[int, typer.Option("--batches", min=1, help="fixed eval batches per mapping")] = 2,
    naive: Annotated[bool, typer.Option("--naive/--no-naive",
                                        help="also time each mapping from layer 0, to report the "
                                             "prefix-sharing speed-up")] = True,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", metavar="FILE",
                                                     help="also write the rows as CSV")] = None,
):
    """Score stacked models built from SRC by layer mappings (entry i of a mapping: the source layer
    that target layer i runs) by held-out perplexity, without training: mappings best first, each
    with its family and a strip of its source layers, the unexpanded model as reference, and the
    speed-up of sharing common prefixes."""
    try:
        result = run_mapping_sweep(model_ref, depth, keep_ends, mappings_file, task, limit, tokenizer,
                                   batch_size, seq_len, batches, naive, device, families, per_family)
    except WidenError as e:
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if csv_path is not None:
        write_csv(result, csv_path)
    if as_json:
        sys.stdout.write(to_json(result) + "\n")
        return
    source = result["model"] + (f" (run {result['run']})" if result["run"] not in (None, result["model"]) else "")
    console.print(f"{source} on {result['task']}: {result['source_layers']} -> {result['depth']} "
                  f"layers, no training; {result['tokens']:,} tokens per mapping", highlight=False, soft_wrap=True)
    console.print(heatmap(result))
    console.print(speedup_line(result), highlight=False, soft_wrap=True)
    if csv_path is not None:
        console.print(f"wrote {csv_path}", highlight=False)


@sweep_app.command("families")
def families(
    layers: Annotated[Optional[int], typer.Option("--layers", "-n", min=1, metavar="d",
                                                  help="source layers: with --depth, list the mappings a sweep "
                                                       "would score")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", "-d", min=1, metavar="D",
                                                 help="layers of the stacked models")] = None,
    family: Annotated[Optional[list[str]], typer.Option("--family", "-f", metavar="NAME[:P=V,...]",
                                                        help="only these families (as `sweep mapping`)")] = None,
    per_family: Annotated[Optional[int], typer.Option("--per-family", min=1, metavar="N")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-k", min=1)] = None,
    keep_ends: Annotated[bool, typer.Option("--keep-ends/--no-keep-ends")] = True,
):
    """The mapping families (name, parameters, the depths each fits); with --layers d --depth D, the
    mappings `widen sweep mapping` would score for that shape and their prefix-sharing ratio (block
    forwards from layer 0 / with sharing). No model is loaded."""
    if (layers is None) != (depth is None):
        err.print("error: --layers and --depth go together — give both to list a shape's mappings, "
                  "or neither for the families", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    try:
        table, sharing = families_table(layers, depth, family, per_family, limit, keep_ends)
    except WidenError as e:
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(table)
    if sharing:
        console.print(sharing, highlight=False, soft_wrap=True)
