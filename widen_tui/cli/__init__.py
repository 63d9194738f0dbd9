"""The `widen` command line. Start-up stays light: torch is imported only by verbs that need it
(`plan show`, `doctor`) or by the worker subprocess."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from engine.errors import WidenError
from engine.runs.rundir import RunDir, runs_root
from widen_tui.views.event_text import describe_event
from widen_tui.sweeps import sweep_app

app = typer.Typer(help="widen — grow trained neural networks, train on new tasks, see what was "
                       "gained and forgotten.", no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False)
plan_app = typer.Typer(help="Check expansion plans.", no_args_is_help=True)
db_app = typer.Typer(help="The runs index.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")
app.add_typer(db_app, name="db")
app.add_typer(sweep_app, name="sweep")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("widen")
        except PackageNotFoundError:  # a bare checkout, not installed
            number = "unknown (not installed: `make setup`)"
        typer.echo(f"widen {number}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print widen's version and exit")] = False) -> None:
    """widen — grow trained neural networks, train on new tasks, see what was gained and forgotten."""


# Piped output (logs, CI) gets a wide page so tables are not truncated to 80 columns.
console = Console()
if not console.is_terminal:
    console = Console(width=140)
err = Console(stderr=True)
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


class CLIError(WidenError):
    """One clear line for the user; main() prints it and exits 1."""


def _index():
    from widen_tui.index import RunIndex

    return RunIndex(runs_root())


def _run_dir(ref: str) -> RunDir:
    from widen_tui.index import RunNotFound

    index = _index()
    try:
        run_id = index.resolve(ref)
    except RunNotFound as e:
        raise CLIError(str(e)) from None
    run = RunDir(runs_root() / run_id)
    if not run.exists():
        raise CLIError(f"run {run_id} is in the index but its directory is gone — `widen db rebuild`")
    return run


def _print_json(data) -> None:
    """Strict JSON on stdout: a non-finite number (a diverged loss) is null, never `NaN`."""
    from engine.runs.rundir import dumps_json

    sys.stdout.write(dumps_json(data, indent=1) + "\n")


def _warn(message: str) -> None:
    """One warning line on stderr (file contents are never read as markup)."""
    err.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)


def _warn_files(run: RunDir, reader=None) -> None:
    """Say once what could not be read: unreadable run files (a line each), bad lines of
    events.jsonl (one line for all that are new)."""
    for problem in run.problems():
        _warn(f"{run.id}: {problem}")
    if reader is not None:
        _warn_events(run, reader)


def _warn_events(run: RunDir, reader) -> None:
    """The events.jsonl lines `reader` skipped since last asked, in one warning line."""
    count, problems = reader.new_problem_count(), reader.new_problems()
    if not count:
        return
    name = reader.path.name
    shown = [p.removeprefix(f"{name} ") for p in problems[:5]]
    more = count - len(shown)
    _warn(f"{run.id}: {name}: skipped " + "; ".join(shown) + (f"; and {more} more" if more else ""))


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "files"}  # the index's own bookkeeping


def _load_plan_or_exit(path: Path, overrides: list[str], seed: int | None):
    from rich.markup import escape

    from engine.plan import validate_file  # pydantic models: imported only when a verb needs them

    plan, problems = validate_file(path, overrides, seed)
    if problems:
        for problem in problems:  # escaped: "[tasks.x]" / "[[stages]]" in a message are text, not markup
            err.print(f"[red]{escape(str(path))}[/red]: {escape(str(problem))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    return plan


# ---------------------------------------------------------------------------------------------
# plans


@plan_app.command("check")
def plan_check(
    file: Annotated[Path, typer.Argument(help="plan TOML file")],
    set_: Annotated[list[str], typer.Option("--set", help="override a field: key.path=value (repeatable)")] = [],
):
    """Validate a plan: schema, tasks, operators, and layer indices against the model's config."""
    from rich.markup import escape

    plan = _load_plan_or_exit(file, set_, None)
    stages = f"{len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''}"
    if plan.variants:
        stages = (f"{len(plan.stages)} shared stage{'s' if len(plan.stages) != 1 else ''}, {len(plan.variants)} "
                  f"variants ({', '.join(v.name for v in plan.variants)})")
    extras = [x for x, on in (("task-specific modules", plan.task_modules), ("mapping sweep", plan.sweep)) if on]
    summary = (f"{file}: {stages}, tasks {', '.join(plan.tasks)}, model {plan.model.source}"
               + "".join(f", {x}" for x in extras))
    console.print(f"[green]ok[/green] {escape(summary)}", highlight=False)



