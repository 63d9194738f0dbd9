"""`widen tui` (the terminal app) and `widen doctor` (is this machine ready to run)."""

from __future__ import annotations

import sys
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
    import shutil

    rows: list[tuple[str, str, bool]] = []
    rows.append(("python", sys.version.split()[0], True))
    try:
        import torch

        rows.append(("torch", torch.__version__, True))
        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            rows.append(("CUDA", f"{torch.version.cuda}: {names}", True))
        else:
            rows.append(("CUDA", "no GPU (torch sees no CUDA device) — runs use the CPU", True))
    except ImportError as e:
        rows.append(("torch", f"missing ({e}) — run `make setup`", False))
    from engine.train.system import SystemMonitor

    monitor = SystemMonitor()
    rows.append(("NVML", monitor.gpu_status, True))
    for gpu in monitor.gpus():
        rows.append((f"GPU{gpu['index']}", f"{gpu.get('name')}: {gpu.get('mem_used_mb')}/"
                     f"{gpu.get('mem_total_mb')} MB, {gpu.get('util_percent')}% busy", True))
    root = runs_root()
    probe = root if root.exists() else Path.cwd()
    free_gb = shutil.disk_usage(probe).free / 2**30
    rows.append(("runs root", f"{root} ({'exists' if root.exists() else 'created on first run'})", True))
    rows.append(("disk free", f"{free_gb:.1f} GiB", free_gb > 1))
    for name, value, ok in rows:
        console.print(f"{'[green]ok[/green]  ' if ok else '[red]bad[/red] '} {name:10s} {value}", highlight=False)
    if not all(ok for _, _, ok in rows):
        raise typer.Exit(1)
