"""One human line per event: `widen logs`, `widen watch` (piped) and the TUI's event log.

Events are the typed records of ``engine.runs.records`` (the reader has checked their keys and
types); a metric may still be null (a non-finite value, e.g. a diverged loss, is written as null):
shown as "–".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from widen_tui.views.activity import describe_progress

if TYPE_CHECKING:  # the records (pydantic) are imported when a line is described: `widen --help` stays quick
    from engine.runs.records import EventRecord


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


def describe_event(e: EventRecord) -> str:
    from engine.runs.records import (
        CheckpointEvent,
        EvalEvent,
        ExpandEvent,
        ExpertsEvent,
        HealthEvent,
        ProgressEvent,
        RanksEvent,
        ResumeEvent,
        StageEvent,
        StartEvent,
        StatusEvent,
        StepEvent,
        SweepEvent,
        SystemEvent,
        WarningEvent,
    )

    stage = getattr(e, "stage", None)
    label = f"stage {stage + 1}" if isinstance(stage, int) and stage >= 0 else "initial"
    if isinstance(e, StartEvent):
        return f"start {e.run} plan={e.plan} device={e.device} params={_f(e.params, ',')} " \
               f"{'(resumed)' if e.resumed else ''}"
    if isinstance(e, ResumeEvent):
        return f"resume from stage {e.stage + 1} step {e.step} (global step {e.global_step}): " \
               "what was logged past it is void"
    if isinstance(e, StageEvent):
        return f"{label} {e.phase}: {e.name} on {e.task} ({e.steps} steps)"
    if isinstance(e, StepEvent):
        total = "" if e.total_loss is None else f" (total with the routers' losses {_f(e.total_loss, '.4f')})"
        return f"{label} step {e.step}: loss {_f(e.loss, '.4f')}{total} lr {_f(e.lr, '.2e')} " \
               f"{_f(e.tokens_per_s, ',.0f')} tok/s"
    if isinstance(e, EvalEvent):
        return f"{label} step {e.step}: eval {e.task} loss {_f(e.loss, '.4f')} ppl {_f(e.ppl, '.3f')}"
    if isinstance(e, ExpandEvent) and e.trigger:
        growth = e.growth
        return f"{label} step {'?' if e.step is None else e.step}: " \
               f"growth {growth + 1 if growth is not None else '?'} " \
               f"({e.trigger}) {e.op}: +{_f(e.params_added, ',')} params, max|Δlogits| " \
               f"{_f(e.max_abs_logit_delta, '.2e')}, loss {_f(e.loss_before, '.4f')} -> " \
               f"{_f(e.loss_after, '.4f')}"
    if isinstance(e, ExpandEvent):
        return f"{label} expand {e.op}: +{_f(e.params_added, ',')} params, max|Δlogits| " \
               f"{_f(e.max_abs_logit_delta, '.2e')}, loss {_f(e.loss_before, '.4f')} -> " \
               f"{_f(e.loss_after, '.4f')}"
    if isinstance(e, CheckpointEvent):
        return f"{label} checkpoint ({e.reason}) at step {e.step}"
    if isinstance(e, SystemEvent):
        return f"system rss {e.rss_mb} MB cpu {e.cpu_percent}% {e.gpu_status}"
    if isinstance(e, RanksEvent):
        from widen_tui.views.report import rank_lines

        return f"{label} step {e.step}: memory per rank: " + "; ".join(
            " ".join(line.split()) for line in rank_lines(e.ranks))
    if isinstance(e, ExpertsEvent):
        dead = sum(len(r.dead) for r in e.layers)
        entropies = [r.entropy for r in e.layers if r.entropy is not None]
        spread = f"{min(entropies):.3f}–{max(entropies):.3f}" if entropies else "–"
        return f"{label} step {e.step}: experts over {e.steps} steps: load-balancing loss {_f(e.aux_loss, '.4f')}, " \
               f"{dead} dead, router entropy {spread} nats in {len(e.layers)} sparse layers"
    if isinstance(e, WarningEvent):
        return f"warning ({e.source}): {e.message}"
    if isinstance(e, ProgressEvent):
        return describe_progress(e)
    if isinstance(e, StatusEvent):
        return f"status {e.state}" + (f": {e.error}" if e.error else "")
    if isinstance(e, HealthEvent):
        return f"{label} health of {e.op}'s new units after training: max pairwise cosine " \
               f"{_num(e.max_pairwise_cosine)}, max twin cosine {_num(e.max_twin_cosine)}"
    if isinstance(e, SweepEvent):
        best = e.best or {}
        return f"sweep on {e.task}: {e.rows - 1} mappings to depth {e.depth}, best {best.get('mapping')} " \
               f"ppl {_f(best.get('ppl'), '.3g')} (unexpanded: {_f(e.reference_ppl, '.3g')}), " \
               f"prefix-sharing speed-up {_f(e.speedup, '.3g')}x"
    from engine.runs.rundir import dumps_json

    return dumps_json(e.to_json())