@plan_app.command("show")
def plan_show(
    file: Annotated[Path, typer.Argument(help="plan TOML file")],
    set_: Annotated[list[str], typer.Option("--set", help="override a field: key.path=value (repeatable)")] = [],
    as_json: Annotated[bool, typer.Option("--json", help="print the per-operator reports as a JSON list")] = False,
    meta: Annotated[bool, typer.Option("--meta", help="parameter counts only, on PyTorch's meta device: no "
                                       "weights are loaded (large models; automatic for a directory "
                                       "holding a config but no weights); no preservation figures")] = False,
):
    """Build the model and apply every stage's operators without training: parameters added,
    trainable share, and preservation (max |Δlogits|, loss before/after) per operator."""
    plan = _load_plan_or_exit(file, set_, None)
    if meta or _config_only(plan.model.source):
        _show_meta_preview(plan, as_json, why="" if meta else f"{plan.model.source} holds a config but no weights")
        return
    from engine.model.view import count_params
    from engine.exports.hf_directory import build_from_plan, quiet_transformers
    from widen_tui.views.report import expansions_table

    quiet_transformers()
    arms = [(v.name, plan.for_variant(v.name)) for v in plan.variants] or [(None, plan)]
    everything = {}
    for variant, resolved in arms:
        try:
            model, view, _, reports = build_from_plan(resolved)
        except WidenError as e:
            raise CLIError(f"{'variant ' + variant + ': ' if variant else ''}{e}") from None
        everything[variant] = reports
        if as_json:
            continue
        console.print(f"{plan.name}{' · variant ' + variant if variant else ''}: {resolved.model.source} "
                      f"({view.family.name}), {len(resolved.stages)} stages, {count_params(model):,} parameters "
                      "after every operator (no training)", highlight=False)
        if reports:
            console.print(expansions_table(reports))
        else:
            console.print("the plan applies no operators", highlight=False)
        if any(s.grow for s in resolved.stages):
            console.print("automatic growths (stages.grow) happen during training and are not applied here",
                          highlight=False)
    if as_json:
        _print_json(everything[None] if list(everything) == [None] else everything)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _config_only(source: str) -> bool:
    """A local model directory with a config.json and no weight files (a shape to plan for)."""
    path = Path(source)
    return (path.is_dir() and (path / "config.json").is_file()
            and not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES))


def _show_meta_preview(plan, as_json: bool, why: str) -> None:
    """The builder's parameter preview (engine.grow.preview: the real operators on a model without
    storage): exact counts per stage and operator, in seconds for a 7B config."""
    from rich.table import Table

    from engine.model.sources import load_config
    from engine.grow.preview import preview_plan, to_json
    from widen_tui.views.preview_rows import COLUMNS, preview_rows

    preview = preview_plan(plan.model_dump(mode="json"), load_config=load_config)
    if preview.base_total is None:
        raise CLIError(f"{preview.error_field + ': ' if preview.error_field else ''}{preview.error}")
    if as_json:
        _print_json(to_json(preview))
        return
    console.print(f"{plan.name}: {plan.model.source}, parameter counts on the meta device "
                  f"({why + '; ' if why else ''}no weights loaded, no preservation figures)", highlight=False)
    table = Table(header_style="bold")
    for label, _ in COLUMNS:
        table.add_column(label, justify="left" if label in ("stage / op", "variant") else "right")
    for row in preview_rows(preview):
        table.add_row(*row.cells, style="bold" if row.kind == "stage" else None)
    console.print(table)


