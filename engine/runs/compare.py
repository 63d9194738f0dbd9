"""Runs side by side: the figures `widen compare` prints, from run directories alone (no torch).

Each run gives one row (parameters — all, and those a token goes through in a mixture of experts —,
trainable share, final perplexity and bits per byte per task,
forgetting, ACC/BWT/FWT, time, speed, memory). Runs of the same plan and variant with different
seeds form a group whose figures are mean ± std (sample std, n-1). Runs whose model grows
mid-way are compared at equal compute too: the training loss each run had when it had spent the
smallest total FLOPs (and tokens) of the runs compared.
"""

from __future__ import annotations

import math
import statistics

from engine.runs.events import latest_segment
from engine.runs.forgetting import FORGETTING_DEFINITION, SIGN_CONVENTION
from engine.runs.records import EventRecord, ExpandEvent, StepEvent, is_number

# the per-run figures that are averaged over seeds (dotted: per-task dictionaries)
SCALARS = ("params", "active_params", "params_added", "trainable", "trainable_share", "acc", "bwt", "fwt", "wall_s",
           "tokens_per_s", "peak_rss_mb", "torch_peak_mb", "growths", "loss_at_equal_flops",
           "loss_at_equal_tokens")
PER_TASK = ("final_ppl", "final_bpb", "forgetting")


def run_row(info: dict, status: dict, results: dict | None) -> dict:
    summary = (results or {}).get("summary", {})
    row = {"id": info.get("id"), "name": info.get("name"), "plan": info.get("plan_name") or info.get("name"),
           "variant": info.get("variant"), "seed": info.get("seed"), "group": info.get("group"),
           "state": status.get("state"), "tasks": (results or {}).get("tasks", [])}
    for key in ("params", "active_params", "params_added", "trainable", "trainable_share", "acc", "bwt", "fwt", "wall_s",
                "tokens_per_s", "peak_rss_mb", "torch_peak_mb", "growths", "tokens", "flops", "prefix_cached"):
        row[key] = summary.get(key)
    for key in PER_TASK:
        row[key] = summary.get(key) or {}
    row["scores"] = summary.get("final_scores") or {}
    row["new_units"] = [_unit_health(r) for r in (results or {}).get("expansions", [])
                        if r.get("new_grad_norm") is not None]
    return row


def _unit_health(report: dict) -> dict:
    """The new units of one expansion: can they learn (gradient, dead share) and do they stay
    distinct (cosines at expansion and after training) — the inits' failure modes as numbers."""
    after = report.get("after_training") or {}
    return {"stage": report.get("stage"), "op": report.get("op"), "init": (report.get("settings") or {}).get("init"),
            "exact": report.get("exact"), "max_abs_logit_delta": report.get("max_abs_logit_delta"),
            "new_grad_norm": report.get("new_grad_norm"), "dead_share": report.get("dead_share"),
            "max_pairwise_cosine": report.get("max_pairwise_cosine"), "max_twin_cosine": report.get("max_twin_cosine"),
            "max_pairwise_cosine_after": after.get("max_pairwise_cosine"),
            "max_twin_cosine_after": after.get("max_twin_cosine")}


def model_grew(events: list[EventRecord]) -> bool:
    """Whether a run's model grew mid-way: a stage's operators or a growth (an expand event with a
    trigger) changed its parameter count between steps. Steps and tokens then undercount what it
    cost, and only training FLOPs make it comparable with other runs; a run that did not grow is
    the default baseline of compute to target (``engine.runs.compute_to_target``)."""
    params = {e.params for e in events if isinstance(e, StepEvent) and e.params}
    return len(params) > 1 or any(isinstance(e, ExpandEvent) and e.trigger for e in events)


def _curve(events: list[EventRecord], axis: str) -> list[tuple[float, float]]:
    """(x, training loss) points of a run, x = cumulative tokens or FLOPs."""
    return [(e.number(axis), e.loss) for e in latest_segment(events)
            if isinstance(e, StepEvent) and e.number(axis) is not None and is_number(e.loss)]


def loss_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The training loss at `x` (linear interpolation between logged points)."""
    if not curve or x < curve[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1] if x <= curve[-1][0] * (1 + 1e-9) else None


def _mean_std(values: list) -> dict | None:
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def compare_runs(runs: list[tuple[dict, dict, dict | None]], events: list[list[EventRecord]] | None = None) -> dict:
    """`runs`: (run.json info, status, results) per run; `events`: each run's event stream, in
    the same order (for the equal-compute losses; None: those stay empty). Returns rows, seed
    groups and the conventions the figures follow."""
    rows = [run_row(info, status, results) for info, status, results in runs]
    _add_equal_compute(rows, events or [[] for _ in rows])
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["plan"], row["variant"] or row["name"]), []).append(row)
    aggregated = []
    for (plan, variant), members in groups.items():
        entry = {"plan": plan, "variant": variant, "runs": [m["id"] for m in members],
                 "seeds": [m["seed"] for m in members]}
        for key in SCALARS:
            entry[key] = _mean_std([m.get(key) for m in members])
        for key in PER_TASK:
            tasks = sorted({t for m in members for t in m[key]})
            entry[key] = {t: _mean_std([m[key].get(t) for m in members]) for t in tasks}
        aggregated.append(entry)
    tasks = []
    for row in rows:
        tasks += [t for t in row["tasks"] if t not in tasks]
    return {"runs": rows, "groups": aggregated, "tasks": tasks,
            "seeded": any(len(g["runs"]) > 1 for g in aggregated),
            "forgetting_metric": "bpb", "forgetting_definition": FORGETTING_DEFINITION,
            "sign_convention": SIGN_CONVENTION}


def _add_equal_compute(rows: list[dict], events: list[list[EventRecord]]) -> None:
    """Training loss of each run at the smallest total FLOPs / tokens among the runs."""
    curves = [(_curve(stream, "flops"), _curve(stream, "tokens")) for stream in events]
    budgets = {}
    for index, axis in ((0, "flops"), (1, "tokens")):
        ends = [c[index][-1][0] for c in curves if c[index]]
        budgets[axis] = min(ends) if ends else None
    for row, (flops_curve, tokens_curve) in zip(rows, curves):
        row["equal_flops_budget"], row["equal_tokens_budget"] = budgets["flops"], budgets["tokens"]
        row["loss_at_equal_flops"] = loss_at(flops_curve, budgets["flops"]) if budgets["flops"] else None
        row["loss_at_equal_tokens"] = loss_at(tokens_curve, budgets["tokens"]) if budgets["tokens"] else None
