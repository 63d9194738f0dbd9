"""The Runs screen (home): every run in the runs root, live, with the actions on them.

Disk is read in a thread worker every ``REFRESH_S`` seconds (``RunRowsLoader``), which posts
``RunsLoaded``; the table then changes only the cells that changed. Actions work on the marked
runs (`space`), or on the run under the cursor when none is marked. Cancel and delete ask first;
their file work runs in a thread worker too, and reports back with ``RunActionDone``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input, Static

from engine.runs.rundir import RunDir
from widen_tui.tui.widgets.binding_commands import BindingCommands
from widen_tui.tui.widgets.confirm import ConfirmScreen
from widen_tui.tui.widgets.run_rows import RunRow, RunRowsLoader
from widen_tui.tui.widgets.runs_table import RunsTable

CANCELLABLE = ("queued", "running", "stale")  # stale: its process exists (stopped or silent)
RESUMABLE = ("cancelled", "failed", "lost", "diverged")
FILTER_HINT = "/ filter by id, name, variant, plan, state · ctrl+p every command"


class RunsLoaded(Message):
    """A fresh read of the runs root (`seconds`: how long the read took)."""

    def __init__(self, rows: list[RunRow], seconds: float):
        super().__init__()
        self.rows = rows
        self.seconds = seconds


class RunsLoadFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class RunActionDone(Message):
    """Cancel / resume / delete finished: one line per run, and whether any failed."""

    def __init__(self, lines: list[str], failed: bool, touched: list[str]):
        super().__init__()
        self.lines = lines
        self.failed = failed
        self.touched = touched


class RunsScreen(Screen):
    """The runs index as a live table. `clock` gives "now" for the age column (tests freeze it)."""

    CSS_PATH = "runs.tcss"
    COMMANDS = {BindingCommands}
    REFRESH_S = 2.0
    BINDINGS = [
        # Not in the footer (80 columns hold the rest); the filter box shows it instead.
        Binding("slash", "focus_filter", "Filter", show=False),
        Binding("c", "compare", "Compare"),
        Binding("x", "cancel_runs", "Cancel"),
        Binding("u", "resume_runs", "Resume"),
        Binding("d", "delete_runs", "Delete"),
        Binding("n", "new_plan", "Plan"),
        Binding("s", "sweep", "Sweep"),
        # The app's `q`, with a description short enough for an 80-column footer.
        Binding("q", "app.quit", "Quit"),
        Binding("escape", "leave_filter", show=False),  # back to the table from the filter box
    ]

    def __init__(self, clock: Callable[[], float] = time.time, **kwargs):
        super().__init__(**kwargs)
        self.clock = clock
        self.rows: list[RunRow] = []
        self.loaded = False  # the first read has arrived
        self.last_load_s: float | None = None
        self._loading = False
        self._again = False
        self._loader: RunRowsLoader | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder=FILTER_HINT, id="runs-filter", compact=True)
        yield RunsTable(id="runs-table")
        yield Static("", id="runs-detail", markup=False)
        yield Footer(compact=True, show_command_palette=False)  # see the filter box

    def on_mount(self) -> None:
        self._loader = RunRowsLoader(self.app.root, self.clock)
        self.query_one(RunsTable).focus()
        self.refresh_runs()
        self._timer = self.set_interval(self.REFRESH_S, self.refresh_runs)

    # Another screen on top (monitor, compare…): stop reading disk until we are back.
    def on_screen_suspend(self) -> None:
        if self._timer is not None:
            self._timer.pause()

    def on_screen_resume(self) -> None:
        if self._timer is not None:
            self._timer.resume()
            self.refresh_runs()

    # -- reading the runs ------------------------------------------------------------------------

    def refresh_runs(self) -> None:
        """Read the runs root again. Reads never pile up on a slow disk: while one is going, another
        is only noted, and starts when it ends (so what an action just changed is never missed)."""
        if self._loading:
            self._again = True
            return
        self._loading, self._again = True, False
        self._load_rows()

    @work(thread=True, group="runs-refresh")
    def _load_rows(self) -> None:
        started = time.perf_counter()
        try:
            rows = self._loader.load()
        except Exception as e:  # noqa: BLE001 — a locked or unreadable index is shown, not raised
            self.post_message(RunsLoadFailed(f"cannot read the runs in {self.app.root}: {e}"))
            return
        self.post_message(RunsLoaded(rows, time.perf_counter() - started))

    def on_runs_loaded(self, message: RunsLoaded) -> None:
        self.loaded = True
        self.last_load_s = message.seconds
        self.rows = message.rows
        self._show_rows()
        self._load_ended()

    def on_runs_load_failed(self, message: RunsLoadFailed) -> None:
        self.query_one("#runs-detail", Static).update(message.error)
        self._load_ended()

    def _load_ended(self) -> None:
        self._loading = False
        if self._again:
            self.refresh_runs()

    def _show_rows(self) -> None:
        words = self.query_one("#runs-filter", Input).value.casefold().split()
        self.query_one(RunsTable).show([row for row in self.rows if row.matches(words)])
        self._show_detail()

    def _show_detail(self) -> None:
        table = self.query_one(RunsTable)
        if not self.rows:
            text = f"no runs in {self.app.root} — press n to build a plan, or `widen run PLAN --detach`"
        elif not table.row_count:
            text = f"no run matches the filter (of {len(self.rows)}) — escape, then clear it"
        else:
            by_id = {row.id: row for row in self.rows}
            current = by_id.get(table.cursor_run_id or "")
            marked = sorted(table.marked & by_id.keys())
            text = (current.detail if current else "") + (f" · {len(marked)} marked" if marked else "")
        self.query_one("#runs-detail", Static).update(text)

    @on(Input.Changed, "#runs-filter")
    def _filter_changed(self) -> None:
        self._show_rows()

    @on(Input.Submitted, "#runs-filter")
    def _filter_done(self) -> None:
        self.query_one(RunsTable).focus()

    @on(DataTable.RowHighlighted)
    @on(RunsTable.MarksChanged)
    def _cursor_moved(self) -> None:
        self._show_detail()

    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        self.app.open_monitor(event.row_key.value)

    # -- which runs an action is about -----------------------------------------------------------

    def selected_ids(self) -> list[str]:
        """The marked runs (in table order), or the run under the cursor when none is marked."""
        table = self.query_one(RunsTable)
        known = [row.id for row in self.rows]
        marked = [i for i in known if i in table.marked]
        if marked:
            return marked
        return [table.cursor_run_id] if table.cursor_run_id else []

    def _states(self, ids: list[str]) -> dict[str, str]:
        by_id = {row.id: row.state for row in self.rows}
        return {i: by_id.get(i, "?") for i in ids}

    def _need_runs(self) -> list[str]:
        ids = self.selected_ids()
        if not ids:
            self.notify("no run here yet — press n to build a plan", severity="warning", markup=False)
        return ids

    # -- actions ---------------------------------------------------------------------------------

    def action_focus_filter(self) -> None:
        self.query_one("#runs-filter", Input).focus()

    def action_leave_filter(self) -> None:
        self.query_one(RunsTable).focus()

    def action_new_plan(self) -> None:
        self.app.open_builder(None)

    def action_sweep(self) -> None:
        self.app.open_sweep(None)

    def action_compare(self) -> None:
        if ids := self._need_runs():
            self.app.open_compare(ids)

    def action_cancel_runs(self) -> None:
        ids = self._need_runs()
        if not ids:
            return
        states = self._states(ids)
        live = [i for i in ids if states[i] in CANCELLABLE]
        if not live:
            self.notify(_not_applicable(states, "cancelled", "only queued, running or stale runs can be cancelled"),
                        severity="warning", markup=False)
            return
        skipped = len(ids) - len(live)
        question = f"Cancel {_runs(live)}?"
        detail = "Each saves a checkpoint and stops as `cancelled`; `u` resumes it later." + \
                 (f" ({skipped} not running: left alone.)" if skipped else "")
        self.app.push_screen(ConfirmScreen(question, detail, yes="Cancel runs", no="Keep running"),
                             lambda yes: yes and self._act("cancel", live))

    def action_resume_runs(self) -> None:
        ids = self._need_runs()
        if not ids:
            return
        states = self._states(ids)
        resumable = [i for i in ids if states[i] in RESUMABLE]
        if not resumable:
            self.notify(_not_applicable(states, "resumed", "only cancelled, failed, diverged or lost runs can be resumed"),
                        severity="warning", markup=False)
            return
        self._act("resume", resumable)

    def action_delete_runs(self) -> None:
        ids = self._need_runs()
        if not ids:
            return
        states = self._states(ids)
        busy = [i for i in ids if states[i] in CANCELLABLE]
        if busy:
            self.notify(f"{_runs(busy)} still {states[busy[0]]} — cancel first (x), then delete",
                        severity="error", markup=False)
            return
        detail = "Removes the run directories (checkpoints, events, results) and their index records. " \
                 "This cannot be undone."
        self.app.push_screen(ConfirmScreen(f"Delete {_runs(ids)}?", detail, yes="Delete", no="Keep"),
                             lambda yes: yes and self._act("delete", ids))

    # -- doing them (files and processes: off the UI thread) -------------------------------------

    @work(thread=True, group="run-actions")
    def _act(self, verb: str, ids: list[str]) -> None:
        from widen_tui import launcher
        from widen_tui.index import RunIndex

        index = RunIndex(self.app.root)
        lines, failed = [], False
        for run_id in ids:
            run = RunDir(self.app.root / run_id)
            try:
                if verb == "cancel":
                    lines.append(f"{run_id}: {launcher.cancel(run)}")
                elif verb == "resume":
                    lines.append(f"{run_id}: resumed (pid {launcher.resume(run)})")
                else:
                    launcher.delete_run(run, index)
                    lines.append(f"{run_id}: deleted")
            except (RuntimeError, OSError) as e:
                failed = True
                lines.append(str(e) if run_id in str(e) else f"{run_id}: {e}")
        self.post_message(RunActionDone(lines, failed, ids))

    def on_run_action_done(self, message: RunActionDone) -> None:
        self.query_one(RunsTable).unmark(message.touched)
        self.notify("\n".join(message.lines), severity="error" if message.failed else "information",
                    markup=False)
        self.refresh_runs()


def _runs(ids: list[str]) -> str:
    return f"run {ids[0]}" if len(ids) == 1 else f"{len(ids)} runs"


def _not_applicable(states: dict[str, str], verb: str, rule: str) -> str:
    if len(states) == 1:
        ((run_id, state),) = states.items()
        return f"run {run_id} is {state}: nothing to be {verb} — {rule}"
    return f"none of the {len(states)} runs can be {verb} — {rule}"
