"""ComparisonTable: the figures of `widen compare` for the selected runs, as navigable tables.

The figures are `engine.runs.compare.compare_runs`' (formatted like the CLI's `comparison_view`):
one row per variant — mean ± std when seeds repeat — with per-task perplexity and forgetting,
ACC, BWT, parameters (total, added, trainable, share), time, tokens/s and peak memory; then,
when a model grew mid-way, each run's training loss at equal FLOPs and equal tokens; then the
compute each variant needed to reach the loss every seed of the baseline (a run that did not grow,
else the first) reaches (`widen compare --target-loss auto`), and how many seeds reached the best
baseline seed's final loss when that is stricter; then the health of new units. Each part is a
DataTable whose first column stays put while the others scroll sideways, so the table stays usable
at 80 columns.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from widen_tui.views.report import _ms, fmt_num


@dataclass
class Section:
    key: str            # "figures" | "compute" | "target" | "strict" | "health"
    title: str
    columns: list[str]
    rows: list[list[str]]


def comparison_sections(data: dict) -> list[Section]:
    """The tables to show for `compare_runs` output `data` (empty parts left out)."""
    tasks = data["tasks"]
    over = " · mean ± std over seeds" if data.get("seeded") else ""
    gpu = any(g.get("torch_peak_mb") for g in data["groups"])  # torch's own peak, when runs had a GPU
    columns = (["variant", "seeds"] + [f"ppl {t}" for t in tasks] + [f"forget {t}" for t in tasks]
               + ["ACC", "BWT", "params", "added", "trainable", "share", "time", "tokens/s", "peak RSS MB"]
               + (["GPU peak MB"] if gpu else []))
    rows = []
    for g in data["groups"]:
        share = g.get("trainable_share")
        rows.append([str(g["variant"] or g["plan"]), ",".join(str(s) for s in g["seeds"]),
                     *[_ms(g["final_ppl"].get(t), 2) for t in tasks],
                     *[_ms(g["forgetting"].get(t), 4) for t in tasks],
                     _ms(g["acc"], 4), _ms(g["bwt"], 4), _ms(g["params"], 0), _ms(g["params_added"], 0),
                     _ms(g["trainable"], 0), _ms(share, 2, 100) + "%" if share else "–",
                     _ms(g["wall_s"], 1) + "s" if g["wall_s"] else "–", _ms(g["tokens_per_s"], 0),
                     _ms(g["peak_rss_mb"], 0), *([_ms(g["torch_peak_mb"], 0)] if gpu else [])])
    sections = [Section("figures", f"per variant{over} · forgetting in bits/byte, "
                                   f"{data['forgetting_definition']} · {data['sign_convention']}", columns, rows)]

    runs = data["runs"]
    if any(r.get("growths") for r in runs) and len(runs) > 1:  # grown models compare by compute
        first = runs[0]
        sections.append(Section(
            "compute", f"training loss at equal compute ({_sci(first.get('equal_flops_budget'))} FLOPs) and "
                       f"equal tokens ({fmt_num(first.get('equal_tokens_budget'))}): grown models are "
                       "comparable only by what they cost",
            ["run", "seed", "growths", "loss @ FLOPs", "loss @ tokens", "total FLOPs", "final params"],
            [[str(r.get("variant") or r.get("name")), str(r.get("seed")), str(r.get("growths") or 0),
              fmt_num(r.get("loss_at_equal_flops"), 4), fmt_num(r.get("loss_at_equal_tokens"), 4),
              _sci(r.get("flops")), fmt_num(r.get("params"))] for r in runs]))

    target = data.get("target")  # compute to target (auto), see engine.runs.compare_data.comparison
    if isinstance(target, str):
        sections.append(Section("target", f"compute to target: {target}", [], []))
    elif target is not None:
        from engine.runs import compute_to_target as ctt

        sections.append(Section("target", ctt.title(target), *ctt.group_rows(target)))
        strict = ctt.strict_rows(target)  # None when the strictest target is the target (the title says so)
        if strict is not None:
            sections.append(Section("strict", ctt.strict_title(target), *strict))

    health = [(r, u) for r in runs for u in r.get("new_units") or []]
    if health:
        sections.append(Section(
            "health", "health of new units (at expansion → after training): dead = zero gradient; "
                      "cosine 1 = identical units or collapsed twins",
            ["run", "op", "init", "max|Δlogits|", "new grad", "dead", "pair cos", "pair cos after",
             "twin cos after"],
            [[str(r.get("variant") or r.get("name")), str(u["op"]), str(u.get("init") or "–"),
              f"{u['max_abs_logit_delta']:.1e}" if u.get("max_abs_logit_delta") is not None else "–",
              fmt_num(u.get("new_grad_norm")), fmt_num(u.get("dead_share")), fmt_num(u.get("max_pairwise_cosine")),
              fmt_num(u.get("max_pairwise_cosine_after")), fmt_num(u.get("max_twin_cosine_after"))]
             for r, u in health]))
    return sections


def _sci(value) -> str:
    return "–" if value is None else f"{float(value):.2e}"


class ComparisonTable(VerticalScroll):
    """The comparison of the selected runs; `show(data)` fills it from `compare_runs` output."""

    DEFAULT_CSS = """
    ComparisonTable { height: 1fr; }
    ComparisonTable > .section-title { color: $text-muted; padding: 1 0 0 0; }
    ComparisonTable > DataTable { height: auto; max-height: 16; }
    ComparisonTable > #not-done { color: $warning; padding: 1 0 0 0; }
    """

    def compose(self) -> ComposeResult:
        yield Static("reading the runs…", id="comparison-empty", classes="muted")

    def focus(self, scroll_visible: bool = True):
        """Focusing the comparison focuses its first table (arrows move through the rows)."""
        tables = self.query(DataTable)
        if tables:
            tables.first().focus(scroll_visible)
        return self

    async def show(self, data: dict) -> None:
        """Replace the tables with `data`'s (the output of `compare_runs`)."""
        await self.remove_children()
        widgets = []
        for section in comparison_sections(data):
            if not section.columns:  # a section that is only its title (why it has no table)
                widgets.append(Static(section.title, classes="section-title", markup=False))
                continue
            table = DataTable(id=f"table-{section.key}", fixed_columns=1, zebra_stripes=True, cursor_type="row")
            table.add_columns(*section.columns)
            for row in section.rows:
                table.add_row(*row)
            widgets += [Static(section.title, classes="section-title", markup=False), table]
        not_done = [r["id"] for r in data["runs"] if r.get("state") != "done"]
        if not_done:
            widgets.append(Static(f"not done (figures partial or missing): {', '.join(not_done)}", id="not-done",
                                  markup=False))
        await self.mount_all(widgets)
