"""`widen plot`: PNG figures of runs and mapping sweeps (widen_tui.views.plot draws them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.runs.rundir import RunDir
from widen_tui.cli.common import CLIError, console, find_run, warn

commands = typer.Typer()


@commands.command()
def plot(
    refs: Annotated[list[str], typer.Argument(metavar="RUN...",
                                              help="runs (id, prefix, last, name, or run directory) and/or "
                                                   "mapping-sweep .json files (from `widen sweep mapping --json`)")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o",
                                                help="directory for the PNGs (default: RUN/figures for one run, "
                                                     "else ./figures)")] = None,
    x: Annotated[str, typer.Option("--x", help="x axis of the loss curves: steps | tokens | flops "
                                               "(runs that grow mid-way compare fairly only by flops)")] = "steps",
    target_loss: Annotated[Optional[str], typer.Option(
        "--target-loss", metavar="L|auto",
        help="draw this held-out loss (auto: the worst final one among the baseline's seeds) and mark "
             "where each run first reached it (as `widen compare --target-loss`)")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="with --target-loss: the task whose held-out loss "
                                                              "is read")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", metavar="RUN",
                                                    help="with --target-loss auto: the run whose seeds' final loss "
                                                         "is the target (default: a RUN whose model did not grow, "
                                                         "else the first RUN)")] = None,
):
    """PNG figures: loss.png (training and eval loss of every run, overlaid, with stage boundaries and
    expansions), forgetting-<run>.png (bits per byte per task after each stage) and mapping-<name>.png
    (a mapping sweep: source layer per target layer, the family label and perplexity per row; every
    target layer drawn, also at 30+ layers)."""
    from engine.runs.events import EventReader
    from engine.runs.forgetting import matrix_for
    from engine.runs.records import EvalEvent, StepEvent
    from widen_tui.views import plot as figures

    if x not in figures.X_AXES:
        raise CLIError(f"--x must be one of {', '.join(figures.X_AXES)}, not '{x}'")
    runs: list[RunDir] = []
    sweeps: list[tuple[str, object]] = []
    for ref in refs:
        path = Path(ref)
        if ref.endswith(".json"):
            if not path.is_file():
                raise CLIError(f"{ref}: no such file")
            try:
                sweeps.append((path.stem, json.loads(path.read_text())))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CLIError(f"{ref}: not readable JSON ({e})") from None
            continue
        is_dir = path.is_dir() and ((path / "run.json").exists() or (path / "events.jsonl").exists())
        run = RunDir(path.resolve()) if is_dir else find_run(ref)
        if all(r.path != run.path for r in runs):
            runs.append(run)
    out_dir = out or (runs[0].path / "figures" if len(runs) == 1 and not sweeps else Path("figures"))
    labels = figures.run_labels([(run.id, run.info()) for run in runs])

    written: list[Path] = []
    curves, inputs = [], []
    try:
        for run in runs:
            events = EventReader(run.events).read_new()
            results = run.results() or {}
            if not events and not results:
                message = f"run {run.id} has no events yet (state {run.status()['state']}) — nothing to plot"
                if len(runs) == 1 and not sweeps:
                    raise CLIError(message)
                warn(message)
                continue
            if any(isinstance(e, StepEvent | EvalEvent) for e in events):
                curves.append((labels[run.id], events))
                inputs.append((run, events))
            matrix = matrix_for(results, events)
            if matrix is not None and matrix.partial:
                warn(f"{run.id}: no results.json yet — forgetting matrix from the evaluations so far")
            if matrix is not None:
                written.append(figures.forgetting_figure(matrix.grid, out_dir / f"forgetting-{run.id}.png",
                                                         run=labels[run.id], trained=matrix.trained))
            if results.get("sweep"):
                written.append(figures.mapping_figure(results["sweep"], out_dir / f"mapping-{run.id}.png",
                                                      title=labels[run.id], warn=warn))
        target = None
        if target_loss is not None:
            from engine.runs import compute_to_target as ctt

            target = ctt.compute_to_target([ctt.RunInput(r.id, r.info(), e) for r, e in inputs],
                                           ctt.parse_target(target_loss), task,
                                           find_run(baseline).id if baseline else None,
                                           labels=[labels[r.id] for r, _ in inputs])
        elif task is not None or baseline is not None:
            raise CLIError("--task and --baseline go with --target-loss L|auto")
        if curves:
            written.insert(0, figures.loss_figure(curves, out_dir / "loss.png", x=x, warn=warn, target=target))
        elif runs:
            warn("no step or eval events in " + ", ".join(r.id for r in runs) + " — no loss curves")
        for stem, sweep in sweeps:
            written.append(figures.mapping_figure(sweep, out_dir / f"mapping-{stem}.png", title=stem, warn=warn))
    except figures.PlotError as e:
        raise CLIError(str(e)) from None
    if not written:
        raise CLIError("nothing to plot")
    for path in written:
        console.print(str(path), highlight=False, soft_wrap=True)
