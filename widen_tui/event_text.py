"""One human line per event: `widen logs`, `widen watch` (piped) and the TUI's event log."""

from __future__ import annotations

import json


def _num(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def describe_event(e: dict) -> str:
    kind, stage = e.get("type"), e.get("stage")
    label = f"stage {stage + 1}" if isinstance(stage, int) and stage >= 0 else "initial"
    if kind == "start":
        return f"start {e['run']} plan={e['plan']} device={e['device']} params={e['params']:,} " \
               f"{'(resumed)' if e.get('resumed') else ''}"
    if kind == "stage":
        return f"{label} {e['phase']}: {e['name']} on {e['task']} ({e['steps']} steps)"
    if kind == "step":
        return f"{label} step {e['step']}: loss {e['loss']:.4f} lr {e['lr']:.2e} {e['tokens_per_s']:,.0f} tok/s"
    if kind == "eval":
        return f"{label} step {e['step']}: eval {e['task']} loss {e['loss']:.4f} ppl {e['ppl']:.3f}"
    if kind == "expand" and e.get("trigger"):
        return f"{label} step {e['step']}: growth {e['growth'] + 1} ({e['trigger']}) {e['op']}: " \
               f"+{e['params_added']:,} params, max|Δlogits| {e['max_abs_logit_delta']:.2e}, loss " \
               f"{e['loss_before']:.4f} -> {e['loss_after']:.4f}"
    if kind == "expand":
        return f"{label} expand {e['op']}: +{e['params_added']:,} params, max|Δlogits| " \
               f"{e['max_abs_logit_delta']:.2e}, loss {e['loss_before']:.4f} -> {e['loss_after']:.4f}"
    if kind == "checkpoint":
        return f"{label} checkpoint ({e['reason']}) at step {e['step']}"
    if kind == "system":
        return f"system rss {e['rss_mb']} MB cpu {e['cpu_percent']}% {e['gpu_status']}"
    if kind == "status":
        return f"status {e['state']}" + (f": {e['error']}" if e.get("error") else "")
    if kind == "health":
        return f"{label} health of {e['op']}'s new units after training: max pairwise cosine " \
               f"{_num(e.get('max_pairwise_cosine'))}, max twin cosine {_num(e.get('max_twin_cosine'))}"
    if kind == "sweep":
        best = e.get("best") or {}
        return f"sweep on {e['task']}: {e['rows'] - 1} mappings to depth {e['depth']}, best {best.get('mapping')} " \
               f"ppl {_num(best.get('ppl'))} (unexpanded: {_num(e.get('reference_ppl'))}), prefix-sharing " \
               f"speed-up {_num(e.get('speedup'))}x"
    return json.dumps(e)
