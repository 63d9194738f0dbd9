"""The builder's side of the parameter preview: a torch-free client of ``engine.grow.preview_worker``.

The helper is started on the first request (importing torch there takes seconds, so it stays up
for the session) and again if it dies. Requests carry increasing ids; a caller waits for the
answer to its own request, and when a newer request is sent before that answer comes, the older
caller gets None (its answer is dropped when it arrives): the latest request wins.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from engine.grow.preview import PlanPreview, from_json

ANSWER_TIMEOUT = 120.0  # seconds: a hub config may take long to load; past this the helper is restarted
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def helper_command() -> list[str]:
    return [sys.executable, "-m", "engine.grow.preview_worker"]


class PreviewClient:
    def __init__(self, command: list[str] | None = None, timeout: float = ANSWER_TIMEOUT):
        self.command = command or helper_command()
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None
        self._cond = threading.Condition()
        self._latest = 0                    # the id of the newest request sent
        self._answers: dict[int, dict] = {}  # id -> answer, only the latest request's is kept

    # -- the helper process ----------------------------------------------------------------------
    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # stderr to nowhere: the helper's library logs would scribble over the full-screen app
        proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, encoding="utf-8", bufsize=1, env=env)
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                ident = message.get("id") if isinstance(message, dict) else None
                if ident == self._latest:  # anything older is stale: dropped
                    self._answers = {ident: message}
                    self._cond.notify_all()
        with self._cond:  # the helper ended (its exit status may come later): wake the waiters
            proc.ended = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # end of input ends the helper
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()

    # -- requests --------------------------------------------------------------------------------
    def _send(self, raw: dict) -> tuple[int, subprocess.Popen]:
        with self._cond:
            if self._proc is None or self._proc.poll() is not None or getattr(self._proc, "ended", False):
                self._proc = self._start()
            self._latest += 1
            self._cond.notify_all()  # an older caller still waiting is superseded: it returns None
            ident, proc = self._latest, self._proc
            line = json.dumps({"id": ident, "plan": raw}) + "\n"
            proc.stdin.write(line)
            proc.stdin.flush()
            return ident, proc

    def preview(self, raw: dict) -> PlanPreview | None:
        """The preview of `raw` (a raw plan dict); None when a newer request superseded it. Never
        raises: a helper that cannot start, dies or does not answer gives PlanPreview(error=...)."""
        for attempt in range(2):  # a helper that died under a request is restarted once
            try:
                ident, proc = self._send(raw)
            except (OSError, ValueError, TypeError) as e:
                if attempt == 0 and not isinstance(e, TypeError):
                    continue
                return PlanPreview(None, error=f"the preview helper could not take the plan: {e}")
            with self._cond:
                done = self._cond.wait_for(lambda: ident in self._answers or ident != self._latest
                                           or getattr(proc, "ended", False), timeout=self.timeout)
                if ident in self._answers:
                    return _preview_of(self._answers.pop(ident))
                if ident != self._latest:
                    return None
            if not done:  # stuck: a fresh helper for the next request
                self._kill(proc)
                return PlanPreview(None, error=f"the preview helper did not answer in {self.timeout:.0f} s")
        return PlanPreview(None, error="the preview helper stopped (twice on this plan)")

    def _kill(self, proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()


def _preview_of(message: dict) -> PlanPreview | None:
    if message.get("skipped"):
        return None
    if "preview" in message:
        return from_json(message["preview"])
    return PlanPreview(None, error=str(message.get("error", "the preview helper gave no preview")))


_shared: PreviewClient | None = None
_shared_lock = threading.Lock()


def shared_client() -> PreviewClient:
    """The session's one client (one helper for every builder screen), closed at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PreviewClient()
            atexit.register(_shared.close)
        return _shared
