"""The run directory: the files a run is made of, and how to read them safely.

A run is a directory ``<runs root>/<run_id>/`` holding

- ``run.json``      identity, written once by the launcher (id, name, plan path, seed, created)
- ``plan.toml``     the resolved plan (overrides applied)
- ``events.jsonl``  append-only event stream (see ``engine.events``)
- ``status.json``   state, pid, host, heartbeat; rewritten atomically by the worker
- ``stderr.log``    the worker's stdout/stderr
- ``checkpoints/``  safetensors weights + trainer state
- ``results.json``  written once at the end

The run directory is the truth; the TinyDB index in ``widen_tui.registry`` is rebuilt from it.
This module imports nothing heavy: the CLI and the TUI read runs without torch.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

RUNNING_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")
# A running run whose heartbeat is older than this (and whose pid we cannot see) is `lost`.
HEARTBEAT_STALE_S = 60.0


def runs_root() -> Path:
    """The runs root: ``$WIDEN_HOME`` if set, else ``./runs``."""
    return Path(os.environ.get("WIDEN_HOME") or "runs").resolve()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: Path) -> dict | None:
    """Read a JSON file; None if it is missing or unreadable (a run dir can be half made)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


class RunDir:
    """Paths and readers for one run directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    run_json = property(lambda self: self.path / "run.json")
    plan = property(lambda self: self.path / "plan.toml")
    events = property(lambda self: self.path / "events.jsonl")
    status_json = property(lambda self: self.path / "status.json")
    stderr = property(lambda self: self.path / "stderr.log")
    checkpoints = property(lambda self: self.path / "checkpoints")
    results_json = property(lambda self: self.path / "results.json")
    cancel_request = property(lambda self: self.path / "cancel.request")

    def exists(self) -> bool:
        return self.run_json.exists()

    def info(self) -> dict:
        return read_json(self.run_json) or {"id": self.id}

    def status(self) -> dict:
        """status.json with the *effective* state: `lost` when the worker died silently."""
        status = read_json(self.status_json) or {"state": "queued"}
        status["state"] = effective_state(status, self.info())
        return status

    def results(self) -> dict | None:
        return read_json(self.results_json)

    def record(self) -> dict:
        """The index record for this run, built from the files alone."""
        info = self.info()
        status = self.status()
        results = self.results() or {}
        return {
            "id": self.id,
            "name": info.get("name", self.id),
            "plan": info.get("plan_path"),
            "seed": info.get("seed"),
            "variant": info.get("variant"),
            "group": info.get("group"),
            "created": info.get("created"),
            "ended": status.get("ended"),
            "state": status["state"],
            "stage": status.get("stage"),
            "step": status.get("step"),
            "error": status.get("error"),
            "summary": results.get("summary", {}),
        }


def pid_alive(pid: int | None) -> bool:
    try:
        pid = int(pid or 0)
    except (TypeError, ValueError):  # a hand-edited or foreign status.json
        return False
    if pid <= 0:  # 0 and negatives would signal a whole process group
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def effective_state(status: dict, info: dict | None = None) -> str:
    """The state a person should see. A `running` run whose process is gone is `lost`."""
    state = status.get("state", "queued")
    if state not in RUNNING_STATES:
        return state
    same_host = status.get("host", socket.gethostname()) == socket.gethostname()
    heartbeat = status.get("heartbeat") or (info or {}).get("created_ts") or 0
    try:
        heartbeat = float(heartbeat)
    except (TypeError, ValueError):  # not epoch seconds: as good as none, rather than crash a listing
        heartbeat = 0.0
    stale = time.time() - heartbeat > HEARTBEAT_STALE_S
    if same_host and status.get("pid"):
        return state if pid_alive(status["pid"]) else "lost"
    if state == "queued" and not status.get("pid"):
        # Not started yet: only lost if it never started for a long while.
        return "lost" if stale and heartbeat else state
    return "lost" if stale else state


def list_run_dirs(root: Path | None = None) -> list[RunDir]:
    root = Path(root) if root else runs_root()
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir() if (p / "run.json").exists()), key=lambda r: r.id)
