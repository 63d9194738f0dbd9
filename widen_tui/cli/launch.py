"""`widen run`, `demo`, `resume`, `join` and `cancel`: starting and stopping runs' worker processes
(widen_tui.launcher does the work; these verbs say what happened and follow the run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.runs.rundir import RunDir
from widen_tui.cli.common import CLIError, console, err, find_run, load_plan_or_exit
from widen_tui.cli.compare import print_comparison
from widen_tui.cli.follow import follow_run

commands = typer.Typer()

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"  # the checkout's ready plans
NNODES_HELP = "train on N machines (each runs `widen join RUN`; needs --rdzv-endpoint)"
RDZV_HELP = "host:port of the c10d rendezvous, a free port on the first machine (e.g. node0:29500)"


def _launch(file: Path, set_: list[str], seed: int | None, detach: bool, seeds: list[int] | None = None) -> None:
    from widen_tui.launcher import create_runs, start_worker

    if seed is not None and seeds:
        raise CLIError("--seed and --seeds together: use one of them")
    plan = load_plan_or_exit(file, set_, seed, operators=not detach)  # detached: the worker checks them
    runs = create_runs(plan, file, seeds)
    pids = [start_worker(run) for run in runs]
    _say_how_to_join(runs[0])
    if detach:
        for run in runs:
            console.print(run.id, highlight=False)
        what = f"run {runs[0].id} (pid {pids[0]})" if len(runs) == 1 else \
            f"{len(runs)} runs (they go one after another; variants share the cached common stages)"
        err.print(f"started {what} — `widen watch {runs[-1].id if len(runs) > 1 else runs[0].id}` to follow, "
                  f"`widen cancel RUN` to stop", highlight=False, soft_wrap=True)
        return
    if len(runs) == 1:
        err.print(f"run {runs[0].id} — Ctrl-C stops watching; the run keeps going", highlight=False)
        if follow_run(runs[0]) != "done":
            raise typer.Exit(1)
        return
    err.print(f"{len(runs)} runs, one after another: {', '.join(r.id for r in runs)} — Ctrl-C stops "
              "watching; the runs keep going", highlight=False, soft_wrap=True)
    states = []
    for run in runs:
        err.print(f"— {run.info().get('name')} ({run.id})", highlight=False)
        state = follow_run(run, show_results=False)
        if state == "running":  # Ctrl-C
            return
        states.append(state)
    print_comparison([r.id for r in runs])
    if any(state != "done" for state in states):
        raise typer.Exit(1)


def _say_how_to_join(run: RunDir, resume: bool = False) -> None:
    """A multi-node run waits for its other machines: say what to run on each."""
    from widen_tui.launcher import join_lines, nnodes

    machines = nnodes(run)
    if machines <= 1:
        return
    join, torchrun = join_lines(run, resume)
    err.print(f"run {run.id} waits for {machines - 1} more machine{'s' * (machines > 2)}: on each (sharing the "
              f"runs directory), run\n  {join}\nor the same torchrun line (the run directory as that machine "
              f"mounts it):\n  {torchrun}", highlight=False, markup=False, soft_wrap=True)


@commands.command()
def run(
    file: Annotated[Path, typer.Argument(help="plan TOML file")],
    detach: Annotated[bool, typer.Option("--detach", "-d", help="print the run id(s) and return at once")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", help="override the plan's seed")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="one run per seed (and per variant), e.g. 0,1,2; "
                                                 "`widen compare` reports mean ± std")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a field: key.path=value (repeatable)")] = [],
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="train on N processes under torchrun "
                                                 "(DDP; train.batch_size is the global batch)")] = None,
    nnodes: Annotated[Optional[int], typer.Option("--nnodes", min=1, help=NNODES_HELP)] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", metavar="HOST:PORT",
                                                         help=RDZV_HELP)] = None,
):
    """Run a plan in detached engine processes (and watch unless --detach). A plan with variants
    runs one after another, sharing its common stages, then prints the comparison. On several
    machines (--nnodes), it prints the `widen join RUN` to run on each of the others."""
    from widen_tui.launcher import distributed_overrides, parse_seeds  # the plan's models: only when a verb runs

    _launch(file, [*set_, *distributed_overrides(nproc, nnodes, rdzv_endpoint)], seed, detach, parse_seeds(seeds))


@commands.command()
def demo(
    set_: Annotated[list[str], typer.Option("--set", help="override a field of the quickstart plan")] = [],
):
    """Grow the built-in model: train on prose, widen every FFN with zero-init, train on Python."""
    plan = EXPERIMENTS / "quickstart.toml"
    if not plan.exists():
        raise CLIError(f"the quickstart plan is missing ({plan}) — run from a checkout of widen")
    _launch(plan, set_, None, detach=False)


@commands.command()
def resume(run_ref: Annotated[str, typer.Argument(metavar="RUN")],
           set_: Annotated[list[str], typer.Option("--set", help="change a training setting first, e.g. "
                                                   "train.lr=1e-4 after a divergence (repeatable)")] = [],
           nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="continue on N processes (any N "
                                                        "that divides the batch: checkpoints reshard)")] = None,
           nnodes: Annotated[Optional[int], typer.Option("--nnodes", min=1, help=NNODES_HELP)] = None,
           rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", metavar="HOST:PORT",
                                                                help=RDZV_HELP)] = None):
    """Continue a cancelled, failed, diverged or lost run from its latest checkpoint (on as many
    processes and machines as the options say, under either strategy: checkpoints reshard)."""
    from widen_tui.launcher import distributed_overrides
    from widen_tui.launcher import resume as resume_run

    run = find_run(run_ref)
    pid = resume_run(run, [*set_, *distributed_overrides(nproc, nnodes, rdzv_endpoint)])
    err.print(f"resumed {run.id} (pid {pid}) — `widen watch {run.id}`", highlight=False)
    _say_how_to_join(run, resume=True)


@commands.command()
def join(run_ref: Annotated[str, typer.Argument(metavar="RUN")],
         detach: Annotated[bool, typer.Option("--detach", "-d", help="print the log's path and return at once")]
         = False):
    """Take part in a run on several machines: on each machine but the first (which ran `widen run`
    or `widen resume`), with the runs directory shared, start its torchrun on the run (continuing
    from the checkpoint when the run was resumed). Rank 0, on whichever machine it lands, writes
    the run; this writes only its own log, RUN_DIR/stderr-HOST-PID.log. Watches the run unless
    --detach."""
    from widen_tui.launcher import join as join_run

    run = find_run(run_ref)
    pid, log = join_run(run)
    err.print(f"joined {run.id} (torchrun pid {pid}); its output goes to {log}", highlight=False, markup=False,
              soft_wrap=True)
    if detach:
        console.print(str(log), highlight=False, markup=False, soft_wrap=True)
        return
    if follow_run(run) != "done":
        raise typer.Exit(1)


@commands.command()
def cancel(run_ref: Annotated[str, typer.Argument(metavar="RUN")]):
    """Stop a run gracefully: it checkpoints and ends as `cancelled`."""
    from widen_tui.launcher import cancel as cancel_run

    run = find_run(run_ref)
    console.print(f"{run.id}: {cancel_run(run)}", highlight=False)
