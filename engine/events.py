"""The event stream: ``events.jsonl`` is append-only, one JSON object per line.

The worker writes (``EventWriter``); the CLI and TUI read only the bytes they have not seen yet
(``EventReader``), so following a long run costs nothing per refresh. ``SCHEMA`` is the contract:
the keys every event of a type carries (more keys may be present).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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
    "status": ("state",),                                           # + error when failed
    "sweep": ("task", "depth", "rows", "best"),                     # a mapping sweep after the stages
}
COMMON = ("type", "t")


def validate_event(event: dict) -> list[str]:
    """Problems with one event against the schema (empty if it conforms)."""
    kind = event.get("type")
    if kind not in SCHEMA:
        return [f"unknown event type {kind!r}"]
    missing = [k for k in COMMON + SCHEMA[kind] if k not in event]
    return [f"{kind} event lacks {', '.join(missing)}"] if missing else []


class EventWriter:
    """Appends events; flushes every line so readers see it at once, fsyncs the important ones."""

    DURABLE = frozenset({"start", "stage", "expand", "checkpoint", "status"})

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)

    def emit(self, kind: str, **fields) -> dict:
        event = {"type": kind, "t": round(time.time(), 3), **fields}
        self._file.write(json.dumps(event, default=_jsonable) + "\n")
        self._file.flush()
        if kind in self.DURABLE:
            os.fsync(self._file.fileno())
        return event

    def write_raw(self, event: dict) -> None:
        """Append an event as it is (events copied from a cached prefix keep their times)."""
        self._file.write(json.dumps(event, default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class EventReader:
    """Reads events incrementally: each `read_new()` returns only events appended since the last
    call. A half-written last line is kept until its newline arrives."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.offset = 0
        self._partial = b""

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash: skip it, never stop reading
        return events


def read_all(path: Path | str) -> list[dict]:
    return EventReader(path).read_new()
