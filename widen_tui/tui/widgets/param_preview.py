"""The live parameter preview: per stage (and per operator) parameters added, trainable, share.

Figures come from ``engine.grow.preview`` (the plan's operators run on a model without storage, in
the preview helper process); the builder hands a fresh ``PlanPreview`` after every check. "?"
marks what the preview could not count; the operator's row says why.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from engine.grow.preview import PlanPreview
from widen_tui.views.preview_rows import COLUMNS, preview_rows


class ParamPreview(DataTable):
    """Rows: the base model, then each stage with its operators beneath it."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for label, key in COLUMNS:
            self.add_column(label, key=key)

    def show(self, preview: PlanPreview | None) -> None:
        self.clear()
        if preview is None:
            return
        if preview.base_total is None:
            self.add_row(Text(f"no preview: {preview.error}"), "", "", "", "", "")
            return
        for row in preview_rows(preview):
            what, variant, *rest = row.cells
            self.add_row(Text(what, style="bold" if row.kind == "stage" else ""),
                         Text(variant) if row.kind == "stage" else variant, *rest, key=row.key)
