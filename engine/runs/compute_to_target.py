"""Compute to target: the training FLOPs, tokens and wall time each run spent before its held-out
loss on a task first reached a target, and each run's ratio to a baseline's.

Pure functions over event lists (no Textual, no torch): ``compute_to_target`` folds each run's
events into ``RunCurves`` (deduplicated, on a global-step axis) and reads

- the **held-out** loss of the task at each eval event; the first crossing of the target is
  interpolated linearly in global step between the eval point above it and the first one at or
  below it, then mapped to FLOPs, tokens and time through the step events (so a growth between
  two evals is priced at what the steps cost, not spread evenly);
- time: training wall time, the sum over logged windows of tokens / tokens-per-second (what the
  steps took, the evaluations between them included; a resumed run's downtime not);
- how dense the evals were: mean spacing in steps, and the FLOPs between the two evals bracketing
  the crossing — the crossing is known no better than that.

Seeds: runs of one plan and variant (or name) with different seeds form a group, as in
``engine.runs.compare``; a group's figures are mean ± std (sample std) over its seeds, and only
when every seed reached the target ("reached 2/3" otherwise, never a mean of the survivors).

The baseline (the runs the ratios divide by): ``--baseline``, else a run whose model did not grow
(``engine.runs.compare.model_grew``: the from-scratch arm of a progressive experiment), else the
first run. The auto target is the loss every seed of the baseline's group reaches: the worst
(highest) final held-out loss among its seeds. The strictest target, the best (lowest) seed's
final loss, is reported too, with how many seeds of each group reached it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from engine.errors import WidenError
from engine.runs.compare import model_grew
from engine.runs.curves import RunCurves, _interp, curves_from_events, is_number
from engine.runs.records import EventRecord, StageEvent

AXES = ("flops", "tokens", "time_s")


class TargetError(WidenError, ValueError):
    """A target that cannot be read from the runs (no such task, ambiguous task); one line."""


@dataclass(frozen=True)
class RunInput:
    """One run: its id, its run.json and its event stream."""

    id: str
    info: dict
    events: Sequence[EventRecord]


@dataclass
class Crossing:
    """Where a run's held-out loss first reached the target (reached False: never)."""

    reached: bool
    global_step: float | None = None
    flops: float | None = None
    tokens: float | None = None
    time_s: float | None = None
    how: str = ""            # interpolated | at the first eval (already below) | initial model
    bracket_steps: tuple[float, float] | None = None   # the evals around the crossing
    bracket_flops: tuple[float, float] | None = None


@dataclass
class RunTarget:
    id: str
    label: str
    group: str
    seed: object
    crossing: Crossing
    evals: int                       # held-out evals of the task
    eval_every_steps: float | None   # mean spacing of those evals in global steps
    final_loss: float | None
    ratio: dict[str, float | None] = field(default_factory=dict)  # per axis: this run / the baseline's
    strict_reached: bool | None = None   # reached the strictest target (auto with distinct baseline seeds)


@dataclass
class GroupTarget:
    group: str
    runs: list[str]
    seeds: list
    reached: int
    figures: dict[str, dict | None] = field(default_factory=dict)   # axis -> mean/std/n (all seeds reached)
    ratio: dict[str, dict | None] = field(default_factory=dict)
    strict_reached: int | None = None    # seeds that reached the strictest target (None: no strict target)


@dataclass
class TargetReport:
    task: str
    target: float
    auto: bool                   # target = the worst final held-out loss among the baseline's seeds
    baseline: str                # run id
    baseline_group: str
    runs: list[RunTarget]
    groups: list[GroupTarget]
    rule: str                    # how the baseline, task and target were chosen, in words
    # auto: the best (lowest) final held-out loss among the baseline's seeds; None with --target-loss L
    strict_target: float | None = None
    baseline_finals: dict[str, float] = field(default_factory=dict)  # auto: each baseline seed's final loss

    @property
    def strict_differs(self) -> bool:
        """Whether the strictest target is another loss than the target (several baseline seeds
        that ended apart): only then has it a table of its own."""
        return self.strict_target is not None and self.strict_target != self.target

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# one run


def eval_points(curves: RunCurves, task: str) -> list[tuple[float, float]]:
    """(global step, held-out loss) of every eval of `task`, in order."""
    return [(float(p.g), float(p.event.loss)) for p in curves.evals
            if p.event.task == task and is_number(p.event.loss) and is_number(p.g)]


