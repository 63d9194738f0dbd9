"""`widen watch` and `widen logs`: a run's events as they come (a live view, or plain lines)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from engine.runs.rundir import FAILED_STATES, RunDir
from widen_tui.cli.common import console, err, find_run, warn, warn_files, warn_skipped
from widen_tui.views.event_text import describe_event

if TYPE_CHECKING:  # the records (pydantic) load when a run is followed: `widen --help` stays quick
    from engine.runs.records import EventRecord

commands = typer.Typer()


def follow_run(run: RunDir, live: bool | None = None, show_results: bool = True) -> str:
    """Follow a run's events until it ends; print the results. Returns the final state."""
    from engine.runs.follow import Follower
    from engine.runs.progress import RunProgress
    from widen_tui.views.report import live_view, results_view

    follower, progress = Follower(run), RunProgress(run=run.id)
    live = console.is_terminal if live is None else live
    printer = None if live else _LinePrinter()
    said_stale = False
    results: dict | None = None

    def poll() -> bool:
        nonlocal said_stale, results
        update = follower.poll()
        for record in update.records:
            progress.update(record)
            if printer:
                printer(record)
        warn_skipped(run, update.skipped, update.skipped_count)  # bad lines: one warning per poll that found some
        if update.state == "stale" and not said_stale:  # its process exists: it may go on (SIGCONT)
            said_stale = True
            warn(f"{run.id} is stale: its worker (pid {follower.status.get('pid')}) is stopped or has not written a "
                 "heartbeat for a while — still watching; Ctrl-C stops watching")
        if update.ended:  # the last events written before the status came with this poll
            results = update.results
            progress.state = update.state
            progress.error = progress.error or follower.status.get("error")
            return True
        return False

    try:
        if live:
            from rich.live import Live

            with Live(live_view(progress), console=console, refresh_per_second=2, transient=False) as view:
                while not poll():
                    view.update(live_view(progress))
                    time.sleep(0.5)
                view.update(live_view(progress))
        else:
            while not poll():
                time.sleep(0.5)
    except KeyboardInterrupt:
        err.print(f"\nstopped watching; {run.id} keeps running — `widen watch {run.id}` / "
                  f"`widen cancel {run.id}`", highlight=False)
        return "running"
    warn_files(run)
    if results and show_results:
        console.print(results_view(results))
    elif results:
        from widen_tui.views.report import fmt_num

        s = results.get("summary") if isinstance(results.get("summary"), dict) else {}
        ppl = s.get("final_ppl") if isinstance(s.get("final_ppl"), dict) else {}
        share = s.get("trainable_share")
        console.print(f"{progress.state}: final ppl " + " ".join(f"{t}={fmt_num(v, 2)}" for t, v in ppl.items())
                      + (f" · trainable {share * 100:.1f}%" if isinstance(share, (int, float)) else ""),
                      highlight=False)
    if progress.state != "done":
        err.print(f"run {run.id} ended {progress.state}"
                  + (f": {progress.error}" if progress.error else "")
                  + (f" — see `widen logs {run.id}`" if progress.state in FAILED_STATES else ""),
                  highlight=False, markup=False)
    return progress.state


class _LinePrinter:
    """Plain progress lines for logs and pipes (no terminal to redraw)."""

    def __init__(self):
        self.last_step_print = 0.0
        self.last_progress: tuple[str, str] | None = None   # the (phase, what) printed last
        self.last_progress_print = 0.0

    def __call__(self, e: EventRecord) -> None:
        from engine.runs.records import ProgressEvent, RanksEvent, StepEvent, SystemEvent

        line = describe_event(e)
        if isinstance(e, StepEvent):
            if time.time() - self.last_step_print < 5:
                return
            self.last_step_print = time.time()
        if isinstance(e, ProgressEvent):  # each phase's start, then a line every 5 s at most
            if (e.phase, e.what) == self.last_progress and time.time() - self.last_progress_print < 5:
                return
            self.last_progress, self.last_progress_print = (e.phase, e.what), time.time()
        if line and not isinstance(e, SystemEvent | RanksEvent):  # samples, not progress: the live view shows them
            console.print(line, highlight=False, soft_wrap=True, markup=False)


@commands.command()
def watch(run_ref: Annotated[str, typer.Argument(metavar="RUN")] = "last"):
    """Live view of a run (rich; works over SSH). Ctrl-C stops watching, not the run."""
    state = follow_run(find_run(run_ref))
    if state in FAILED_STATES:
        raise typer.Exit(1)


@commands.command()
def logs(
    run_ref: Annotated[str, typer.Argument(metavar="RUN")] = "last",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events until the run ends")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="print the JSON events as written")] = False,
):
    """Print a run's events (and the worker's stderr if it failed)."""
    from engine.runs.follow import Follower
    from engine.runs.rundir import dumps_json

    run = find_run(run_ref)
    follower = Follower(run)
    try:
        while True:
            update = follower.poll()
            for event in update.records:
                console.print(dumps_json(event.to_json()) if raw else describe_event(event), highlight=False,
                              soft_wrap=True, markup=False)
            warn_skipped(run, update.skipped, update.skipped_count)
            if not follow or update.ended:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
    warn_files(run)
    state = update.state
    if state in FAILED_STATES and run.stderr.is_file():
        try:
            tail = run.stderr.read_text(errors="replace").splitlines()[-30:]
        except OSError as e:
            warn(f"{run.id}: {run.stderr.name} unreadable: {e.strerror or e}")
            return
        err.print(f"--- {run.stderr} (last lines) ---", highlight=False, markup=False)
        err.print("\n".join(tail), highlight=False, markup=False)
