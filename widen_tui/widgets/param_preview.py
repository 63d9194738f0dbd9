"""The live parameter preview: per stage (and per operator) parameters added, trainable, share.

Figures come from ``engine.ops.preview`` (the plan's operators run on a model without storage, in
the preview helper process); the builder hands a fresh ``PlanPreview`` after every check. "?"
marks what the preview could not count; the operator's row says why.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from engine.ops.preview import PlanPreview, StagePreview


def count(n: int | None, signed: bool = False) -> str:
    if n is None:
        return "?"
    return f"{n:+,}" if signed else f"{n:,}"


def percent(share: float | None) -> str:
    return "?" if share is None else f"{share:.2%}"


def stage_line(stage: StagePreview) -> str:
    """One line for the status bar."""
    trainable = f"trainable ? ({stage.note})" if stage.trainable is None else \
        f"trainable {count(stage.trainable)} ({percent(stage.share)})"
    missing = f" · {stage.uncounted} op{'s' * (stage.uncounted > 1)} not counted" if stage.uncounted else ""
    return (f"{stage.label}{f' [{stage.variant}]' if stage.variant else ''}: {added(stage)}"
            f" → {count(stage.total_after)} params · {trainable}{missing}")


def added(stage: StagePreview) -> str:
    """The stage's added parameters; `+?` marks operators left out (invalid settings)."""
    return count(stage.added, signed=True) + (" +?" if stage.uncounted else "")


class ParamPreview(DataTable):
    """Rows: the base model, then each stage with its operators beneath it."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for label, key in (("stage / op", "what"), ("variant", "variant"), ("added", "added"),
                           ("trainable", "trainable"), ("share", "share"), ("total", "total")):
            self.add_column(label, key=key)

    def show(self, preview: PlanPreview | None) -> None:
        self.clear()
        if preview is None:
            return
        if preview.base_total is None:
            self.add_row(Text(f"no preview: {preview.error}"), "", "", "", "", "")
            return
        self.add_row("base model", "", "", "", "", count(preview.base_total), key="base")
        for stage in preview.stages:
            self.add_row(Text(stage.label, style="bold"), Text(stage.variant or "shared"), added(stage),
                         count(stage.trainable), percent(stage.share),
                         count(stage.total_after), key=stage.path)
            for op in stage.ops:
                depth = ", ".join(f"{k + ' ' if k else ''}{v}" for k, v in op.depth.items())
                what = f"  {op.op} (depth {depth})" + (f" — {op.note}" if op.note else "")
                self.add_row(Text(what), "", count(op.added, signed=True), "", "", "", key=op.path)
