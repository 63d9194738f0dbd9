"""ExpertsHeat: a mixture of experts' routing in the run monitor's Experts tab.

A caption (when and over how many steps, top-k of E, the routers' losses), then one table row
per sparse block: the heat strip of each expert's load (one cell per expert: height and colour
say its share against a balanced 1/E, ✕ marks a dead expert), the least and most loaded shares,
the dead experts, the router's entropy. The rows come from ``widen_tui.views.experts`` (the
screen calls ``show`` as the run's ``RunUpdate`` messages bring new windows); the line under the
table gives the highlighted block's shares as numbers.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from widen_tui.views.experts import LEGEND, ExpertsRow, ExpertsView, dead_text

WAITING = "no routing window yet: the first one comes with the first logged step of a mixture of experts"
DETAIL_SHARES = 16   # the detail line lists this many experts' shares, then the count of the rest


class ExpertsHeat(Vertical):
    """The latest routing window; ``show(view)`` replaces it (None: nothing yet)."""

    DEFAULT_CSS = """
    ExpertsHeat { height: 1fr; }
    ExpertsHeat > #experts-caption { height: auto; padding: 0 1; }
    ExpertsHeat > DataTable { height: auto; max-height: 1fr; }
    ExpertsHeat > .experts-note { height: auto; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.view: ExpertsView | None = None

    def compose(self) -> ComposeResult:
        yield Static(WAITING, id="experts-caption", markup=False)
        yield DataTable(id="experts-table", zebra_stripes=True, cursor_type="row")
        yield Static("", id="experts-detail", classes="experts-note", markup=False)
        yield Static(LEGEND, classes="experts-note", markup=False)

    def show(self, view: ExpertsView | None) -> None:
        self.view = view
        table = self.query_one(DataTable)
        table.clear(columns=True)
        caption = self.query_one("#experts-caption", Static)
        if view is None:
            caption.update(WAITING)
            return
        caption.update(view.caption())
        for name in ("layer", "load per expert", "min–max", "dead", "entropy (nats)"):
            table.add_column(name, key=name)
        for row in view.rows:
            table.add_row(str(row.layer), row.strip(), row.spread(), dead_text(row), row.entropy_text(),
                          key=str(row.layer))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if self.view is None or event.row_key is None:
            return
        row = next((r for r in self.view.rows if str(r.layer) == event.row_key.value), None)
        if row is None:
            return
        self.query_one("#experts-detail", Static).update(detail(row))


def detail(row: ExpertsRow) -> str:
    """The highlighted block's shares as numbers: "layer 3 · 120 tokens · e0 12.5% e1 3.1% …"."""
    shares = " ".join(f"e{e} {100 * share:.1f}%" for e, share in enumerate(row.load[:DETAIL_SHARES]))
    more = f" … {row.experts - DETAIL_SHARES} more" if row.experts > DETAIL_SHARES else ""
    tokens = f" · {row.tokens:,} tokens" if row.tokens is not None else ""
    return f"layer {row.layer}{tokens} · {shares}{more}"
