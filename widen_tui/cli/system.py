"""`widen tui` (the terminal app) and `widen doctor` (is this machine ready to run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.runs.rundir import runs_root
from widen_tui.cli.common import CLIError, console, find_run

commands = typer.Typer()


@commands.command()
def tui(run_ref: Annotated[Optional[str], typer.Argument(metavar="[RUN]", help="open this run's monitor")] = None,
        plan: Annotated[Optional[Path], typer.Option("--plan", help="open the plan builder on this file")] = None):
    """The terminal app: runs, live monitor, plan builder, compare, sweep. `q` quits; runs keep
    going. Works over SSH (any terminal, 80×24 and up)."""
    run_id = find_run(run_ref).id if run_ref else None
    if plan is not None and not plan.is_file():
        raise CLIError(f"--plan {plan}: no such plan file")
    from widen_tui.tui.app import main as tui_main

    tui_main(runs_root(), run_id, plan)


@commands.command()
def doctor():
    """Check torch, CUDA, NVML and disk space."""
    from engine.train.system import readiness

    checks = readiness(runs_root())
    for check in checks:
        console.print(f"{'[green]ok[/green]  ' if check.ok else '[red]bad[/red] '} {check.name:10s} {check.found}",
                      highlight=False)
    if not all(check.ok for check in checks):
        raise typer.Exit(1)