# ---------------------------------------------------------------------------------------------
# running


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise CLIError(f"--seeds '{text}': give integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CLIError(f"--seeds '{text}': give distinct integers, e.g. --seeds 0,1,2")
    return seeds


def _launch(file: Path, set_: list[str], seed: int | None, detach: bool, seeds: list[int] | None = None) -> None:
    from widen_tui.launcher import create_runs, start_worker

    if seed is not None and seeds:
        raise CLIError("--seed and --seeds together: use one of them")
    plan = _load_plan_or_exit(file, set_, seed)
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
        if _follow(runs[0]) != "done":
            raise typer.Exit(1)
        return
    err.print(f"{len(runs)} runs, one after another: {', '.join(r.id for r in runs)} — Ctrl-C stops "
              "watching; the runs keep going", highlight=False, soft_wrap=True)
    states = []
    for run in runs:
        err.print(f"— {run.info().get('name')} ({run.id})", highlight=False)
        state = _follow(run, show_results=False)
        if state == "running":  # Ctrl-C
            return
        states.append(state)
    _print_comparison([r.id for r in runs])
    if any(state != "done" for state in states):
        raise typer.Exit(1)


def _distributed_overrides(nproc: int | None, nnodes: int | None, rdzv_endpoint: str | None) -> list[str]:
    """--nproc / --nnodes / --rdzv-endpoint as `--set` overrides (the endpoint quoted: a TOML string)."""
    extra = [f"train.distributed.nproc={nproc}"] if nproc else []
    extra += [f"train.distributed.nnodes={nnodes}"] if nnodes else []
    extra += [f"train.distributed.rdzv_endpoint={json.dumps(rdzv_endpoint)}"] if rdzv_endpoint else []
    return extra


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


NNODES_HELP = "train on N machines (each runs `widen join RUN`; needs --rdzv-endpoint)"
RDZV_HELP = "host:port of the c10d rendezvous, a free port on the first machine (e.g. node0:29500)"


@app.command()
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
    _launch(file, [*set_, *_distributed_overrides(nproc, nnodes, rdzv_endpoint)], seed, detach, _parse_seeds(seeds))


@app.command()
def demo(
    set_: Annotated[list[str], typer.Option("--set", help="override a field of the quickstart plan")] = [],
):
    """Grow the built-in model: train on prose, widen every FFN with zero-init, train on Python."""
    plan = EXPERIMENTS / "quickstart.toml"
    if not plan.exists():
        raise CLIError(f"the quickstart plan is missing ({plan}) — run from a checkout of widen")
    _launch(plan, set_, None, detach=False)


@app.command()
def resume(run_ref: Annotated[str, typer.Argument(metavar="RUN")],
           set_: Annotated[list[str], typer.Option("--set", help="change a training setting first, e.g. "
                                                   "train.lr=1e-4 after a divergence (repeatable)")] = [],
           nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="continue on N processes (the "
                                                        "checkpoint is whole: any N that divides the batch)")] = None,
           nnodes: Annotated[Optional[int], typer.Option("--nnodes", min=1, help=NNODES_HELP)] = None,
           rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", metavar="HOST:PORT",
                                                                help=RDZV_HELP)] = None):
    """Continue a cancelled, failed, diverged or lost run from its latest checkpoint (on as many
    processes and machines as the options say: the checkpoint is whole)."""
    from widen_tui.launcher import resume as resume_run

    run = _run_dir(run_ref)
    pid = resume_run(run, [*set_, *_distributed_overrides(nproc, nnodes, rdzv_endpoint)])
    err.print(f"resumed {run.id} (pid {pid}) — `widen watch {run.id}`", highlight=False)
    _say_how_to_join(run, resume=True)


@app.command()
def join(run_ref: Annotated[str, typer.Argument(metavar="RUN")],
         detach: Annotated[bool, typer.Option("--detach", "-d", help="print the log's path and return at once")]
         = False):
    """Take part in a run on several machines: on each machine but the first (which ran `widen run`
    or `widen resume`), with the runs directory shared, start its torchrun on the run (continuing
    from the checkpoint when the run was resumed). Rank 0, on whichever machine it lands, writes
    the run; this writes only its own log, RUN_DIR/stderr-HOST-PID.log. Watches the run unless
    --detach."""
    from widen_tui.launcher import join as join_run

    run = _run_dir(run_ref)
    pid, log = join_run(run)
    err.print(f"joined {run.id} (torchrun pid {pid}); its output goes to {log}", highlight=False, markup=False,
              soft_wrap=True)
    if detach:
        console.print(str(log), highlight=False, markup=False, soft_wrap=True)
        return
    if _follow(run) != "done":
        raise typer.Exit(1)