def time_axis(curves: RunCurves) -> tuple[list[float], list[float]] | None:
    """(global steps, training seconds so far) from the step events; None when they lack the
    speed (older runs)."""
    xs, ys, tokens, seconds = [0.0], [0.0], 0.0, 0.0
    for e in curves.steps:
        speed, now = e.tokens_per_s, e.tokens
        if not (is_number(speed) and is_number(now) and speed > 0):
            return None
        seconds += max(float(now) - tokens, 0.0) / float(speed)
        tokens = float(now)
        xs.append(float(e.global_step))
        ys.append(seconds)
    return xs, ys


def _at(curves: RunCurves, g: float, axis: str, seconds) -> float | None:
    if axis == "time_s":
        return _interp(g, *seconds) if seconds else None
    return curves.at(g, axis) if curves.has(axis) and curves.steps else None


def crossing(curves: RunCurves, task: str, target: float) -> Crossing:
    """The first point at which `task`'s held-out loss is at or below `target`."""
    points = eval_points(curves, task)
    seconds = time_axis(curves)
    for i, (g, loss) in enumerate(points):
        if loss > target:
            continue
        if i == 0:
            how = "initial model" if g == 0 else "at the first eval (already below)"
            at, bracket = g, None
        else:
            (g0, l0) = points[i - 1]
            at = g0 + (g - g0) * (l0 - target) / (l0 - loss)
            how, bracket = "interpolated", (g0, g)
        figures = {axis: _at(curves, at, axis, seconds) for axis in AXES}
        flops_bracket = None
        if bracket and curves.has("flops") and curves.steps:
            flops_bracket = (curves.at(bracket[0], "flops"), curves.at(bracket[1], "flops"))
        return Crossing(True, at, how=how, bracket_steps=bracket, bracket_flops=flops_bracket, **figures)
    return Crossing(False)


def _group_key(info: dict, run_id: str) -> str:
    """The seed group, as engine.runs.compare groups runs: plan and variant (or name)."""
    plan = info.get("plan_name") or info.get("name") or run_id
    variant = info.get("variant") or info.get("name") or run_id
    return str(variant) if variant == plan else f"{plan}/{variant}"


# ---------------------------------------------------------------------------------------------
# choosing the task and the target


def _last_stage_task(events: Sequence[EventRecord]) -> str | None:
    stages = [e for e in events if isinstance(e, StageEvent)]
    return max(stages, key=lambda e: e.stage).task if stages else None


def choose_task(runs: Sequence[RunInput], curves: Sequence[RunCurves], task: str | None) -> tuple[str, str]:
    """The task and the rule that chose it: --task, else the only task evaluated, else the task
    every run's last stage trained; anything else is an error naming --task."""
    evaluated = [c.tasks for c in curves]
    if task is not None:
        for run, tasks in zip(runs, evaluated):
            if task not in tasks:
                raise TargetError(f"--task: run {run.id} has no held-out evals of task '{task}' — its tasks: "
                                  f"{', '.join(tasks) or 'none'}")
        return task, f"task {task} (--task)"
    every = list(dict.fromkeys(t for tasks in evaluated for t in tasks))
    if not every:
        raise TargetError("no held-out evals in these runs — nothing reaches a target")
    if len(every) == 1:
        return every[0], f"task {every[0]} (the only one evaluated)"
    last = {_last_stage_task(r.events) for r in runs}
    if len(last) == 1 and None not in last and all(next(iter(last)) in tasks for tasks in evaluated):
        chosen = next(iter(last))
        return chosen, f"task {chosen} (every run's last stage trained it)"
    raise TargetError(f"which task? the runs evaluate {', '.join(every)} and their last stages train "
                      f"{', '.join(sorted(str(t) for t in last))} — name one with --task")


