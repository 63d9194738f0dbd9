"""The Sweep screen: run a mapping sweep, or open one, and show its heatmap.

Running a sweep needs torch, which the TUI never imports: the screen starts
``python -m widen_tui.cli sweep mapping ... --json`` as a subprocess from a thread worker and reads
its JSON. Opening reads a sweep JSON file (from ``widen sweep mapping --json``) or the "sweep" of
a run's results.json (a run id, prefix, name, or run directory). Either way the worker posts
``SweepLoaded`` or ``SweepFailed``; the heatmap is ``widen_tui.sweeps.heatmap`` in a Static.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ScrollableContainer
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Header, Input, Label, LoadingIndicator, Static

from engine.errors import WidenError
from widen_tui.tui.widgets.binding_commands import BindingCommands

PACKAGE_ROOT = Path(__file__).resolve().parents[3]
REQUIRED_KEYS = ("rows", "source_layers", "depth")


class SweepSourceError(WidenError, ValueError):
    """A source that holds no mapping sweep; the message is one line for the user."""


class SweepLoaded(Message):
    def __init__(self, result: dict, origin: str):
        super().__init__()
        self.result = result
        self.origin = origin


class SweepFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


def load_sweep(source: str, root: Path) -> tuple[dict, str]:
    """(sweep result, where it came from) for a sweep JSON file, a run directory, or a run
    reference resolved in `root`. Raises SweepSourceError with a one-line message."""
    source = source.strip()
    if not source:
        raise SweepSourceError("give a sweep .json file (widen sweep mapping --json) or a run id")
    path = Path(source).expanduser()
    if path.is_file():
        return _sweep_of(_read_json(path), str(path)), str(path)
    if path.is_dir():
        return _sweep_of(_read_json(path / "results.json"), f"run {path.name}"), f"run {path.name}"
    from widen_tui.index import RunIndex, RunNotFound

    try:
        run_id = RunIndex(root).resolve(source)
    except RunNotFound as e:
        raise SweepSourceError(f"'{source}' is neither a file nor a run: {e}") from None
    results = root / run_id / "results.json"
    if not results.exists():
        raise SweepSourceError(f"run {run_id} has no results.json yet (not finished) — no sweep to show")
    return _sweep_of(_read_json(results), f"run {run_id}"), f"run {run_id}"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepSourceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SweepSourceError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise SweepSourceError(f"{path}: not a mapping sweep (a JSON object was expected)")
    return data


def _sweep_of(data: dict, origin: str) -> dict:
    """The sweep in `data`: itself (a `--json` output) or its "sweep" (a run's results.json)."""
    if "rows" not in data and isinstance(data.get("sweep"), dict):
        data = data["sweep"]
    elif "rows" not in data and "matrix" in data:
        raise SweepSourceError(f"{origin} has no mapping sweep (its plan has no [sweep]) — run one with ctrl+r")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise SweepSourceError(f"{origin}: not a mapping sweep (no {', '.join(missing)})")
    if not any(row.get("reference") for row in data["rows"]):
        raise SweepSourceError(f"{origin}: not a mapping sweep (no reference row)")
    return data


def sweep_command(model: str, depth: int, keep_ends: bool, task: str, limit: int | None,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The CLI call that runs the sweep (its JSON on stdout, one `error:` line on failure)."""
    args = [sys.executable, "-m", "widen_tui.cli", "sweep", "mapping", "--model", model, "--depth", str(depth),
            "--keep-ends" if keep_ends else "--no-keep-ends", "--task", task, "--json"]
    if limit:
        args += ["--limit", str(limit)]
    return args + list(extra)


def headline(result: dict, origin: str) -> str:
    rows = result["rows"]
    tokens = result.get("tokens")
    source = result.get("model") or origin
    return (f"{source} on {result.get('task', '?')}: {result['source_layers']} → {result['depth']} layers, "
            f"{len(rows) - 1} mappings, no training" + (f"; {tokens:,} tokens per mapping" if tokens else ""))


class SweepScreen(Screen):
    """Run or open a mapping sweep. `source`: open this (sweep JSON file or run) at once.
    `extra_args` are passed to every `widen sweep mapping` (tests make it small)."""

    CSS_PATH = "sweep.tcss"
    COMMANDS = {BindingCommands}
    BINDINGS = [
        Binding("ctrl+r", "run_sweep", "Run sweep"),
        Binding("ctrl+o", "open_sweep", "Open"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, source: str | None = None, extra_args: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.source = source
        self.extra_args = tuple(extra_args)
        self.result: dict | None = None
        self.error: str | None = None
        self._process: subprocess.Popen | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="sweep-row"):
            yield Label("model", classes="sweep-label")
            yield Input("builtin:tiny-neo", id="sweep-model", compact=True,
                        placeholder="hub name, local dir, builtin:tiny-neo or a run id")
            yield Label("depth", classes="sweep-label -after-input")
            yield Input("8", id="sweep-depth", type="integer", compact=True)
        with Horizontal(classes="sweep-row"):
            yield Label("task", classes="sweep-label")
            yield Input("builtin:pydoc", id="sweep-task", compact=True,
                        placeholder="builtin:pydoc, builtin:stdlib-python, a text file, a run's task")
            yield Label("limit", classes="sweep-label -after-input")
            yield Input("", id="sweep-limit", type="integer", compact=True, placeholder="all")
        with Horizontal(classes="sweep-row"):
            yield Checkbox("keep first and last layers in place", True, id="sweep-keep-ends", compact=True)
        with Horizontal(classes="sweep-row"):
            yield Label("open", classes="sweep-label")
            yield Input(self.source or "", id="sweep-open", compact=True,
                        placeholder="a sweep .json (widen sweep mapping --json) or a run id; ctrl+o")
        yield Static("ctrl+r runs a sweep with these settings; ctrl+o opens one", id="sweep-status", markup=False)
        yield LoadingIndicator(id="sweep-loading")
        with ScrollableContainer(id="sweep-result"):
            yield Static("", id="sweep-heatmap")
            yield Static("", id="sweep-speedup", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#sweep-model", Input).focus()
        if self.source:
            self.action_open_sweep()

    def on_unmount(self) -> None:
        self._stop_process()

    # -- actions ---------------------------------------------------------------------------------

    def action_back(self) -> None:
        self._stop_process()
        self.app.pop_screen()

    def action_open_sweep(self) -> None:
        source = self.query_one("#sweep-open", Input).value
        self._busy(f"opening {source} …")
        self._open(source)

    def action_run_sweep(self) -> None:
        if self.has_class("-running"):
            self.notify("a sweep is running already", severity="warning", markup=False)
            return
        model = self.query_one("#sweep-model", Input).value.strip()
        depth = _whole(self.query_one("#sweep-depth", Input).value)
        limit_text = self.query_one("#sweep-limit", Input).value.strip()
        limit = _whole(limit_text) if limit_text else None
        task = self.query_one("#sweep-task", Input).value.strip() or "builtin:pydoc"
        if not model:
            return self._fail("model: give a hub name, a local model directory, builtin:tiny-neo or a run id")
        if depth is None:
            return self._fail("depth: give the number of layers of the stacked models (a whole number ≥ 1)")
        if limit_text and limit is None:
            return self._fail("limit: a whole number ≥ 1, or empty for every mapping")
        keep_ends = self.query_one("#sweep-keep-ends", Checkbox).value
        self._busy(f"sweeping {model} to {depth} layers on {task} (a subprocess; escape stops it) …")
        self._run(sweep_command(model, depth, keep_ends, task, limit, self.extra_args))

    @on(Input.Submitted, "#sweep-open")
    def _open_submitted(self) -> None:
        self.action_open_sweep()

    @on(Input.Submitted, "#sweep-model, #sweep-depth, #sweep-task, #sweep-limit")
    def _run_submitted(self) -> None:
        self.action_run_sweep()

    # -- workers (disk and the subprocess stay off the UI thread) --------------------------------

    @work(thread=True, exclusive=True, group="sweep-open")
    def _open(self, source: str) -> None:
        try:
            result, origin = load_sweep(source, self.app.root)
        except SweepSourceError as e:
            self.post_message(SweepFailed(str(e)))
            return
        self.post_message(SweepLoaded(result, origin))

    @work(thread=True, exclusive=True, group="sweep-run")
    def _run(self, args: list[str]) -> None:
        env = dict(os.environ, WIDEN_HOME=str(self.app.root))
        # the subprocess must import this checkout's packages, wherever the TUI was started
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        try:
            self._process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            out, err = self._process.communicate()
        except OSError as e:
            self.post_message(SweepFailed(f"cannot start the sweep: {e}"))
            return
        code = self._process.returncode
        self._process = None
        if code != 0:
            self.post_message(SweepFailed(_error_line(err) or f"the sweep stopped (exit {code})"))
            return
        try:
            result = _sweep_of(json.loads(out), "the sweep's output")
        except (json.JSONDecodeError, SweepSourceError) as e:
            self.post_message(SweepFailed(f"the sweep printed no usable JSON: {e}"))
            return
        self.post_message(SweepLoaded(result, "this sweep"))

    def _stop_process(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    # -- showing ---------------------------------------------------------------------------------

    def _busy(self, text: str) -> None:
        self.add_class("-running")
        self.query_one("#sweep-status", Static).update(text)

    def _fail(self, error: str) -> None:
        self.error = error
        self.remove_class("-running")
        self.query_one("#sweep-status", Static).update(Text(f"error: {error}", style="bold red"))

    def on_sweep_failed(self, message: SweepFailed) -> None:
        self._fail(message.error)

    def on_sweep_loaded(self, message: SweepLoaded) -> None:
        from widen_tui.sweeps import heatmap, speedup_line

        self.remove_class("-running")
        try:
            table, speed = heatmap(message.result), speedup_line(message.result)
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            self._fail(f"{message.origin}: not a complete mapping sweep ({type(e).__name__}: {e})")
            return
        self.result, self.error = message.result, None
        self.query_one("#sweep-status", Static).update(headline(message.result, message.origin))
        self.query_one("#sweep-heatmap", Static).update(table)
        self.query_one("#sweep-speedup", Static).update(speed)


def _whole(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def _error_line(stderr: str) -> str:
    """The CLI's one `error:` line, else the last line (a traceback's exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return lines[-1] if lines else ""