@app.command()
def cancel(run_ref: Annotated[str, typer.Argument(metavar="RUN")]):
    """Stop a run gracefully: it checkpoints and ends as `cancelled`."""
    from widen_tui.launcher import cancel as cancel_run

    run = _run_dir(run_ref)
    console.print(f"{run.id}: {cancel_run(run)}", highlight=False)


# ---------------------------------------------------------------------------------------------
# watching


def _follow(run: RunDir, live: bool | None = None, show_results: bool = True) -> str:
    """Follow a run's events until it ends; print the results. Returns the final state."""
    from engine.runs.events import EventReader
    from engine.runs.progress import RunProgress
    from widen_tui.views.report import live_view, results_view

    from engine.runs.rundir import LIVE_STATES

    reader, progress = EventReader(run.events), RunProgress(run=run.id)
    live = console.is_terminal if live is None else live
    printer = None if live else _LinePrinter()
    said_stale = False

    def take(final: bool = False) -> None:
        for event in reader.read_rest() if final else reader.read_new():
            progress.update(event)
            if printer:
                printer(event)

    def poll() -> bool:
        nonlocal said_stale
        take()
        status = run.status()
        if status["state"] in LIVE_STATES:
            _warn_events(run, reader)  # bad lines: one warning per poll that found some
        state = status["state"]
        if state == "stale" and not said_stale:  # its process exists: it may go on (SIGCONT)
            said_stale = True
            _warn(f"{run.id} is stale: its worker (pid {status.get('pid')}) is stopped or has not written a "
                  "heartbeat for a while — still watching; Ctrl-C stops watching")
        if state not in LIVE_STATES:
            take(final=True)  # the last events written before the status
            _warn_events(run, reader)
            progress.state = state
            progress.error = progress.error or status.get("error")
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
    results = run.results()
    _warn_files(run)
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
                  + (f" — see `widen logs {run.id}`" if progress.state in ("failed", "lost", "diverged") else ""),
                  highlight=False, markup=False)
    return progress.state


class _LinePrinter:
    """Plain progress lines for logs and pipes (no terminal to redraw)."""

    def __init__(self):
        self.last_step_print = 0.0

    def __call__(self, e: dict) -> None:
        line = describe_event(e)
        if e["type"] == "step":
            if time.time() - self.last_step_print < 5:
                return
            self.last_step_print = time.time()
        if line and e["type"] not in ("system", "ranks"):  # samples, not progress: the live view shows them
            console.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command()
def watch(run_ref: Annotated[str, typer.Argument(metavar="RUN")] = "last"):
    """Live view of a run (rich; works over SSH). Ctrl-C stops watching, not the run."""
    state = _follow(_run_dir(run_ref))
    if state in ("failed", "lost", "diverged"):
        raise typer.Exit(1)


@app.command()
def logs(
    run_ref: Annotated[str, typer.Argument(metavar="RUN")] = "last",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events until the run ends")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="print the JSON events as written")] = False,
):
    """Print a run's events (and the worker's stderr if it failed)."""
    from engine.runs.events import EventReader
    from engine.runs.rundir import LIVE_STATES, dumps_json

    run = _run_dir(run_ref)
    reader = EventReader(run.events)

    def dump(final: bool = False):
        for event in reader.read_rest() if final else reader.read_new():
            console.print(dumps_json(event) if raw else describe_event(event), highlight=False, soft_wrap=True,
                          markup=False)
        _warn_events(run, reader)

    state = run.status()["state"]
    try:
        while follow and state in LIVE_STATES:
            dump()
            time.sleep(0.5)
            state = run.status()["state"]
    except KeyboardInterrupt:
        return
    dump(final=state not in LIVE_STATES)
    _warn_files(run)
    if state in ("failed", "lost", "diverged") and run.stderr.is_file():
        try:
            tail = run.stderr.read_text(errors="replace").splitlines()[-30:]
        except OSError as e:
            _warn(f"{run.id}: {run.stderr.name} unreadable: {e.strerror or e}")
            return
        err.print(f"--- {run.stderr} (last lines) ---", highlight=False, markup=False)
        err.print("\n".join(tail), highlight=False, markup=False)


# ---------------------------------------------------------------------------------------------
# listing


