"""What the worker is busy with between steps, in words: a `progress` event (engine.runs.records.
ProgressEvent) as "evaluating prose 5/8 batches", and the one line `widen watch` and the TUI
monitor show while no step comes, with how long it has lasted. Imports no other view (event_text
and report both use it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.runs.rundir import RUNNING_STATES

if TYPE_CHECKING:  # the records (pydantic) are imported by whoever has one: `widen --help` stays quick
    from engine.runs.progress import RunProgress
    from engine.runs.records import ProgressEvent


def describe_progress(e: ProgressEvent) -> str:
    """What a `progress` event says the worker is doing: "loading model…", "tokenizing python
    (2/3)", "evaluating prose 5/8 batches"."""
    known_total = isinstance(e.total, int) and e.total > 0
    if e.phase == "load":
        return f"loading {e.what}…"
    if e.phase == "tokenize":  # done: the tasks before this one
        return f"tokenizing {e.what}" + (f" ({e.done + 1}/{e.total})" if known_total else "…")
    if e.phase == "evaluate":
        return f"evaluating {e.what} {e.done}/{e.total} batches" if known_total else f"evaluating {e.what}…"
    if e.phase == "generate":
        return f"generating {e.what} examples…"
    return f"{e.phase} {e.what}" + (f" {e.done}/{e.total}" if known_total else "…")  # a newer engine's phase


def fmt_elapsed(seconds: float) -> str:
    """A short wait in seconds ("42s"), a longer one in minutes ("3m05s") or hours ("1h02m")."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def activity_line(p: RunProgress, now: float | None = None, state: str | None = None) -> str | None:
    """What the worker is busy with between steps, and for how long ("evaluating prose 5/8
    batches · 42s"); None while it trains, or once the run has ended (`state`: the effective
    one, status.json's, where the caller has it)."""
    if p.activity is None or (state or p.state) not in RUNNING_STATES:
        return None
    return f"{describe_progress(p.activity)} · {fmt_elapsed(p.activity_s(now) or 0.0)}"
