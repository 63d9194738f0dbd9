"""The event stream: ``events.jsonl`` is append-only, one JSON object per line.

The worker writes (``EventWriter``); the CLI and TUI read only the bytes they have not seen yet
(``EventReader``), so following a long run costs nothing per refresh. ``SCHEMA`` is the contract:
the keys every event of a type carries (more keys may be present); ``TYPES`` says what each holds.
The reader checks every line against both and drops (and reports, ``EventReader.problems``) a
line that is not UTF-8, not JSON, not an object, or lacks a key or has one of the wrong type — so
whoever folds events can trust the keys and types of the events it gets.

**Segments.** A resumed run appends a ``resume`` event: "continuing from stage S step K (global
step G); anything logged earlier at a later position is void". ``latest_segment(events)`` keeps
what still holds; ``voided_by(event, resume)`` is the rule, for readers that fold live.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.runs.rundir import dumps_json

SCHEMA: dict[str, tuple[str, ...]] = {
    "start": ("run", "plan", "seed", "device", "pid", "params", "stages", "resumed"),
    "stage": ("stage", "name", "task", "steps", "phase"),          # phase: begin | end
    "step": ("stage", "step", "global_step", "loss", "lr", "tokens_per_s", "tokens", "flops"),
    "eval": ("stage", "step", "task", "loss", "ppl", "bpb"),
    "expand": ("stage", "op", "params_before", "params_after", "params_added", "trainable",
               "exact", "max_abs_logit_delta", "loss_before", "loss_after"),
    "health": ("stage", "op", "max_pairwise_cosine", "max_twin_cosine"),   # new units after training
    "system": ("rss_mb", "cpu_percent", "gpus", "gpu_status", "torch_peak_mb"),
    "checkpoint": ("stage", "step", "path", "reason"),
    "status": ("state",),                                           # + error when failed / diverged
    "sweep": ("task", "depth", "rows", "best"),                     # a mapping sweep after the stages
    "resume": ("stage", "step", "global_step"),                     # a resumed run continues from here
    # a distributed run, at each logged step: every rank's memory, one object per rank (RANK_FIELDS)
    "ranks": ("stage", "step", "global_step", "ranks"),
    # something went wrong beside the run, which goes on: a tracker (engine.runs.trackers) that failed
    "warning": ("source", "message"),
}
COMMON = ("type", "t")

# What the keys hold: "int" (not bool), "num" (int or float, not bool), "str", "list", "dict";
# a trailing "?" also allows null (a non-finite value is written as null). Keys not named here
# may hold anything. Optional keys (not in SCHEMA) are checked only when present.
TYPES: dict[str, str] = {
    "t": "num", "stage": "int", "step": "int", "global_step": "num", "steps": "int",
    "run": "str", "plan": "str", "device": "str", "params": "num?", "stages": "int",
    "name": "str", "task": "str", "phase": "str", "op": "str", "state": "str", "reason": "str",
    "path": "str", "error": "str?",
    "loss": "num?", "lr": "num?", "tokens_per_s": "num?", "tokens": "num?", "flops": "num?", "ppl": "num?",
    "bpb": "num?", "params_before": "num?", "params_after": "num?", "params_added": "num?",
    "trainable": "num?", "trainable_share": "num?", "max_abs_logit_delta": "num?", "loss_before": "num?",
    "loss_after": "num?", "max_pairwise_cosine": "num?", "max_twin_cosine": "num?",
    "rss_mb": "num?", "cpu_percent": "num?", "gpus": "list", "gpu_status": "str?", "torch_peak_mb": "num?",
    "depth": "int", "rows": "int", "best": "dict?", "growth": "int?", "stage_steps": "list?",
    "ranks": "list", "source": "str", "message": "str",
}
# What each object of a ``ranks`` event holds (rank is required; host is None when not gathered,
# gpu_mem_mb None without a GPU).
RANK_FIELDS: dict[str, str] = {"rank": "int", "host": "str?", "rss_mb": "num?", "gpu_mem_mb": "num?"}
# per event type, where a key means something else
_TYPE_OVERRIDES: dict[str, dict[str, str]] = {
    "start": {"plan": "str", "seed": "int?", "pid": "int?"},
    "sweep": {"task": "str"},
}


def _type_ok(value, kind: str) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, list)
    if kind == "dict":
        return isinstance(value, dict)
    return True


def validate_event(event: dict) -> list[str]:
    """Problems with one event against the schema (empty if it conforms)."""
    if not isinstance(event, dict):
        return [f"not an object but a JSON {type(event).__name__}"]
    kind = event.get("type")
    if kind not in SCHEMA:
        return [f"unknown event type {kind!r}"]
    missing = [k for k in COMMON + SCHEMA[kind] if k not in event]
    if missing:
        return [f"{kind} event lacks {', '.join(missing)}"]
    return _type_problems(kind, event)


def _type_problems(kind: str, event: dict) -> list[str]:
    overrides = _TYPE_OVERRIDES.get(kind, {})
    wrong = []
    for key, value in event.items():
        expected = overrides.get(key) or TYPES.get(key)
        if expected and not _type_ok(value, expected):
            wrong.append(f"{key} is {_what(value)}, not {_NAMES[expected.rstrip('?')]}")
    if kind == "system" and not wrong and not all(isinstance(g, dict) for g in event["gpus"]):
        wrong.append("gpus holds something other than objects")
    if kind == "ranks" and not wrong:
        wrong += _rank_problems(event["ranks"])
    return [f"{kind} event: {', '.join(wrong)}"] if wrong else []


def _rank_problems(ranks: list) -> list[str]:
    """Every item an object with an integer rank >= 0, each rank once, its fields of their types."""
    if not ranks:
        return ["ranks is empty"]
    seen = set()
    for i, item in enumerate(ranks):
        if not isinstance(item, dict):
            return [f"ranks[{i}] is {_what(item)}, not an object"]
        if "rank" not in item:
            return [f"ranks[{i}] lacks rank"]
        for key, expected in RANK_FIELDS.items():
            if key in item and not _type_ok(item[key], expected):
                return [f"ranks[{i}].{key} is {_what(item[key])}, not {_NAMES[expected.rstrip('?')]}"]
        if item["rank"] < 0 or item["rank"] in seen:
            return [f"ranks[{i}].rank {item['rank']} is {'negative' if item['rank'] < 0 else 'repeated'}"]
        seen.add(item["rank"])
    return []


_NAMES = {"int": "an integer", "num": "a number", "str": "a string", "list": "a list", "dict": "an object"}


def _what(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def check_event(event) -> str | None:
    """Why a parsed line cannot be used as an event (None if it can). Unlike ``validate_event``,
    an object with an unknown type (from a newer engine) is fine: readers skip what they do not
    know, but every known type must carry its keys with the right types."""
    if not isinstance(event, dict):
        return f"not an object but {_what(event)}"
    kind = event.get("type")
    if not isinstance(kind, str):
        return "no event type" if kind is None else f"type is {_what(kind)}"
    if kind not in SCHEMA:
        return None
    problems = validate_event(event)
    return problems[0] if problems else None


class EventWriter:
    """Appends events as strict JSON (a NaN loss is written as null); flushes every line so readers
    see it at once, fsyncs the important ones. `listener` (engine.runs.trackers' mirror) is called
    with every emitted event once it is written."""

    DURABLE = frozenset({"start", "stage", "expand", "checkpoint", "status", "resume"})

    def __init__(self, path: Path | str, listener: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)
        self.listener = listener

    def emit(self, kind: str, **fields) -> dict:
        event = {"type": kind, "t": round(time.time(), 3), **fields}
        self._file.write(dumps_json(event) + "\n")
        self._file.flush()
        if kind in self.DURABLE:
            os.fsync(self._file.fileno())
        if self.listener is not None:
            self.listener(event)
        return event

    def write_raw(self, event: dict) -> None:
        """Append an event as it is (events copied from a cached prefix keep their times)."""
        self._file.write(dumps_json(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


MAX_PROBLEMS = 20  # a reader keeps this many problem lines (and counts the rest)


class EventReader:
    """Reads events incrementally: each `read_new()` returns only events appended since the last
    call. A half-written last line is kept until its newline arrives.

    Lines that cannot be events (not UTF-8, not JSON, not an object, a known type lacking keys or
    with wrong types) are dropped; ``problems`` lists them ("events.jsonl line 12: not an object
    but a list"), ``new_problems()`` returns those not yet taken, so a CLI can warn once."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.offset = 0
        self._partial = b""
        self.lines = 0            # complete lines read so far
        self.problems: list[str] = []
        self.problem_count = 0    # all of them, also those past MAX_PROBLEMS
        self._taken = 0
        self._counted = 0
        self.read_error: str | None = None

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:  # a directory in its place, permissions, an I/O error
            problem = f"{self.path.name} unreadable: {e.strerror or e}"
            if self.read_error != problem:
                self.read_error = problem
                self._problem(problem)
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        events = []
        for line in lines:
            self.lines += 1
            if not line.strip():
                continue
            event, problem = _parse_line(line)
            if problem:
                self._problem(f"{self.path.name} line {self.lines}: {problem}")
            else:
                events.append(event)
        return events

    def read_rest(self) -> list[dict]:
        """``read_new()``, then the last line even without its newline — for a run that has ended
        (nothing more will come): a torn last line is reported, not waited for."""
        events = self.read_new()
        if self._partial.strip():
            self.lines += 1
            event, problem = _parse_line(self._partial)
            self._partial = b""
            if problem:
                self._problem(f"{self.path.name} line {self.lines}: {problem} (the last line, without a newline)")
            else:
                events.append(event)
        return events

    def _problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def new_problems(self) -> list[str]:
        """Problems not returned before (at most MAX_PROBLEMS are kept; ``new_problem_count``
        counts them all)."""
        fresh = self.problems[self._taken:]
        self._taken = len(self.problems)
        return fresh

    def new_problem_count(self) -> int:
        """How many problems (kept or not) came since the last call."""
        count = self.problem_count - self._counted
        self._counted = self.problem_count
        return count


def _parse_line(line: bytes) -> tuple[dict | None, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start})"
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        return None, "not valid JSON (a line torn by a crash, or garbage)"
    problem = check_event(event)
    return (None, problem) if problem else (event, None)


def read_all(path: Path | str) -> list[dict]:
    return EventReader(path).read_new()


# ---------------------------------------------------------------------------------------------
# segments: a resumed run voids what was logged past its resume point


def resume_point(resume: dict) -> tuple[int, int]:
    return int(resume.get("stage", 0)), int(resume.get("step", 0))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def voided_by(event: dict, resume: dict) -> bool:
    """Whether `event`, logged before the ``resume`` event `resume`, no longer holds.

    The resume point is (stage S, step K): steps, evals, checkpoints and plateau growths at a
    later (stage, step) are void; a stage's end (and the health of its new units, measured after
    it) is void from its own stage on; a stage's begin and its stage-start operators from the
    next stage on (at (S, 0) the operators are void when the resume says ``ops_applied: false``;
    without that key, a re-applied set replaces them — see ``latest_segment``); an earlier final
    ``status`` and a ``sweep`` are void (the run went on). A resume that did not come from a
    checkpoint (``from_checkpoint: false``) starts over: everything positional is void. ``start``,
    ``system`` and earlier ``resume`` events stay."""
    kind = event.get("type")
    if kind in ("start", "system", "resume"):
        return False
    if kind in ("status", "sweep"):
        return True
    if kind not in SCHEMA:
        return False
    stage = event.get("stage")
    if not _is_int(stage):
        return False
    if resume.get("from_checkpoint") is False:
        return True  # from the very start: the initial evaluation is redone too
    s, k = resume_point(resume)
    if kind == "expand" and not event.get("trigger"):
        return stage > s or (stage == s and k == 0 and resume.get("ops_applied") is False)
    if kind == "stage":
        return stage >= s if event.get("phase") == "end" else stage > s
    if kind == "health":
        return stage >= s
    step = event.get("step")
    if _is_int(step):
        return (stage, step) > (s, k)
    g, rg = event.get("global_step"), resume.get("global_step")
    if isinstance(g, (int, float)) and isinstance(rg, (int, float)) and math.isfinite(g):
        return g > rg
    return stage > s


def latest_segment(events: Iterable[dict]) -> list[dict]:
    """The events that still hold after every ``resume``: each resume drops what was logged before
    it at a later position (``voided_by``). Stage-start operators of the resume's own stage, at
    step 0, that the resumed worker applies again replace the earlier set. The resume events stay
    (a log can say where the run resumed). Idempotent; a stream without resumes is returned as is."""
    events = list(events)
    if not any(e.get("type") == "resume" for e in events):
        return events
    out: list[dict] = []
    pending: dict[int, int] = {}  # stage -> index in `out` before which its stage-start ops may be void
    for e in events:
        kind = e.get("type")
        if kind == "resume":
            out = [x for x in out if not voided_by(x, e)]
            s, k = resume_point(e)
            pending = {s: len(out)} if k == 0 and "ops_applied" not in e else {}
        elif kind == "expand" and not e.get("trigger") and e.get("stage") in pending:
            cut = pending.pop(e["stage"])
            stage = e["stage"]
            out = [x for i, x in enumerate(out) if i >= cut or not (x.get("type") == "expand" and not x.get("trigger")
                                                                   and x.get("stage") == stage)]
        out.append(e)
    return out
