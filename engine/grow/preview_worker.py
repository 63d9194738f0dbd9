"""The parameter preview's helper process: ``python -m engine.grow.preview_worker``.

The plan builder stays torch-free; it talks to this process, which runs the plan's operators on
the meta device (``engine.grow.preview``). Protocol, one JSON object per line (never pickle):

    request  {"id": 7, "plan": {...raw plan dict...}}      (a bare plan dict is request id null)
    answer   {"id": 7, "preview": {...PlanPreview...}}     (engine.grow.preview.to_json)
             {"id": 7, "skipped": true}                    a newer request was already waiting
             {"id": null, "error": "..."}                  a line that is not a JSON object

Every request gets exactly one answer, in order. Requests queue while one is computed; only the
newest of them is computed (latest request wins). Bad input never ends the process: it gets an
answer with the error. End of input ends it.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

FAILED_LOAD_TTL = 60.0  # seconds a config that failed to load is not tried again (offline hub names)


class ConfigCache:
    """Configs by model spec, loaded once per process (a hub config may take seconds); a recent
    failure is raised again at once, so a plan naming an unreachable hub model does not wait for
    the hub's retries on every edit."""

    def __init__(self):
        self.loaded: dict[tuple, object] = {}
        self.failed: dict[tuple, tuple[float, Exception]] = {}

    def __call__(self, spec):
        from engine.model.sources import ModelLoadError, load_config

        key = (spec.source, spec.revision, getattr(spec, "family", None))
        if key in self.loaded:
            return self.loaded[key]
        failed = self.failed.get(key)
        if failed and time.monotonic() - failed[0] < FAILED_LOAD_TTL:
            raise failed[1]
        try:
            self.loaded[key] = load_config(spec)
        except ModelLoadError as e:
            self.failed[key] = (time.monotonic(), e)
            raise
        return self.loaded[key]


def answer(line: str, configs: ConfigCache) -> dict:
    """The answer to one request line (never raises)."""
    from engine.grow.preview import PlanPreview, one_line, preview_plan, to_json

    try:
        message = json.loads(line)
    except ValueError as e:
        return {"id": None, "error": f"not JSON: {one_line(e)}"}
    if not isinstance(message, dict):
        return {"id": None, "error": "a request is a JSON object"}
    ident, plan = (message.get("id"), message.get("plan")) if "plan" in message else (None, message)
    try:
        preview = preview_plan(plan, load_config=configs)
    except Exception as e:  # noqa: BLE001 - any plan gets one answer
        preview = PlanPreview(None, error=f"the preview failed: {one_line(e)}")
    return {"id": ident, "preview": to_json(preview)}


def _ident(line: str):
    try:
        message = json.loads(line)
        return message.get("id") if isinstance(message, dict) else None
    except ValueError:
        return None


def _quiet_logs() -> None:
    import logging

    for name in ("huggingface_hub", "transformers", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def serve(lines, write) -> None:
    """Answer request `lines` (an iterator) through `write(dict)`; queued requests but the newest
    are skipped."""
    pending: queue.Queue = queue.Queue()

    def read() -> None:
        for line in lines:
            if line.strip():
                pending.put(line)
        pending.put(None)  # end of input

    threading.Thread(target=read, daemon=True).start()
    configs = ConfigCache()
    while True:
        line = pending.get()
        if line is None:
            return
        while True:  # a newer request waiting: this one is stale
            try:
                newer = pending.get_nowait()
            except queue.Empty:
                break
            if newer is None:
                pending.put(None)
                break
            write({"id": _ident(line), "skipped": True})
            line = newer
        write(answer(line, configs))


def run() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    _quiet_logs()

    def write(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    serve(sys.stdin, write)


if __name__ == "__main__":
    run()
