"""One human line per event: `widen logs`, `widen watch` (piped) and the TUI's event log.

Events come from ``engine.runs.events.EventReader``, which has checked their keys and types; a metric
may still be null (a non-finite value, e.g. a diverged loss, is written as null): shown as "–".
"""

from __future__ import annotations


def _num(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _f(value, spec: str) -> str:
    """`value` formatted with `spec`, or "–" when it is missing (null) or not a number."""
    if value is None or isinstance(value, bool):
        return "–"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def describe_event(e: dict) -> str:
    kind, stage = e.get("type"), e.get("stage")
    label = f"stage {stage + 1}" if isinstance(stage, int) and stage >= 0 else "initial"
    if kind == "start":
        return f"start {e['run']} plan={e['plan']} device={e['device']} params={_f(e['params'], ',')} " \
               f"{'(resumed)' if e.get('resumed') else ''}"
    if kind == "resume":
        return f"resume from stage {e['stage'] + 1} step {e['step']} (global step {e['global_step']}): " \
               "what was logged past it is void"
    if kind == "stage":
        return f"{label} {e['phase']}: {e['name']} on {e['task']} ({e['steps']} steps)"
    if kind == "step":
        return f"{label} step {e['step']}: loss {_f(e['loss'], '.4f')} lr {_f(e['lr'], '.2e')} " \
               f"{_f(e['tokens_per_s'], ',.0f')} tok/s"
    if kind == "eval":
        return f"{label} step {e['step']}: eval {e['task']} loss {_f(e['loss'], '.4f')} ppl {_f(e['ppl'], '.3f')}"
    if kind == "expand" and e.get("trigger"):
        growth = e.get("growth")
        return f"{label} step {e.get('step', '?')}: growth {growth + 1 if isinstance(growth, int) else '?'} " \
               f"({e['trigger']}) {e['op']}: +{_f(e['params_added'], ',')} params, max|Δlogits| " \
               f"{_f(e['max_abs_logit_delta'], '.2e')}, loss {_f(e['loss_before'], '.4f')} -> " \
               f"{_f(e['loss_after'], '.4f')}"
    if kind == "expand":
        return f"{label} expand {e['op']}: +{_f(e['params_added'], ',')} params, max|Δlogits| " \
               f"{_f(e['max_abs_logit_delta'], '.2e')}, loss {_f(e['loss_before'], '.4f')} -> " \
               f"{_f(e['loss_after'], '.4f')}"
    if kind == "checkpoint":
        return f"{label} checkpoint ({e['reason']}) at step {e['step']}"
    if kind == "system":
        return f"system rss {e['rss_mb']} MB cpu {e['cpu_percent']}% {e['gpu_status']}"
    if kind == "ranks":
        from widen_tui.views.report import rank_lines

        return f"{label} step {e['step']}: memory per rank: " + "; ".join(
            " ".join(line.split()) for line in rank_lines(e["ranks"]))
    if kind == "warning":
        return f"warning ({e['source']}): {e['message']}"
    if kind == "status":
        return f"status {e['state']}" + (f": {e['error']}" if e.get("error") else "")
    if kind == "health":
        return f"{label} health of {e['op']}'s new units after training: max pairwise cosine " \
               f"{_num(e.get('max_pairwise_cosine'))}, max twin cosine {_num(e.get('max_twin_cosine'))}"
    if kind == "sweep":
        best = e.get("best") or {}
        return f"sweep on {e['task']}: {e['rows'] - 1} mappings to depth {e['depth']}, best {best.get('mapping')} " \
               f"ppl {_f(best.get('ppl'), '.3g')} (unexpanded: {_f(e.get('reference_ppl'), '.3g')}), " \
               f"prefix-sharing speed-up {_f(e.get('speedup'), '.3g')}x"
    from engine.runs.rundir import dumps_json

    return dumps_json(e)