@app.command()
def runs(as_json: Annotated[bool, typer.Option("--json", help="print the records as a JSON list")] = False):
    """List the runs in the runs root (oldest first). Works on a read-only runs root too."""
    index = _index()
    records = index.refresh()
    if index.write_error:
        _warn(f"{index.write_error} — listed from the run directories")
    for record in records:
        for problem in record.get("problems") or []:
            _warn(f"{record['id']}: {problem}")
    if as_json:
        _print_json([_public(r) for r in records])
        return
    if not records:
        console.print(f"no runs in {runs_root()} — try `widen demo`", highlight=False)
        return
    from widen_tui.views.report import runs_table

    console.print(runs_table(records))


@app.command()
def show(run_ref: Annotated[str, typer.Argument(metavar="RUN")] = "last",
         as_json: Annotated[bool, typer.Option("--json", help="print record, status and results as JSON")] = False):
    """A run's record, status and results (perplexity matrix, forgetting, expansions)."""
    run = _run_dir(run_ref)
    record = _index().update_run(run)  # a read-only runs root: shown all the same
    status, results = run.status(), run.results()
    _warn_files(run)
    if as_json:
        _print_json({**_public(record), "status": status, "results": results})
        return
    from rich.text import Text

    from widen_tui.views.report import results_view, state_text

    console.print(Text(run.id, style="bold"), f" {record['name']} ", state_text(record["state"]),
                  f" plan {record.get('plan')}", highlight=False, markup=False)
    if status.get("error"):
        err.print(f"error: {status['error']}", highlight=False, markup=False)
    if results:
        console.print(results_view(results))
    else:
        console.print(f"no results yet — `widen watch {run.id}`", highlight=False)


def _print_comparison(refs: list[str], as_json: bool = False, target: str | None = None, task: str | None = None,
                      baseline: str | None = None) -> None:
    from engine.runs.compare import compare_runs

    if target is None and (task is not None or baseline is not None):
        raise CLIError("--task and --baseline go with --target-loss L|auto")
    runs = [_run_dir(ref) for ref in refs]
    if baseline is not None:  # the baseline is compared too (first, unless it is among the runs)
        base = _run_dir(baseline)
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
        _warn_files(run, reader)
    data = compare_runs([(r.info(), r.status(), r.results()) for r in runs], streams)
    report = None
    if target is not None:
        from engine.runs import compute_to_target as ctt

        report = ctt.compute_to_target([ctt.RunInput(r.id, r.info(), s) for r, s in zip(runs, streams)],
                                       ctt.parse_target(target), task, baseline)
        data["compute_to_target"] = report.to_json()
    if as_json:
        _print_json(data)
        return
    from widen_tui.views.report import comparison_view, target_view

    console.print(comparison_view(data))
    if report is not None:
        console.print(target_view(report))


@app.command()
def compare(run_refs: Annotated[list[str], typer.Argument(metavar="RUN...")],
            as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
            target_loss: Annotated[Optional[str], typer.Option(
                "--target-loss", metavar="L|auto",
                help="compute to target: the FLOPs, tokens and time at which each run's held-out loss first "
                     "reached L (auto: the baseline's final held-out loss), and the ratio to the baseline's")] = None,
            task: Annotated[Optional[str], typer.Option(
                "--task", help="the task whose held-out loss is read (default: the only task, or the task "
                               "every run's last stage trained)")] = None,
            baseline: Annotated[Optional[str], typer.Option(
                "--baseline", metavar="RUN", help="the run the ratios divide by (default: the first RUN)")] = None):
    """Runs side by side: parameters added, trainable share, final perplexity per task,
    forgetting, BWT/FWT, wall time, tokens/s, peak memory; mean ± std over seeds. With
    --target-loss: the compute each run needed to reach a held-out loss (docs/flops.md)."""
    _print_comparison(run_refs, as_json, target_loss, task, baseline)


@db_app.command("rebuild")
def db_rebuild():
    """Rebuild the runs index from the run directories (the source of truth)."""
    count = _index().rebuild()
    console.print(f"indexed {count} runs from {runs_root()}", highlight=False)


# ---------------------------------------------------------------------------------------------
# exporting

PARITY_TOLERANCE = 1e-4


