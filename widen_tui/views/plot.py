"""PNG figures for people: loss curves, the forgetting matrix, the mapping-sweep heatmap.

Pure functions: parsed events / results in, a PNG path out. matplotlib is imported inside the
functions (a bare ``Figure`` rendered by the Agg canvas: no pyplot, no GUI backend, no global
state), so importing this module costs nothing and ``widen --help`` stays fast. No torch here.

- ``loss_figure``: training loss and eval loss per task against global step, tokens seen or
  training FLOPs; dashed lines at stage boundaries; markers at expansions (a star where a stage
  applies its operators, a triangle where a trigger (plateau, at, budget) grew it mid-stage). Several runs
  overlay, one colour per run.
- ``forgetting_figure``: bits per byte (or loss) per task after each stage, annotated.
- ``mapping_figure``: rows = layer mappings best first (with their family label), cells = source
  layer, seams marked, perplexity at right; readable at 30+ layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.errors import WidenError

# The events -> curves model lives in engine.runs.curves (shared with the TUI).
from engine.runs.curves import X_AXES, _num, curves_from_events, human
from engine.runs.forgetting import matrix_for
from engine.runs.records import EvalEvent, EventRecord, StepEvent

MAX_MAPPING_ROWS = 40
LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75}

Warn = Callable[[str], None]


class PlotError(WidenError, ValueError):
    """Input that cannot be drawn (a wrong shape, nothing to show); one line for the user."""


# ---------------------------------------------------------------------------------------------
# figure helpers


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, out: Path | str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", facecolor="white")
    return out


# ---------------------------------------------------------------------------------------------
# 1. loss curves

EVAL_STYLES = [("--", "o"), (":", "s"), ("-.", "v"), ((0, (5, 1, 1, 1)), "P"), ((0, (1, 2)), "X"),
               ((0, (8, 3)), "h")]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_figure(runs: Sequence[tuple[str, Sequence[EventRecord]]], out: Path | str, x: str = "steps",
                warn: Warn | None = None, target=None) -> Path:
    """Training loss and eval loss per task of each run against `x` (steps | tokens | flops).

    `runs` is a list of (legend label, that run's events). Runs whose step events lack the x
    quantity (older runs) make the whole figure fall back to global steps, with a warning.
    `target`: a ``engine.runs.compute_to_target.TargetReport`` over the same runs, in the same
    order: its loss as a horizontal line, a diamond where each run's held-out loss crossed it."""
    if x not in X_AXES:
        raise PlotError(f"--x must be one of {', '.join(X_AXES)}, not {x!r}")
    curves = [curves_from_events(label, events) for label, events in runs]
    curves = [c for c in curves if c.steps or c.evals]
    if not curves:
        raise PlotError("no step or eval events to plot")
    if x != "steps":
        lacking = [c.label for c in curves if not c.has(x)]
        if lacking:
            if warn:
                warn(f"{', '.join(lacking)}: events carry no '{x}' (an older run) — "
                     f"plotting against global step instead")
            x = "steps"

    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    fig = _figure(12, 6.2)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(curves))]
    tasks = list(dict.fromkeys(p.event.task for c in curves for p in c.evals))
    style = {t: EVAL_STYLES[i % len(EVAL_STYLES)] for i, t in enumerate(tasks)}
    ys: list[float] = []

    for c, colour in zip(curves, colours):
        # training loss, one segment per stage so a task switch is never smoothed over
        for stage in sorted({e.stage for e in c.steps}):
            seg = [e for e in c.steps if e.stage == stage]
            xs = [float(e.global_step if x == "steps" else getattr(e, x)) for e in seg]
            loss = [float(e.loss) for e in seg]
            ys += loss
            if len(c.steps) > 60 and len(seg) > 5:
                ax.plot(xs, loss, color=colour, lw=0.8, alpha=0.25)
                ax.plot(xs, _smooth(loss, max(2, min(50, len(seg) // 20))), color=colour, lw=1.8)
            else:
                ax.plot(xs, loss, color=colour, lw=1.6)
        # eval loss per task
        for task in tasks:
            pts = [(c.x_of(p, x), float(p.event.loss)) for p in c.evals if p.event.task == task]
            if pts:
                ls, marker = style[task]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, ls=ls, marker=marker,
                        ms=4.5, lw=1.3, alpha=0.9)
                ys += [p[1] for p in pts]

    if target is not None:
        ys.append(target.target)  # the target line stays in view
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = 0.06 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + 3.5 * pad  # room at the top for the stage labels
    ax.set_ylim(lo, hi)

    def clip(y: float) -> float:
        return min(max(y, lo + pad / 2), hi - pad / 2)

    # stage boundaries: one grey line where every run agrees, else one per run in its colour
    boundaries: dict[tuple[float, str], list[int]] = {}
    for i, c in enumerate(curves):
        for stage, name in sorted(c.stage_names.items()):
            boundaries.setdefault((round(c.stage_x(stage, x), 6), name), []).append(i)
    trans = ax.get_xaxis_transform()
    for (bx, name), owners in sorted(boundaries.items()):
        colour = "0.45" if len(owners) == len(curves) else colours[owners[0]]
        ax.axvline(bx, color=colour, ls=(0, (4, 3)), lw=1.0, alpha=0.8, zorder=0)
        ax.annotate(name, (bx, 1.0), xycoords=trans, xytext=(3, -4), textcoords="offset points", rotation=90,
                    va="top", ha="left", fontsize=8, color=colour)

    # expansions: a star where a stage applied its operators, a triangle for a growth mid-stage
    for k, (c, colour) in enumerate(zip(curves, colours)):
        for stage in sorted({e.stage for e in c.expansions}):
            ops = [e for e in c.expansions if e.stage == stage]
            g = c.offset(stage)
            after = [e.loss_after for e in ops if _num(e.loss_after)]
            y = after[-1] if after else c.train_loss_at(g)
            if y is None:
                continue
            added = sum(e.params_added or 0 for e in ops)
            px = c.stage_x(stage, x)
            ax.plot([px], [clip(y)], marker="*", ms=15, color=colour, mec="black", mew=0.7, ls="none", zorder=5)
            names = ", ".join(dict.fromkeys(e.op for e in ops))
            ax.annotate(f"+{human(added)} params\n{names}", (px, clip(y)), xytext=(8, 4 + 22 * k),
                        textcoords="offset points", fontsize=7.5, color=colour, zorder=6, bbox=LABEL_BOX)
        grouped: dict[tuple, list] = {}  # one marker per growth: its operators' events together
        for placed in c.growths:
            grouped.setdefault((placed.event.stage, placed.event.growth, placed.g), []).append(placed)
        for (_, growth, g), ops in grouped.items():
            px = c.x_of(ops[-1], x)
            last = ops[-1].event.loss_after
            y = last if _num(last) else c.train_loss_at(g)
            if y is None:
                continue
            ax.plot([px], [clip(y)], marker="^", ms=11, color=colour, mec="black", mew=0.7, ls="none", zorder=5)
            tag = f" (growth {growth})" if growth is not None else ""
            added = sum(p.event.params_added or 0 for p in ops)
            ax.annotate(f"+{human(added)} params{tag}", (px, clip(y)), xytext=(6, -13 - 11 * k),
                        textcoords="offset points", fontsize=7.5, color=colour, zorder=6, bbox=LABEL_BOX)

    if target is not None:
        _draw_target(ax, target, curves, colours, x)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (nats per token) — lower is better")
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    elif x == "flops":
        ax.xaxis.set_major_formatter(EngFormatter(unit="FLOP", sep=" "))
    ax.grid(True, alpha=0.25)
    ax.margins(x=0.02)
    title = "training loss and held-out eval loss per task"
    ax.set_title(f"{title} vs {X_AXES[x]}" + (f" — {curves[0].label}" if len(curves) == 1 else ""),
                 loc="left", fontsize=11)

    kinds = [Line2D([], [], color="0.2", lw=1.6, label="training loss")]
    kinds += [Line2D([], [], color="0.2", ls=style[t][0], marker=style[t][1], ms=4.5, lw=1.3,
                     label=f"eval: {t}") for t in tasks]
    if any(c.expansions for c in curves):
        kinds.append(Line2D([], [], color="0.6", marker="*", ms=12, mec="black", ls="none",
                            label="expansion (stage start)"))
    triggers = sorted({str(p.event.trigger) for c in curves for p in c.growths})
    if triggers:
        kinds.append(Line2D([], [], color="0.6", marker="^", ms=9, mec="black", ls="none",
                            label=f"growth ({', '.join(triggers)} trigger)"))
    kinds.append(Line2D([], [], color="0.45", ls=(0, (4, 3)), lw=1.0, label="stage boundary"))
    if target is not None:
        kinds.append(Line2D([], [], color="crimson", ls=(0, (1, 1.5)), lw=1.4, marker="D", ms=6, mec="black",
                            label=f"target {target.target:.3f} on {target.task}: where each run first reached it"))
    if len(curves) > 1:
        run_handles = [Line2D([], [], color=col, lw=3, label=c.label) for c, col in zip(curves, colours)]
        first = ax.legend(handles=run_handles, title="runs", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                          fontsize=8.5, title_fontsize=9, frameon=False)
        ax.add_artist(first)
        ax.legend(handles=kinds, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8.5, frameon=False)
    else:
        ax.legend(handles=kinds, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    return _save(fig, out)


def _draw_target(ax, target, curves, colours, x: str) -> None:
    """The target loss across the figure and each run's crossing of it ("not reached" in the
    legend's words when it never got there). Crossings sit at their global step mapped to `x`."""
    ax.axhline(target.target, color="crimson", ls=(0, (1, 1.5)), lw=1.4, zorder=4)
    by_label = {c.label: (c, colour) for c, colour in zip(curves, colours)}
    for run in target.runs:
        if run.label not in by_label or not run.crossing.reached:
            continue
        c, colour = by_label[run.label]
        px = run.crossing.global_step if x == "steps" else {"tokens": run.crossing.tokens,
                                                             "flops": run.crossing.flops}[x]
        if px is None:
            px = c.at(run.crossing.global_step, x)
        ax.plot([px], [target.target], marker="D", ms=8, color=colour, mec="black", mew=0.8, ls="none", zorder=7)
        ax.annotate(human(px) if x != "steps" else f"step {px:.0f}", (px, target.target), xytext=(4, -12),
                    textcoords="offset points", fontsize=7.5, color=colour, zorder=7, bbox=LABEL_BOX)


# ---------------------------------------------------------------------------------------------
# 2. forgetting matrix


def _cell(value) -> float:
    return float(value) if _num(value) else math.nan


def forgetting_figure(matrix: dict, out: Path | str, run: str = "", trained: Sequence[str | None] = ()) -> Path:
    """Heatmap of the evaluation matrix: rows = after each stage, columns = tasks; bits per byte
    (loss when bpb is missing). `trained[i]` is the task row i's stage trained (outlined)."""
    try:
        rows, tasks = list(matrix["rows"]), list(matrix["tasks"])
    except (KeyError, TypeError):
        raise PlotError("results.json 'matrix' lacks rows/tasks") from None
    metric = next((m for m in ("bpb", "loss") if matrix.get(m) and any(_num(v) for r in matrix[m] for v in r)),
                  None)
    if metric is None or not rows or not tasks:
        raise PlotError("results.json 'matrix' has no bits-per-byte or loss values")
    values = [[_cell(v) for v in r] for r in matrix[metric]]
    if len(values) != len(rows) or any(len(r) != len(tasks) for r in values):
        raise PlotError(f"results.json 'matrix' {metric} is not {len(rows)}×{len(tasks)}")

    import numpy as np

    data = np.array(values, dtype=float)
    # Colour: how far each value lies above its task's best (lowest) value, so a few percent of
    # forgetting shows whatever the task's scale. The scale ends at the largest excess of the trained
    # rows: an untrained initial row (a random base model) would otherwise wash out every difference.
    best = np.nanmin(np.where(np.isfinite(data), data, np.nan), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.where(np.isfinite(data) & (best > 0), data / best - 1.0, np.nan)
    later = excess[1:] if len(rows) > 1 and str(rows[0]).lower().startswith("initial") else excess
    top = float(np.nanmax(later)) if np.isfinite(later).any() else 0.0
    top = max(top, 0.02)

    name = {"bpb": "bits per byte", "loss": "loss (nats per token)"}[metric]
    fig = _figure(max(6.0, 1.6 * len(tasks) + 3.6), max(2.8, 0.55 * len(rows) + 2.2))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(100 * excess), cmap="YlOrRd", vmin=0, vmax=100 * top, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(tasks)):
            v = data[i, j]
            text = "–" if not np.isfinite(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:,.1f}"
            dark = np.isfinite(excess[i, j]) and excess[i, j] > 0.6 * top
            ax.text(j, i, text, ha="center", va="center", fontsize=10, color="white" if dark else "black")
    trained = list(trained) + [None] * len(rows)
    from matplotlib.patches import Rectangle

    outlined = False
    for i in range(len(rows)):
        if trained[i] in tasks:
            j = tasks.index(trained[i])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="0.1", lw=2.2))
            outlined = True
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(rows)), rows)
    ax.xaxis.tick_top()
    ax.set_xlabel("evaluated on task (held-out text)" + ("; outlined: the task that stage trained"
                                                         if outlined else ""), fontsize=9)
    ax.set_ylabel("model after")
    ax.tick_params(length=0)
    ax.set_title(f"{name} per task after each stage — lower is better" + (f"\n{run}" if run else ""),
                 fontsize=11)
    bar = fig.colorbar(image, ax=ax, shrink=0.85, extend="max" if np.nanmax(excess) > top else "neither")
    bar.set_label("% above the task's best", fontsize=9)
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# 3. mapping sweep heatmap


