"""Compare: the selected runs side by side — overlaid loss curves, the comparison table and the
growth lineage (base → variants → growths, with the curves joined at each branch point).

The runs are read once, in a thread worker (`engine.runs.compare_data`), which posts
`CompareScreen.DataLoaded`; nothing here blocks on disk. The x axis of both charts switches
between global steps, tokens seen and training FLOPs; when a model grew mid-way the default is
FLOPs, because steps and tokens undercount what a grown model costs: only compute makes such runs
comparable. Three tabs keep it usable at 80×24.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from engine.runs.compare_data import Loaded, comparison, load_runs
from engine.runs.curves import X_AXES, RunCurves, curves_from_events
from widen_tui.tui.widgets.binding_commands import BindingCommands
from widen_tui.tui.widgets.comparison_table import ComparisonTable
from widen_tui.tui.widgets.lineage import LineageView
from widen_tui.tui.widgets.loss_chart import LossChart
from widen_tui.views.lineage import LineageNode, build_lineage, lineage_curves

AXIS_ORDER = ("steps", "tokens", "flops")
AXIS_NAME = {"steps": "steps", "tokens": "tokens", "flops": "FLOPs"}


@dataclass
class CompareData:
    """Everything the screen draws, computed off the UI thread."""

    loaded: Loaded
    table: dict | None            # compare_runs output (None: no run found)
    curves: list[RunCurves]       # one per run, whole history (a variant's starts with its base)
    lineage: list[LineageNode]
    lineage_curves: list[RunCurves]  # one per lineage segment, joined at branch points
    grew: bool                    # a model grew mid-way: FLOPs is the fair axis


class CompareScreen(Screen):
    CSS_PATH = "compare.tcss"
    COMMANDS = {BindingCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("s", "x_axis('steps')", "Steps"),
        Binding("t", "x_axis('tokens')", "Tokens"),
        Binding("f", "x_axis('flops')", "FLOPs"),
        Binding("x", "next_axis", "Next x axis", show=False),
        Binding("1", "tab('curves')", "Curves", show=False),
        Binding("2", "tab('table')", "Table", show=False),
        Binding("3", "tab('lineage')", "Lineage", show=False),
        Binding("r", "reload", "Reload"),
    ]

    x_axis: reactive[str] = reactive("steps", init=False)

    class DataLoaded(Message):
        def __init__(self, data: CompareData | None, error: str | None = None) -> None:
            super().__init__()
            self.data = data
            self.error = error

    def __init__(self, run_ids: list[str]):
        super().__init__()
        self.run_ids = list(run_ids)
        self.data: CompareData | None = None
        self._axis_chosen = False  # once the user picks an axis, a reload keeps it

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"reading {len(self.run_ids)} run(s)…", id="compare-status", markup=False)
        with TabbedContent(id="compare-tabs", initial="curves"):
            with TabPane("1 Curves", id="curves"):
                yield LossChart(id="compare-chart")
            with TabPane("2 Table", id="table"):
                yield ComparisonTable(id="comparison")
            with TabPane("3 Lineage", id="lineage"):
                with Container(id="lineage-body"):
                    yield LineageView(id="lineage-view")
                    yield LossChart(id="lineage-chart")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"compare {len(self.run_ids)} runs"
        self.load()

    # -- loading, off the UI thread --------------------------------------------------------------
    @work(thread=True, exclusive=True, group="compare-load")
    def load(self) -> None:
        try:
            loaded = load_runs(self.app.root, self.run_ids)
            lineage = build_lineage(loaded.runs)
            data = CompareData(loaded, comparison(loaded.runs) if loaded.runs else None,
                               [curves_from_events(r.label, r.events) for r in loaded.runs],
                               lineage, lineage_curves(lineage), any(r.grew for r in loaded.runs))
        except Exception as error:  # a broken run directory: say so instead of crashing the app
            self.post_message(self.DataLoaded(None, f"could not read the runs: {error}"))
            return
        self.post_message(self.DataLoaded(data))

    async def on_compare_screen_data_loaded(self, message: DataLoaded) -> None:
        if message.data is None:
            self.query_one("#compare-status", Static).update(message.error or "nothing to compare")
            return
        self.data = data = message.data
        if data.table is not None:
            await self.query_one(ComparisonTable).show(data.table)
        self.query_one(LineageView).show(data.lineage)
        axis = self.x_axis if self._axis_chosen else ("flops" if data.grew else "steps")
        if axis == self.x_axis:
            self._draw()
        self.x_axis = axis  # draws through watch_x_axis when it changes

    # -- the x axis --------------------------------------------------------------------------------
    def watch_x_axis(self) -> None:
        self._draw()

    def _draw(self) -> None:
        if self.data is None:
            return
        x = self.x_axis
        self.query_one("#compare-chart", LossChart).show(
            self.data.curves, x, title=f"loss of {len(self.data.curves)} runs by {X_AXES[x]}")
        self.query_one("#lineage-chart", LossChart).show(
            self.data.lineage_curves, x, title="lineage: training loss, branches continue their base")
        self._update_status()

    def _update_status(self) -> None:
        data = self.data
        parts = [f"{len(data.loaded.runs)} runs · x: {AXIS_NAME[self.x_axis]}"]
        if data.grew:
            parts.append("models grew mid-way: only FLOPs make them comparable" if self.x_axis == "flops"
                         else "models grew mid-way: steps undercount their cost (f: FLOPs)")
        if data.loaded.missing:
            parts.append(f"not found: {', '.join(data.loaded.missing)}")
        self.query_one("#compare-status", Static).update(" · ".join(parts))

    def action_x_axis(self, axis: str) -> None:
        self._axis_chosen = True
        self.x_axis = axis

    def action_next_axis(self) -> None:
        self.action_x_axis(AXIS_ORDER[(AXIS_ORDER.index(self.x_axis) + 1) % len(AXIS_ORDER)])

    # -- other actions ---------------------------------------------------------------------------
    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        # keys go to the shown part: the table's rows, the lineage tree (the chart takes none)
        focus = {"table": ComparisonTable, "lineage": LineageView}.get(event.pane.id or "")
        if focus is not None:
            self.query_one(focus).focus()

    def action_reload(self) -> None:
        self.query_one("#compare-status", Static).update(f"reading {len(self.run_ids)} run(s)…")
        self.load()

    def action_back(self) -> None:
        self.dismiss()
