"""The runs table: one row per run, updated in place, with marks for multi-select.

``show(rows)`` is called with the full wanted list every refresh; it changes only what changed
(a cell whose text differs, rows that appeared or went), so a table of hundreds of runs costs
next to nothing when nothing happened. `space` marks the run under the cursor (posting
``MarksChanged``); `enter` selects it (DataTable's ``RowSelected``, which the screen turns into
"open its monitor").
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable

from widen_tui.tui.widgets.run_rows import RunRow
from widen_tui.views.report import ALERT_STATES, STATE_STYLE

MARK = "●"


class RunsTable(DataTable):
    """A row-cursor DataTable keyed by run id."""

    # (key, header) of the columns a RunRow's cells fill, after the mark and state columns.
    # The most telling first: at 80 columns variant and plan are a scroll to the right. The seed
    # tells apart the runs of one variant (their names are clipped alike).
    DATA_COLUMNS = (("name", "name"), ("seed", "seed"), ("stage", "stage"), ("step", "step"), ("age", "age"),
                    ("ppl", "ppl (final/latest)"), ("share", "train%"), ("variant", "variant"), ("plan", "plan"))

    BINDINGS = [
        Binding("enter", "select_cursor", "Open"),
        Binding("space", "toggle_mark", "Mark"),
    ]

    class MarksChanged(Message):
        """The set of marked runs changed."""

        def __init__(self, marked: frozenset[str]):
            super().__init__()
            self.marked = marked

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.marked: set[str] = set()
        self._shown: dict[str, RunRow] = {}  # in display order

    def on_mount(self) -> None:
        self.add_column(" ", key="mark", width=1)
        self.add_column("state", key="state")
        for key, label in self.DATA_COLUMNS:
            self.add_column(label, key=key)

    async def _on_idle(self, event) -> None:
        # DataTable measures new rows' widths when idle, but keys its rendered lines on content, not
        # on column widths: a row drawn before the widths grew stayed cut ("runni") until its next
        # change. Redraw everything when the widths moved.
        widths = [column.content_width for column in self.ordered_columns]
        await super()._on_idle(event)
        if widths != [column.content_width for column in self.ordered_columns]:
            self._clear_caches()
            self.refresh()

    # -- contents --------------------------------------------------------------------------------

    @property
    def shown_ids(self) -> list[str]:
        return list(self._shown)

    @property
    def cursor_run_id(self) -> str | None:
        if not self._shown or not 0 <= self.cursor_row < self.row_count:
            return None
        return self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value

    def show(self, rows: list[RunRow]) -> None:
        """Make the table show `rows`, in order, touching only what differs."""
        wanted = {row.id: row for row in rows}
        for run_id in [i for i in self._shown if i not in wanted]:
            self.remove_row(run_id)
            del self._shown[run_id]
        kept = list(self._shown)
        added = [row.id for row in rows if row.id not in self._shown]
        if [row.id for row in rows] != kept + added:  # new rows in the middle (a filter widened): redo
            self._rebuild(rows)
            return
        for run_id in kept:
            self._update(self._shown[run_id], wanted[run_id])
            self._shown[run_id] = wanted[run_id]
        for run_id in added:
            self._add(wanted[run_id])

    def _rebuild(self, rows: list[RunRow]) -> None:
        cursor = self.cursor_run_id
        self.clear()
        self._shown.clear()
        for row in rows:
            self._add(row)
        if cursor in self._shown:
            self.move_cursor(row=self.get_row_index(cursor), animate=False)

    def _add(self, row: RunRow) -> None:
        self.add_row(self._mark_cell(row.id), _state_cell(row.state), *row.cells, key=row.id)
        self._shown[row.id] = row

    def _update(self, old: RunRow, new: RunRow) -> None:
        if old.state != new.state:
            self.update_cell(new.id, "state", _state_cell(new.state))
        for (key, _), before, after in zip(self.DATA_COLUMNS, old.cells, new.cells):
            if before != after:
                self.update_cell(new.id, key, after)

    # -- marks -----------------------------------------------------------------------------------

    def _mark_cell(self, run_id: str) -> Text:
        return Text(MARK if run_id in self.marked else " ", style="bold")

    def action_toggle_mark(self) -> None:
        run_id = self.cursor_run_id
        if run_id is None:
            return
        self.marked.symmetric_difference_update({run_id})
        self.update_cell(run_id, "mark", self._mark_cell(run_id))
        self.move_cursor(row=self.cursor_row + 1)
        self.post_message(self.MarksChanged(frozenset(self.marked)))

    def unmark(self, run_ids) -> None:
        """Forget marks (of deleted runs, or after an action used them)."""
        changed = self.marked & set(run_ids)
        self.marked -= changed
        for run_id in changed & set(self._shown):
            self.update_cell(run_id, "mark", self._mark_cell(run_id))
        if changed:
            self.post_message(self.MarksChanged(frozenset(self.marked)))


def _state_cell(state: str) -> Text:
    # Named ANSI colours plus bold for the states that need attention: readable in 16 colours.
    style = STATE_STYLE.get(state, "")
    if state in ALERT_STATES:
        style += " bold"
    return Text(state, style=style)
