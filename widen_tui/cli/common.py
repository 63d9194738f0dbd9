"""What several verbs share: the consoles, finding a run by reference, one-line warnings, strict
JSON on stdout, and loading a plan file with its problems printed."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from engine.errors import WidenError
from engine.runs.rundir import RunDir, runs_root

# Piped output (logs, CI) gets a wide page so tables are not truncated to 80 columns.
console = Console()
if not console.is_terminal:
    console = Console(width=140)
err = Console(stderr=True)


class CLIError(WidenError):
    """One clear line for the user; main() prints it and exits 1."""


def run_index():
    from widen_tui.index import RunIndex

    return RunIndex(runs_root())


def find_run(ref: str) -> RunDir:
    """The run that `ref` names (id, prefix, last, name), through the runs index."""
    from widen_tui.index import RunNotFound

    index = run_index()
    try:
        run_id = index.resolve(ref)
    except RunNotFound as e:
        raise CLIError(str(e)) from None
    run = RunDir(runs_root() / run_id)
    if not run.exists():
        raise CLIError(f"run {run_id} is in the index but its directory is gone — `widen db rebuild`")
    return run


def print_json(data) -> None:
    """Strict JSON on stdout: a non-finite number (a diverged loss) is null, never `NaN`."""
    from engine.runs.rundir import dumps_json

    sys.stdout.write(dumps_json(data, indent=1) + "\n")


def warn(message: str) -> None:
    """One warning line on stderr (file contents are never read as markup)."""
    err.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)


def warn_files(run: RunDir, reader=None) -> None:
    """Say once what could not be read: unreadable run files (a line each), bad lines of
    events.jsonl (one line for all that are new)."""
    for problem in run.problems():
        warn(f"{run.id}: {problem}")
    if reader is not None:
        warn_events(run, reader)


def warn_events(run: RunDir, reader) -> None:
    """The events.jsonl lines `reader` skipped since last asked, in one warning line."""
    count, problems = reader.new_problem_count(), reader.new_problems()
    warn_skipped(run, problems, count)


def warn_skipped(run: RunDir, problems: list[str], count: int) -> None:
    """`count` skipped lines of the run's events.jsonl (`problems`: the first of them, as the
    reader says them), in one warning line; nothing when there are none."""
    if not count:
        return
    name = run.events.name
    shown = [p.removeprefix(f"{name} ") for p in problems[:5]]
    more = count - len(shown)
    warn(f"{run.id}: {name}: skipped " + "; ".join(shown) + (f"; and {more} more" if more else ""))


def public_record(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "files"}  # the index's own bookkeeping


def load_plan_or_exit(path: Path, overrides: list[str], seed: int | None, operators: bool = True):
    """The validated plan, or each of its problems on a line of stderr and exit 1. `operators`:
    also apply the plan's operators on the meta device (torch and the model's code: seconds;
    `widen run --detach` leaves that to the worker, which does it before loading any weight)."""
    from rich.markup import escape

    # pydantic models (and torch, for a plan with operators): imported only when a verb needs them
    from engine.grow.operator_fit import validate_plan_file
    from engine.plan import validate_file

    plan, problems = (validate_plan_file if operators else validate_file)(path, overrides, seed)
    if problems:
        for problem in problems:  # escaped: "[tasks.x]" / "[[stages]]" in a message are text, not markup
            err.print(f"[red]{escape(str(path))}[/red]: {escape(str(problem))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    return plan
