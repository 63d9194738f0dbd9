"""`widen compare`: runs side by side, and the compute each needed to reach a held-out loss."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from widen_tui.cli.common import CLIError, console, find_run, print_json, warn_files

commands = typer.Typer()


def print_comparison(refs: list[str], as_json: bool = False, target: str | None = None, task: str | None = None,
                     baseline: str | None = None) -> None:
    """The comparison of the runs `refs` name (a table, or JSON); `widen run` prints it after variants."""
    from engine.runs.compare import compare_runs

    if target is None and (task is not None or baseline is not None):
        raise CLIError("--task and --baseline go with --target-loss L|auto")
    runs = [find_run(ref) for ref in refs]
    if baseline is not None:  # the baseline is compared too (first, unless it is among the runs)
        base = find_run(baseline)
        runs = runs if any(r.id == base.id for r in runs) else [base, *runs]
        baseline = base.id
    missing = [r.id for r in runs if not r.results()]
    if missing and len(missing) == len(runs):
        raise CLIError(f"no results yet for {', '.join(missing)} — wait for the runs to end (`widen watch`)")
    from engine.runs.events import EventReader

    streams = []
    for run in runs:
        reader = EventReader(run.events)
        streams.append(reader.read_new())
        warn_files(run, reader)
    data = compare_runs([(r.info(), r.status(), r.results()) for r in runs], streams)
    report = None
    if target is not None:
        from engine.runs import compute_to_target as ctt

        report = ctt.compute_to_target([ctt.RunInput(r.id, r.info(), s) for r, s in zip(runs, streams)],
                                       ctt.parse_target(target), task, baseline)
        data["compute_to_target"] = report.to_json()
    if as_json:
        print_json(data)
        return
    from widen_tui.views.report import comparison_view, target_view

    console.print(comparison_view(data))
    if report is not None:
        console.print(target_view(report))


@commands.command()
def compare(run_refs: Annotated[list[str], typer.Argument(metavar="RUN...")],
            as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
            target_loss: Annotated[Optional[str], typer.Option(
                "--target-loss", metavar="L|auto",
                help="compute to target: the FLOPs, tokens and time at which each run's held-out loss first "
                     "reached L (auto: the worst final held-out loss among the baseline's seeds, which every seed "
                     "reaches; the best one is reported as the strictest target), and the ratio to the "
                     "baseline's")] = None,
            task: Annotated[Optional[str], typer.Option(
                "--task", help="the task whose held-out loss is read (default: the only task, or the task "
                               "every run's last stage trained)")] = None,
            baseline: Annotated[Optional[str], typer.Option(
                "--baseline", metavar="RUN", help="the run the ratios divide by (default: a RUN whose model did "
                                                  "not grow, else the first RUN)")] = None):
    """Runs side by side: parameters added, trainable share, final perplexity per task,
    forgetting, BWT/FWT, wall time, tokens/s, peak memory; mean ± std over seeds. With
    --target-loss: the compute each run needed to reach a held-out loss (docs/flops.md)."""
    print_comparison(run_refs, as_json, target_loss, task, baseline)