def parse_target(text: str) -> float | None:
    """--target-loss: a finite number, or "auto" (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise TargetError(f"--target-loss must be a loss (a number) or auto, not '{text}'") from None
    if not math.isfinite(value):
        raise TargetError(f"--target-loss must be finite, not {text}")
    return value


# ---------------------------------------------------------------------------------------------
# the report


def _mean_std(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def choose_baseline(runs: Sequence[RunInput], baseline: str | None) -> tuple[str, str]:
    """The baseline's run id and the rule that chose it: `baseline` (--baseline), else a run whose
    model did not grow when some did (the from-scratch arm of a progressive experiment), else the
    first run given."""
    ids = [r.id for r in runs]
    if baseline is not None:
        if baseline not in ids:
            raise TargetError(f"--baseline {baseline} is not among the runs compared")
        return baseline, "baseline: --baseline"
    grew = [model_grew(list(r.events)) for r in runs]
    fixed = [r for r, g in zip(runs, grew) if not g]
    if not fixed or len(fixed) == len(runs):
        return ids[0], "baseline: the first run given, as " + ("every run grew" if all(grew) else "no run grew")
    if len(fixed) == 1:
        return fixed[0].id, "baseline: the run that did not grow"
    if len({_group_key(r.info, r.id) for r in fixed}) == 1:
        return fixed[0].id, "baseline: the variant that did not grow"
    return fixed[0].id, "baseline: the first run that did not grow"


def _target_rule(target: float, strict: float | None, finals: dict[str, float]) -> str:
    """The auto target in words: whose final loss it is, and whether the strictest differs."""
    if len(finals) == 1:
        return (f"{target:.4f} = the baseline's final held-out loss (auto; one baseline seed: the strictest "
                "target is the same)")
    if strict == target:
        return (f"{target:.4f} = the final held-out loss of each of the baseline's {len(finals)} seeds "
                "(auto; they ended at the same loss: the strictest target is the same)")
    return (f"{target:.4f} = the worst final held-out loss of the baseline's {len(finals)} seeds, which every "
            f"one of them reaches (auto); strictest target {strict:.4f} = the best seed's")


def compute_to_target(runs: Sequence[RunInput], target: float | None = None, task: str | None = None,
                      baseline: str | None = None, labels: Sequence[str] | None = None) -> TargetReport:
    """`target` None: auto, the worst final held-out loss among the baseline group's seeds (and
    the strictest target, the best seed's). `baseline`: a run id among `runs` (default:
    ``choose_baseline``). `labels`: a name per run for tables (default: its group)."""
    if not runs:
        raise TargetError("no runs to compare")
    ids = [r.id for r in runs]
    baseline, base_rule = choose_baseline(runs, baseline)
    curves = [curves_from_events(r.id, r.events) for r in runs]
    task, task_rule = choose_task(runs, curves, task)
    base_index = ids.index(baseline)
    groups_of = [_group_key(r.info, r.id) for r in runs]
    base_group = groups_of[base_index]
    points_of = [eval_points(c, task) for c in curves]
    auto, strict, finals = target is None, None, {}
    if auto:
        finals = {ids[i]: points_of[i][-1][1] for i in range(len(runs))
                  if groups_of[i] == base_group and points_of[i]}
        if not finals:
            raise TargetError(f"the baseline {baseline} has no held-out evals of task '{task}' — no auto target; "
                              "give --target-loss L or another --baseline")
        target, strict = max(finals.values()), min(finals.values())
    differs = strict is not None and strict != target  # the strictest target is another loss
    rows = []
    for i, (run, c) in enumerate(zip(runs, curves)):
        points = points_of[i]
        gaps = [b[0] - a[0] for a, b in zip(points, points[1:])]
        rows.append(RunTarget(run.id, labels[i] if labels else groups_of[i], groups_of[i], run.info.get("seed"),
                              crossing(c, task, target), len(points), statistics.fmean(gaps) if gaps else None,
                              points[-1][1] if points else None))
        if differs:
            rows[-1].strict_reached = crossing(c, task, strict).reached
    base_members = [r for r in rows if r.group == base_group]
    reference = {}
    for axis in AXES:  # the baseline's figure: its group's mean, when every seed of it got there
        values = [getattr(r.crossing, axis) for r in base_members]
        reference[axis] = statistics.fmean(values) if all(is_number(v) for v in values) else None
    for r in rows:
        for axis in AXES:
            value, ref = getattr(r.crossing, axis), reference[axis]
            r.ratio[axis] = value / ref if is_number(value) and is_number(ref) and ref > 0 else None
    groups: dict[str, list[RunTarget]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    aggregated = []
    for name, members in groups.items():
        reached = sum(m.crossing.reached for m in members)
        entry = GroupTarget(name, [m.id for m in members], [m.seed for m in members], reached)
        if differs:
            entry.strict_reached = sum(bool(m.strict_reached) for m in members)
        for axis in AXES:
            values = [getattr(m.crossing, axis) for m in members]
            ratios = [m.ratio[axis] for m in members]
            every = reached == len(members)
            entry.figures[axis] = _mean_std(values) if every and all(is_number(v) for v in values) else None
            entry.ratio[axis] = _mean_std(ratios) if every and all(is_number(v) for v in ratios) else None
        aggregated.append(entry)
    rule = (f"{task_rule}; {base_rule} ({baseline}); target "
            + (_target_rule(target, strict, finals) if auto else f"{target:g} (--target-loss)"))
    return TargetReport(task, float(target), auto, baseline, base_group, rows, aggregated, rule,
                        float(strict) if strict is not None else None, finals)


# ---------------------------------------------------------------------------------------------
# words for tables (the CLI's rich table and the TUI's DataTable share them)

NOT_REACHED = "not reached"


def fmt_figure(stat: dict | None, axis: str) -> str:
    if not stat:
        return "–"
    unit, suffix = {"flops": ".3g", "tokens": ",.0f", "time_s": ".1f"}[axis], "s" if axis == "time_s" else ""
    mean = format(stat["mean"], unit)
    return mean + suffix if stat["n"] < 2 else f"{mean}±{format(stat['std'], unit)}{suffix}"


def fmt_ratio(stat: dict | None) -> str:
    if not stat:
        return "–"
    return f"×{stat['mean']:.2f}" if stat["n"] < 2 else f"×{stat['mean']:.2f}±{stat['std']:.2f}"


def density(run: RunTarget) -> str:
    """How well the crossing is known: eval spacing, and the FLOPs between the bracketing evals."""
    every = f"evals every {run.eval_every_steps:.0f} steps" if run.eval_every_steps else f"{run.evals} eval(s)"
    c = run.crossing
    if c.bracket_flops:
        return f"{every}; between {c.bracket_flops[0]:.3g} and {c.bracket_flops[1]:.3g} FLOPs"
    return f"{every}; {c.how}" if c.reached else every


def group_rows(report: TargetReport) -> tuple[list[str], list[list[str]]]:
    """One row per variant (mean ± std over seeds): what `widen compare` and the TUI show."""
    columns = ["variant", "seeds", "reached", "FLOPs", "FLOPs ratio", "tokens", "tokens ratio", "time",
               "time ratio", "evals"]
    by_id = {r.id: r for r in report.runs}
    rows = []
    for g in report.groups:
        members = [by_id[i] for i in g.runs]
        cells = [g.group + (" (baseline)" if g.group == report.baseline_group else ""),
                 ",".join(str(s) for s in g.seeds), f"{g.reached}/{len(g.runs)}"]
        for axis in AXES:
            if g.reached < len(g.runs):
                cells += [NOT_REACHED, NOT_REACHED]
            else:
                cells += [fmt_figure(g.figures[axis], axis), fmt_ratio(g.ratio[axis])]
        cells.append(density(members[0]) if len(members) == 1 else
                     f"evals every {statistics.fmean([m.eval_every_steps or 0 for m in members]):.0f} steps")
        rows.append(cells)
    return columns, rows


def run_rows(report: TargetReport) -> tuple[list[str], list[list[str]]]:
    """One row per run (the seeds apart)."""
    columns = ["run", "seed", "FLOPs", "FLOPs ratio", "tokens", "tokens ratio", "time", "time ratio", "evals"]
    rows = []
    for r in report.runs:
        cells = [r.label, str(r.seed)]
        for axis in AXES:
            value = getattr(r.crossing, axis)
            if not r.crossing.reached:
                cells += [NOT_REACHED, NOT_REACHED]
            else:
                cells += [fmt_figure({"mean": value, "std": 0.0, "n": 1} if is_number(value) else None, axis),
                          fmt_ratio({"mean": r.ratio[axis], "std": 0.0, "n": 1} if is_number(r.ratio[axis]) else None)]
        cells.append(density(r))
        rows.append(cells)
    return columns, rows


def strict_rows(report: TargetReport) -> tuple[list[str], list[list[str]]] | None:
    """Per variant, how many seeds reached the strictest target (the best baseline seed's final
    loss); None when it is the target itself (one baseline seed, or seeds that ended alike)."""
    if not report.strict_differs:
        return None
    rows = [[g.group + (" (baseline)" if g.group == report.baseline_group else ""), ",".join(str(s) for s in g.seeds),
             f"{g.strict_reached}/{len(g.runs)}"] for g in report.groups]
    return ["variant", "seeds", "reached"], rows


def strict_title(report: TargetReport) -> str:
    return (f"strictest target: how many seeds' held-out loss on {report.task} reached {report.strict_target:.4f}, "
            "the best baseline seed's final loss")


def title(report: TargetReport) -> str:
    return (f"compute to target: training FLOPs, tokens and time until the held-out loss on {report.task} "
            f"first reached {report.target:.4f} · {report.rule}")