@app.command()
def export(
    source: Annotated[str, typer.Argument(metavar="PLAN_OR_RUN",
                                          help="a plan .toml (built and expanded, not trained) or a run (id, prefix, "
                                               "last, name, or run directory)")],
    out_dir: Annotated[Path, typer.Argument(help="directory to write the Hugging Face model to")],
    keep_adapters: Annotated[bool, typer.Option("--keep-adapters",
                                                help="keep adapters separate (PEFT format in OUT_DIR/adapter) "
                                                     "instead of merging them")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="override a field of a plan file: key.path=value")] = [],
    variant: Annotated[Optional[str], typer.Option("--variant", help="a plan with variants: the one to build")] = None,
):
    """Export a grown model as a Hugging Face directory (AutoModelForCausalLM.from_pretrained loads
    it; AutoModelForSeq2SeqLM for T5): widened layers merged into wider matrices, copied layers
    materialized, adapters merged — or, with --keep-adapters, each saved under OUT_DIR/adapter/<name>
    (PEFT format; widen_export.json lists which are active)."""
    path = Path(source)
    is_plan = source.endswith(".toml")
    if is_plan:
        if not path.is_file():
            raise CLIError(f"{source}: no such plan file")
        plan = _load_plan_or_exit(path, set_, None)
        if plan.variants:
            if not variant:
                raise CLIError(f"{source} has variants ({', '.join(v.name for v in plan.variants)}) — "
                               "pick one with --variant NAME")
            try:
                plan = plan.for_variant(variant)
            except KeyError as e:
                raise CLIError(f"--variant: {e.args[0]}") from None
    else:
        if set_:
            raise CLIError("--set applies to a plan file; a run's plan is fixed")
        run = RunDir(path) if path.is_dir() and (path / "plan.toml").exists() else _run_dir(source)
    from engine.exports import hf_directory as ex

    ex.quiet_transformers()
    try:
        if is_plan:
            model, view, tokenizer, reports = ex.build_from_plan(plan)
            origin = {"plan": str(path.resolve()), "plan_name": plan.name, "overrides": list(set_),
                      "trained": False}
        else:
            model, view, tokenizer, plan = ex.load_run_model(run.path)
            reports = (run.results() or {}).get("expansions") or ex.plan_op_summary(plan)
            origin = {"run": run.id, "run_dir": str(run.path), "plan_name": plan.name,
                      "run_state": run.status().get("state"), "trained": True}
        stage = len(plan.stages) - 1
        batch = ex.stage_probe(plan, stage, tokenizer)
        reference = ex.reference_logits(model, batch)
        manifest = ex.export_model(model, tokenizer, out_dir, keep_adapters=keep_adapters,
                                   source=origin, reports=reports)
        delta = ex.verify_export(out_dir, batch, reference)
    except WidenError as e:
        raise CLIError(str(e)) from None
    console.print(f"wrote {out_dir}: {manifest['model_type']} model, {manifest['num_layers']} layers, FFN "
                  f"{manifest['ffn_size']}, {manifest['params']:,} parameters, adapters {manifest['adapters']}",
                  highlight=False)
    loader = manifest["model_class"] + (" + PeftModel" if manifest["kept_adapters"] else "")
    console.print(f"parity: max |Δlogits| {delta:.2e} — reloaded with {loader}.from_pretrained vs "
                  f"the in-widen model, on {batch[0].shape[0]} probe sequences of task "
                  f"'{plan.stages[stage].task}'", highlight=False)
    if not delta <= PARITY_TOLERANCE:
        raise CLIError(f"export parity failed: max |Δlogits| {delta:.2e} > {PARITY_TOLERANCE:g} — the "
                       f"export in {out_dir} does not compute what the grown model computes")


@app.command("export-metrics")
def export_metrics(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="a run: id, prefix, last, name, or run directory")],
    to: Annotated[str, typer.Option("--to", metavar="tensorboard|mlflow|csv", help="where to mirror the metrics")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output directory (default: RUN_DIR/export-TOOL; "
                                                "mlflow: MLFLOW_TRACKING_URI when set)")] = None,
):
    """Mirror a run's metrics after the fact (engine.runs.metrics_export): loss, lr, tokens/s, evals per
    task, expansions and growths, memory samples, and the final forgetting matrix."""
    from engine.runs.metrics_export import export_run

    path = Path(run_ref)
    run = RunDir(path) if path.is_dir() and (path / "plan.toml").exists() else _run_dir(run_ref)
    summary = export_run(run.path, to, out)
    for problem in summary.problems[:5]:
        _warn(f"{run.id}: skipped {problem}")
    console.print(summary.line(), highlight=False)


