"""`widen tui`: the Textual app where researchers build plans, launch them and watch runs.

The app is a stack of screens (``widen_tui/tui/screens/``): Runs (the index, the home screen), Run
monitor, Plan builder, Compare and Sweep. Screens talk to the app through its ``open_*``
methods and to their widgets through messages; they never reach into each other. Disk and engine
work happens in thread workers that post messages, so the UI never blocks. No torch is imported
here: the engine runs in detached subprocesses (``widen_tui.launcher``), so quitting the app (`q`)
leaves every run going.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding

from engine.runs.rundir import runs_root


class WidenApp(App):
    """The widen TUI. `root`: the runs root (default: $WIDEN_HOME or ./runs); `run`: open this
    run's monitor first; `plan`: open the builder on this plan file first."""

    TITLE = "widen"
    SUB_TITLE = "grow trained networks, watch what they gain and forget"
    # absolute: subclasses defined elsewhere (tests) would look for a relative path beside themselves
    CSS_PATH = Path(__file__).with_name("app.tcss")
    BINDINGS = [
        Binding("q", "quit", "Quit (runs keep going)"),
        Binding("R", "runs", "Runs", show=False),
        Binding("n", "new_plan", "New plan"),
        Binding("f1", "help_keys", "Keys", show=False),
    ]

    def __init__(self, root: Path | str | None = None, run: str | None = None, plan: Path | str | None = None):
        super().__init__()
        self.root = Path(root) if root else runs_root()
        self.start_run = run
        self.start_plan = Path(plan) if plan else None

    def on_mount(self) -> None:
        from widen_tui.tui.screens.runs import RunsScreen

        self.push_screen(RunsScreen())
        if self.start_run:
            self.open_monitor(self.start_run)
        elif self.start_plan:
            self.open_builder(self.start_plan)

    # -- navigation: every screen opens others through these ------------------------------------
    def open_monitor(self, run_id: str) -> None:
        from widen_tui.tui.screens.monitor import MonitorScreen

        self.push_screen(MonitorScreen(run_id))

    def open_compare(self, run_ids: list[str]) -> None:
        from widen_tui.tui.screens.compare import CompareScreen

        self.push_screen(CompareScreen(list(run_ids)))

    def open_builder(self, plan: Path | str | None = None) -> None:
        from widen_tui.tui.screens.builder import BuilderScreen

        self.push_screen(BuilderScreen(Path(plan) if plan else None))

    def open_sweep(self, source: str | None = None) -> None:
        from widen_tui.tui.screens.sweep import SweepScreen

        self.push_screen(SweepScreen(source))

    def action_runs(self) -> None:
        while len(self.screen_stack) > 2:  # the default screen, then Runs
            self.pop_screen()

    def action_new_plan(self) -> None:
        self.open_builder(None)

    def action_help_keys(self) -> None:
        self.action_show_help_panel()


def main(root: Path | str | None = None, run: str | None = None, plan: Path | str | None = None) -> None:
    WidenApp(root, run, plan).run()
