"""LossChart: training loss and held-out eval loss per task of one or several runs, in the terminal.

Built on textual-plotext. Curves come from ``engine.runs.curves`` (the same model the PNG figures
use); the x axis is global steps, tokens seen or training FLOPs. Stage boundaries are vertical
lines, stage-start expansions a ◆ and growths mid-stage a ▲ (the legend names the triggers that
fired them: plateau, at, budget). Every series is downsampled to the
widget's width (braille cells hold two points across), so a long history costs what the screen
can show. Colours are the 16 ANSI ones and each eval task has its own marker character, so the
chart reads without true colour; the plot is only rebuilt when the data, the axis or the size
changed, and only when painted (a chart in a hidden tab costs nothing).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from textual_plotext import PlotextPlot

from engine.runs.curves import X_AXES, RunCurves, downsample, human

# 16-colour names (ANSI 0-15): they survive terminals without true colour.
RUN_COLOURS = ["cyan+", "magenta+", "green+", "orange+", "blue+", "red+", "cyan", "magenta"]
TASK_COLOURS = ["green+", "orange+", "magenta+", "blue+", "red+", "cyan"]
TASK_MARKERS = ["o", "x", "+", "#", "%", "@"]
EXPANSION_MARKER, GROWTH_MARKER = "◆", "▲"
# a growth's trigger ([stages.grow] trigger, recorded on its expand event) -> the legend's words
GROWTH_WORDS = {"plateau": "growth on plateau", "at": "growth at step", "budget": "growth on budget"}


def growth_words(trigger: str | None) -> str:
    """What the legend calls a growth fired by `trigger` (None: a growth that did not record it)."""
    if trigger is None:
        return "growth"
    return GROWTH_WORDS.get(trigger, f"growth on {trigger}")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round numbers (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


class LossChart(PlotextPlot):
    """Loss curves of `runs` against `x` ("steps" | "tokens" | "flops").

    ``show(runs, x, title)`` replaces what is drawn; call it again when the runs' curves grow.
    One run: training loss in its colour, each eval task in its own colour and marker. Several
    runs: one colour per run, eval tasks told apart by marker."""

    DEFAULT_CSS = """
    LossChart {
        min-height: 8;
    }
    """

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None):
        super().__init__(name=name, id=id, classes=classes)
        self.theme = "clear"  # no canvas colour of its own: the widget's background shows through
        self._runs: list[RunCurves] = []
        self._x = "steps"
        self._title: str | None = None
        self._built_for: tuple | None = None  # (data generation, width, height, theme) of the last build
        self._rendered = None
        self._generation = 0
        self.note = ""  # why the axis differs from the one asked for, if it does
        self.last_build_s = 0.0  # seconds the last rebuild took (data to text)

    @property
    def x_axis(self) -> str:
        return self._x

    @property
    def point_count(self) -> int:
        """Training and eval points currently given to the chart (before downsampling)."""
        return sum(len(r.steps) + len(r.evals) for r in self._runs)

    def show(self, runs: Sequence[RunCurves], x: str = "steps", title: str | None = None) -> None:
        if x not in X_AXES:
            raise ValueError(f"x must be one of {', '.join(X_AXES)}, not {x!r}")
        self._runs = [r for r in runs if r.steps or r.evals]
        self._x, self._title = x, title
        self._generation += 1
        self.refresh()

    def render(self):
        key = (self._generation, self.size.width, self.size.height, self.app.theme)
        if key == self._built_for and self._rendered is not None:
            return self._rendered  # a repaint of unchanged data: no plotext work at all
        started = time.perf_counter()
        self._build()
        self._built_for = key
        self._rendered = super().render()
        # what a redraw costs: a caller following a live run can space redraws by it
        self.last_build_s = time.perf_counter() - started
        return self._rendered

    # -- drawing -----------------------------------------------------------------------------------
    def _build(self) -> None:
        plt = self.plt
        plt.clear_figure()
        x = self._x
        lacking = [r.label for r in self._runs if not r.has(x)]
        self.note = f"{', '.join(lacking)}: no {x} in events, by steps" if lacking else ""
        if lacking:
            x = "steps"
        # braille holds two points per cell across; min-max buckets keep spikes
        budget = max(8, 2 * max(self.size.width - 12, 4))
        several = len(self._runs) > 1
        # a small chart has no room for plotext's legend box: a one-line key under the axis instead
        compact = self.size.height < 18 or self.size.width < 60
        key: list[str] = []
        tasks = list(dict.fromkeys(t for r in self._runs for t in r.tasks))
        marker = {t: TASK_MARKERS[i % len(TASK_MARKERS)] for i, t in enumerate(tasks)}
        xs_all: list[float] = []

        for i, run in enumerate(self._runs):
            colour = RUN_COLOURS[i % len(RUN_COLOURS)]
            series = run.train_series(x)
            labelled = False
            for stage in sorted(series):
                points = downsample(series[stage], max(4, budget * len(series[stage]) // max(len(run.steps), 1)))
                xs_all += [p[0] for p in points]
                label = None if labelled or compact else (run.label if several else "train")
                plt.plot([p[0] for p in points], [p[1] for p in points], marker="braille", color=colour,
                         label=label)
                labelled = True
            if series and compact:
                key.append(f"⠤ {run.label}" if several else "⠤ train")
            for task, points in run.eval_series(x).items():
                tcolour = colour if several else TASK_COLOURS[tasks.index(task) % len(TASK_COLOURS)]
                points = downsample(points, budget)
                xs_all += [p[0] for p in points]
                px, py = [p[0] for p in points], [p[1] for p in points]
                if len(points) > 1:
                    plt.plot(px, py, marker="braille", color=tcolour)
                # several runs: each task's marker is named once (the run colours name the runs)
                named = not several or i == 0
                plt.scatter(px, py, marker=marker[task], color=tcolour,
                            label=f"eval {task}" if named and not compact else None)
                if named and compact:
                    key.append(f"{marker[task]} {task}")

        marks = [m for r in self._runs for m in r.stage_marks(x)]
        for m in {round(m.x, 9): m for m in marks}.values():
            if m.x > 0:  # the first stage begins at the origin: no line needed
                plt.vline(m.x, color="gray")
        # one legend entry for the stage-start expansions, and one per trigger the shown growths used
        marked = [m for r in self._runs for m in r.expansion_marks(x) if m.y is not None]
        entries = [(EXPANSION_MARKER, "orange+", "expansion", [m for m in marked if m.kind == "expansion"])]
        growths = [m for m in marked if m.kind == "growth"]
        for trigger in dict.fromkeys(m.trigger for m in growths):
            entries.append((GROWTH_MARKER, "red+", growth_words(trigger), [m for m in growths if m.trigger == trigger]))
        for symbol, colour, what, points in entries:
            if points:
                added = sum(m.params_added for m in points)
                label = f"{what} (+{human(added)} params)"
                plt.scatter([m.x for m in points], [m.y for m in points], marker=symbol, color=colour,
                            label=None if compact else label)
                if compact:
                    key.append(f"{symbol} {what} +{human(added)}")

        plt.xlabel(X_AXES[x] + (f"  [{self.note}]" if self.note else "") + ("   " + "  ".join(key) if key else ""))
        plt.ylabel("loss")
        plt.title(self._title if self._title is not None else "training and eval loss")
        if x != "steps" and xs_all:
            ticks = nice_ticks(min(xs_all), max(xs_all), max(2, self.size.width // 14))
            plt.xticks(ticks, [human(t) for t in ticks])
        if not self._runs:
            plt.title((self._title or "loss") + " — waiting for the first steps")
