"""The experts panel's view-model: a mixture of experts' routing, from the latest `experts`
event (``engine.runs.records.ExpertsEvent``, folded by ``engine.runs.progress.RunProgress``).

One row per sparse block: each expert's share of the routed tokens as a heat strip (one cell per
expert), the experts that got no token (dead, ✕), and the router's entropy against its maximum
ln E. A cell's height and colour both say its load against a balanced share 1/E, so the strip
reads without colour too. The TUI monitor's Experts tab (``widgets.experts_heat``) and `widen
show`'s table (``experts_table``) draw the same rows. No Textual here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from engine.runs.records import ExpertsEvent

DEAD = ("✕", "bold red")
# load against a balanced share (share · E) -> cell: (upper bound, glyph, 16-colour style)
LEVELS = ((0.5, "▁", "blue"), (0.8, "▃", "cyan"), (1.25, "▅", "green"), (2.0, "▇", "yellow"),
          (math.inf, "█", "red"))
LEGEND = ("load vs a balanced share 1/E: ▁ <½  ▃ <0.8×  ▅ ≈1×  ▇ ≤2×  █ >2×  ✕ no token (dead) · "
          "entropy: the router's, in nats, of its maximum ln E")


@dataclass(frozen=True)
class ExpertsRow:
    """One sparse block."""

    layer: int
    load: tuple[float, ...]        # each expert's share of the routed (token, slot) pairs
    dead: tuple[int, ...]
    entropy: float | None          # nats
    tokens: int | None

    @property
    def experts(self) -> int:
        return len(self.load)

    @property
    def max_entropy(self) -> float:
        return math.log(self.experts) if self.experts > 1 else 0.0

    @property
    def entropy_share(self) -> float | None:
        """The entropy as a share of its maximum (1: the router spreads evenly over every expert)."""
        if self.entropy is None or not self.max_entropy:
            return None
        return self.entropy / self.max_entropy

    def strip(self) -> Text:
        """The heat strip: one cell per expert."""
        text = Text(no_wrap=False)
        for expert, share in enumerate(self.load):
            glyph, style = DEAD if expert in self.dead else cell(share * self.experts)
            text.append(glyph, style=style)
        return text

    def spread(self) -> str:
        """The least and most loaded experts' shares: "3.1%–41.7%"."""
        return f"{100 * min(self.load):.1f}%–{100 * max(self.load):.1f}%"

    def entropy_text(self) -> str:
        if self.entropy is None:
            return "–"
        share = self.entropy_share
        return f"{self.entropy:.3f}" + (f" ({100 * share:.0f}%)" if share is not None else "")


@dataclass(frozen=True)
class ExpertsView:
    """The latest window: where it ends, what it covers, its rows."""

    stage: int
    step: int
    steps: int
    top_k: int
    aux_loss: float | None
    aux_coef: float | None
    z_loss: float | None
    z_coef: float | None
    rows: tuple[ExpertsRow, ...]

    @property
    def experts(self) -> int:
        return max((r.experts for r in self.rows), default=0)

    @property
    def dead(self) -> int:
        return sum(len(r.dead) for r in self.rows)

    def caption(self) -> str:
        """One line: when, over how many steps, top-k of E, the routers' losses and their weights."""
        losses = [f"load-balancing loss {_num(self.aux_loss)} (weight {_num(self.aux_coef)})"]
        if self.z_loss is not None:
            losses.append(f"z-loss {_num(self.z_loss)} (weight {_num(self.z_coef)})")
        return (f"routing at stage {self.stage + 1} step {self.step}, over the last {self.steps} step"
                f"{'s' if self.steps != 1 else ''} · top {self.top_k} of {self.experts} experts · "
                f"{' · '.join(losses)} · {self.dead} dead")


def experts_view(event: ExpertsEvent | None) -> ExpertsView | None:
    """The view of an `experts` event; None without one (a dense model, or no log step yet)."""
    if event is None:
        return None
    rows = tuple(ExpertsRow(r.layer, tuple(float(x) for x in r.load), tuple(r.dead), r.entropy, r.tokens)
                 for r in sorted(event.layers, key=lambda r: r.layer))
    return ExpertsView(event.stage, event.step, event.steps, event.top_k, event.aux_loss, event.aux_coef,
                       event.z_loss, event.z_coef, rows)


def cell(ratio: float) -> tuple[str, str]:
    """(glyph, style) of an expert whose load is `ratio` times a balanced share."""
    return next(((glyph, style) for bound, glyph, style in LEVELS if ratio < bound), LEVELS[-1][1:])


def experts_table(view: ExpertsView) -> Group:
    """`widen show`'s table of the latest window: its caption, a row per sparse block, the legend
    (the caption and legend as lines of their own: the table is narrower than they are)."""
    table = Table(header_style="bold")
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("load per expert")
    table.add_column("min–max share", justify="right", no_wrap=True)
    table.add_column("dead", no_wrap=True)
    table.add_column("entropy (nats)", justify="right", no_wrap=True)
    for row in view.rows:
        table.add_row(str(row.layer), row.strip(), row.spread(), dead_text(row), row.entropy_text())
    return Group(Text(view.caption()), table, Text(LEGEND, style="dim"))


def dead_text(row: ExpertsRow) -> Text:
    if not row.dead:
        return Text("none", style="dim")
    shown = ", ".join(map(str, row.dead[:8])) + (f" … +{len(row.dead) - 8}" if len(row.dead) > 8 else "")
    return Text(shown, style="red")


def _num(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}"