# ---------------------------------------------------------------------------------------------
# figures


@app.command()
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
        "--target-loss", metavar="L|auto", help="draw this held-out loss (auto: the baseline's final one) and mark "
                                                "where each run first reached it (as `widen compare --target-loss`)")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="with --target-loss: the task whose held-out loss "
                                                              "is read")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", metavar="RUN",
                                                    help="with --target-loss auto: the run whose final loss is the "
                                                         "target (default: the first RUN)")] = None,
):
    """PNG figures: loss.png (training and eval loss of every run, overlaid, with stage boundaries and
    expansions), forgetting-<run>.png (bits per byte per task after each stage) and mapping-<name>.png
    (a mapping sweep: source layer per target layer, perplexity per row)."""
    from engine.runs.events import EventReader
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
        run = RunDir(path.resolve()) if is_dir else _run_dir(ref)
        if all(r.path != run.path for r in runs):
            runs.append(run)
    out_dir = out or (runs[0].path / "figures" if len(runs) == 1 and not sweeps else Path("figures"))

    def warn(message: str) -> None:
        err.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)

    names = {}
    for run in runs:
        info = run.info()
        name = str(info.get("name") or run.id)
        variant = info.get("variant")
        names[run.id] = f"{name}/{variant}" if variant and str(variant) not in name else name
    labels = {rid: (n if list(names.values()).count(n) == 1 else f"{n} [{rid}]") for rid, n in names.items()}

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
            if any(e.get("type") in ("step", "eval") for e in events):
                curves.append((labels[run.id], events))
                inputs.append((run, events))
            matrix = results.get("matrix") if isinstance(results.get("matrix"), dict) else None
            if matrix is None and events:
                matrix = figures.matrix_from_events(events)
                if matrix is not None:
                    warn(f"{run.id}: no results.json yet — forgetting matrix from the evaluations so far")
            if matrix and matrix.get("rows"):
                stages = results.get("stages") if isinstance(results.get("stages"), list) else []
                trained = [None] + [s.get("task") for s in stages] if stages else matrix.get("trained", ())
                written.append(figures.forgetting_figure(matrix, out_dir / f"forgetting-{run.id}.png",
                                                         run=labels[run.id], trained=trained))
            if results.get("sweep"):
                written.append(figures.mapping_figure(results["sweep"], out_dir / f"mapping-{run.id}.png",
                                                      title=labels[run.id], warn=warn))
        target = None
        if target_loss is not None:
            from engine.runs import compute_to_target as ctt

            target = ctt.compute_to_target([ctt.RunInput(r.id, r.info(), e) for r, e in inputs],
                                           ctt.parse_target(target_loss), task,
                                           _run_dir(baseline).id if baseline else None,
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


# ---------------------------------------------------------------------------------------------
# the machine


@app.command()
def tui(run_ref: Annotated[Optional[str], typer.Argument(metavar="[RUN]", help="open this run's monitor")] = None,
        plan: Annotated[Optional[Path], typer.Option("--plan", help="open the plan builder on this file")] = None):
    """The terminal app: runs, live monitor, plan builder, compare, sweep. `q` quits; runs keep
    going. Works over SSH (any terminal, 80×24 and up)."""
    run_id = _run_dir(run_ref).id if run_ref else None
    if plan is not None and not plan.is_file():
        raise CLIError(f"--plan {plan}: no such plan file")
    from widen_tui.tui.app import main as tui_main

    tui_main(runs_root(), run_id, plan)


@app.command()
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


def main() -> None:
    try:
        # without standalone mode click returns a typer.Exit's code instead of raising it
        # prog_name: usage lines and the completion variable (_WIDEN_COMPLETE) say `widen`, also under -m
        code = app(standalone_mode=False, prog_name="widen")
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except WidenError as e:  # widen's own: the message is the whole story
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # click usage errors and anything unexpected: one line, no traceback
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a usage error (typer vendors click)
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("WIDEN_DEBUG"):
            raise
        err.print(f"error: {e.__class__.__name__}: {e} (WIDEN_DEBUG=1 shows the traceback)",
                  highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
