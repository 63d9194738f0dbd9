"""The parameter preview as rows of text: the builder's table (widgets/param_preview.py) and
`widen plan show --meta` print the same figures from one ``engine.grow.preview.PlanPreview``.

"?" marks what the preview could not count; the operator's row says why."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rich.table import Table

from engine.grow.preview import PlanPreview, StagePreview

COLUMNS = (("stage / op", "what"), ("variant", "variant"), ("added", "added"), ("trainable", "trainable"),
           ("share", "share"), ("total", "total"))


def count(n: int | None, signed: bool = False) -> str:
    if n is None:
        return "?"
    return f"{n:+,}" if signed else f"{n:,}"


def percent(share: float | None) -> str:
    return "?" if share is None else f"{share:.2%}"


def added(stage: StagePreview) -> str:
    """The stage's added parameters; `+?` marks operators left out (invalid settings)."""
    return count(stage.added, signed=True) + (" +?" if stage.uncounted else "")


def stage_line(stage: StagePreview) -> str:
    """One line for the status bar."""
    trainable = f"trainable ? ({stage.note})" if stage.trainable is None else \
        f"trainable {count(stage.trainable)} ({percent(stage.share)})"
    missing = f" · {stage.uncounted} op{'s' * (stage.uncounted > 1)} not counted" if stage.uncounted else ""
    return (f"{stage.label}{f' [{stage.variant}]' if stage.variant else ''}: {added(stage)}"
            f" → {count(stage.total_after)} params · {trainable}{missing}")


@dataclass(frozen=True)
class PreviewRow:
    key: str           # "base", a stage's path or an operator's path
    kind: str          # "base" | "stage" | "op"
    cells: tuple[str, str, str, str, str, str]   # in COLUMNS order


def preview_rows(preview: PlanPreview) -> Iterator[PreviewRow]:
    """The base model, then each stage with its operators beneath it (nothing when the preview
    failed: `preview.error` says why)."""
    if preview.base_total is None:
        return
    yield PreviewRow("base", "base", ("base model", "", "", "", "", count(preview.base_total)))
    for stage in preview.stages:
        yield PreviewRow(stage.path, "stage", (stage.label, stage.variant or "shared", added(stage),
                                              count(stage.trainable), percent(stage.share),
                                              count(stage.total_after)))
        for op in stage.ops:
            depth = ", ".join(f"{k + ' ' if k else ''}{v}" for k, v in op.depth.items())
            what = f"  {op.op} (depth {depth})" + (f" — {op.note}" if op.note else "")
            yield PreviewRow(op.path, "op", (what, "", count(op.added, signed=True), "", "", ""))


def preview_table(preview: PlanPreview) -> Table:
    """The rows as one Rich table (`widen plan show --meta`): stages in bold, operators beneath."""
    table = Table(header_style="bold")
    for label, _ in COLUMNS:
        table.add_column(label, justify="left" if label in ("stage / op", "variant") else "right")
    for row in preview_rows(preview):
        table.add_row(*row.cells, style="bold" if row.kind == "stage" else None)
    return table
