"""`widen runs`, `widen show` and `widen db rebuild`: the runs root, read through its index."""

from __future__ import annotations

from typing import Annotated

import typer

from engine.runs.rundir import runs_root
from widen_tui.cli.common import console, err, find_run, print_json, public_record, run_index, warn, warn_files

commands = typer.Typer()
db_app = typer.Typer(help="The runs index.", no_args_is_help=True)


@commands.command()
def runs(as_json: Annotated[bool, typer.Option("--json", help="print the records as a JSON list")] = False):
    """List the runs in the runs root (oldest first). Works on a read-only runs root too."""
    index = run_index()
    records = index.refresh()
    if index.write_error:
        warn(f"{index.write_error} — listed from the run directories")
    for record in records:
        for problem in record.get("problems") or []:
            warn(f"{record['id']}: {problem}")
    if as_json:
        print_json([public_record(r) for r in records])
        return
    if not records:
        console.print(f"no runs in {runs_root()} — try `widen demo`", highlight=False)
        return
    from widen_tui.views.report import runs_table

    console.print(runs_table(records))


@commands.command()
def show(run_ref: Annotated[str, typer.Argument(metavar="RUN")] = "last",
         as_json: Annotated[bool, typer.Option("--json", help="print record, status and results as JSON")] = False):
    """A run's record, status and results (perplexity matrix, forgetting, expansions), and for a
    mixture of experts its latest routing window (load per expert, dead experts, router entropy)."""
    from engine.runs.events import EventReader
    from engine.runs.progress import RunProgress

    run = find_run(run_ref)
    record = run_index().update_run(run)  # a read-only runs root: shown all the same
    status, results = run.status(), run.results()
    reader, progress = EventReader(run.events), RunProgress()
    for event in reader.read_rest():
        progress.update(event)
    warn_files(run, reader)
    experts = progress.experts
    if as_json:
        print_json({**public_record(record), "status": status, "results": results,
                    "experts": experts.to_json() if experts is not None else None})
        return
    from rich.text import Text

    from widen_tui.views.experts import experts_table, experts_view
    from widen_tui.views.report import results_view, state_text

    console.print(Text(run.id, style="bold"), f" {record['name']} ", state_text(record["state"]),
                  f" plan {record.get('plan')}", highlight=False, markup=False)
    if status.get("error"):
        err.print(f"error: {status['error']}", highlight=False, markup=False)
    if results:
        console.print(results_view(results))
    else:
        console.print(f"no results yet — `widen watch {run.id}`", highlight=False)
    if experts is not None:
        console.print(experts_table(experts_view(experts)))


@db_app.command("rebuild")
def db_rebuild():
    """Rebuild the runs index from the run directories (the source of truth)."""
    count = run_index().rebuild()
    console.print(f"indexed {count} runs from {runs_root()}", highlight=False)