def _ppl(row: dict):
    value = row.get("ppl", row.get("perplexity"))
    return float(value) if _num(value) else None


def sweep_rows(sweep) -> list[dict]:
    """The rows of a sweep result: {"rows": [...]} or a bare list of rows."""
    rows = sweep.get("rows") if isinstance(sweep, dict) else sweep
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise PlotError("a mapping sweep needs {\"rows\": [{\"mapping\": [...], \"ppl\": ...}, ...]}")
    if not rows:
        raise PlotError("the mapping sweep has no rows")
    return rows


def mapping_figure(sweep, out: Path | str, title: str = "", warn: Warn | None = None) -> Path:
    """Rows = mappings, best (lowest perplexity) first, labelled with their family (a `--family`
    sweep) and rank; cells coloured by the source layer each target layer runs, annotated with it
    while they are wide enough; white lines at seams (where the next target layer does not run
    the next source layer: a repeat or a jump); the perplexity at the right of each row; the
    reference (the unexpanded model: source layers in order) outlined. At 30+ layers the cells
    narrow, so the whole picture fits one figure."""
    rows = sweep_rows(sweep)
    rows = sorted(rows, key=lambda r: (_ppl(r) is None, _ppl(r) if _ppl(r) is not None else 0.0))
    if len(rows) > MAX_MAPPING_ROWS:
        keep = rows[:MAX_MAPPING_ROWS]
        keep += [r for r in rows[MAX_MAPPING_ROWS:] if r.get("reference")]
        if warn:
            warn(f"mapping sweep: showing the best {MAX_MAPPING_ROWS} of {len(rows)} mappings")
        rows = keep

    def mapping(r: dict) -> list[int]:
        m = r.get("mapping")
        return [int(v) for v in m] if isinstance(m, list) and all(isinstance(v, int) for v in m) else []

    depth = max((len(mapping(r)) for r in rows), default=0)
    if depth == 0:
        raise PlotError("no row of the mapping sweep has a mapping (a list of source layer indices)")
    sources = max(max(mapping(r), default=0) for r in rows) + 1
    if isinstance(sweep, dict):
        for key in ("source_layers", "num_source_layers", "source_depth"):
            if isinstance(sweep.get(key), int):
                sources = max(sources, sweep[key])

    def shown(r: dict) -> list[int]:  # the reference row runs the source layers in order
        return mapping(r) or (list(range(min(sources, depth))) if r.get("reference") else [])

    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Rectangle

    grid = np.full((len(rows), depth), np.nan)
    for i, r in enumerate(rows):
        m = shown(r)
        grid[i, :len(m)] = m
    base = __import__("matplotlib").colormaps["viridis"]
    cmap = ListedColormap([base(0.1 + 0.8 * k / max(1, sources - 1)) for k in range(sources)])
    norm = BoundaryNorm(np.arange(-0.5, sources + 0.5), sources)

    deep = depth > 24  # narrower cells, smaller digits: 36 layers stay one readable figure
    cell = 0.3 if deep else 0.55
    labels = [_row_label(r, rank) for r, rank in zip(rows, _ranks(rows))]
    label_width = 0.065 * max((len(t) for t in labels), default=4)
    fig = _figure(max(6.0, cell * depth + 2.6 + label_width), max(2.4, 0.3 * len(rows) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    small = len(rows) > 25 or deep
    for i, r in enumerate(rows):
        m = shown(r)
        for j, v in enumerate(m):
            shade = v / max(1, sources - 1)
            ax.text(j, i, str(v), ha="center", va="center", fontsize=5.5 if deep else 7 if small else 9,
                    color="white" if shade < 0.55 else "black")
            if j and v != m[j - 1] + 1:  # a seam: a repeat or a jump
                ax.plot([j - 0.5, j - 0.5], [i - 0.5, i + 0.5], color="white", lw=1.6, solid_capstyle="butt")
        p = _ppl(r)
        label = "–" if p is None else f"{p:.2f}" if p < 1000 else f"{p:,.0f}"
        ax.text(depth - 0.5 + 0.25, i, label, ha="left", va="center", fontsize=8 if small else 9.5,
                fontweight="bold" if r.get("reference") else "normal")
        if not m:
            ax.text((depth - 1) / 2, i, "no mapping", ha="center", va="center", fontsize=9, color="0.3")
        if r.get("reference"):
            ax.add_patch(Rectangle((-0.5, i - 0.5), depth, 1, fill=False, ec="crimson", lw=2.2, clip_on=False))
    margin = 3.2 if deep else 1.9  # room for the perplexity, in cells
    ax.text(depth - 0.5 + 0.25, len(rows) - 0.5 + 0.12, "perplexity", ha="left", va="top", fontsize=9,
            fontweight="bold")
    ax.set_xlim(-0.5, depth - 0.5 + margin)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks(range(0, depth, 5 if deep else 1))
    ax.set_xlabel("target layer" + ("; white lines: seams (a repeat or a jump)" if deep else ""))
    ax.set_yticks(range(len(rows)), labels, fontsize=8 if small else 9)
    for tick, r in zip(ax.get_yticklabels(), rows):
        if r.get("reference"):
            tick.set_color("crimson")
            tick.set_fontweight("bold")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    task = sweep.get("task") if isinstance(sweep, dict) else None
    ax.set_title((title + "\n" if title else "") + f"layer mappings {sources} → {depth} scored without training, "
                 f"best first — perplexity{f' on {task}' if task else ''} (lower is better)", loc="left", fontsize=10.5)
    bar = fig.colorbar(image, ax=ax, ticks=range(0, sources, 5 if sources > 24 else 1), shrink=0.8, pad=0.01)
    bar.set_label("source layer")
    return _save(fig, out)


def _ranks(rows: list[dict]) -> list[int | None]:
    """1, 2, ... for the mappings in order; None for the reference."""
    out, rank = [], 0
    for r in rows:
        if r.get("reference"):
            out.append(None)
        else:
            rank += 1
            out.append(rank)
    return out


def _row_label(row: dict, rank: int | None) -> str:
    if row.get("reference"):
        return "reference (unexpanded)"
    label = row.get("label")
    return f"#{rank} {label}" if isinstance(label, str) and label else f"#{rank}"


# ---------------------------------------------------------------------------------------------
# 4. what to draw for runs (`widen plot`, the TUI monitor's `p`)


def run_labels(runs: Sequence[tuple[str, dict]]) -> dict[str, str]:
    """A legend label per run id, from (run id, run.json) pairs: the run's name (with its variant
    when the name does not say it), the id added where two runs would read the same."""
    names = {}
    for run_id, info in runs:
        name = str(info.get("name") or run_id)
        variant = info.get("variant")
        names[run_id] = f"{name}/{variant}" if variant and str(variant) not in name else name
    return {rid: (n if list(names.values()).count(n) == 1 else f"{n} [{rid}]") for rid, n in names.items()}


def run_figures(label: str, events: Sequence[EventRecord], results: dict | None, out_dir: Path | str,
                x: str = "steps", warn: Warn | None = None) -> list[Path]:
    """What `widen plot RUN` writes for one run: loss.png, forgetting-<label>.png (from results.json,
    else from the evaluations so far) and mapping-<label>.png when the run swept mappings."""
    out_dir, results = Path(out_dir), results or {}
    written: list[Path] = []
    if any(isinstance(e, StepEvent | EvalEvent) for e in events):
        written.append(loss_figure([(label, events)], out_dir / "loss.png", x=x, warn=warn))
    matrix = matrix_for(results, events)
    if matrix is not None:
        written.append(forgetting_figure(matrix.grid, out_dir / f"forgetting-{label}.png", run=label,
                                         trained=matrix.trained))
    if results.get("sweep"):
        written.append(mapping_figure(results["sweep"], out_dir / f"mapping-{label}.png", title=label, warn=warn))
    if not written:
        raise PlotError("no step or eval events yet — nothing to plot")
    return written
