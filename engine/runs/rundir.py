"""The run directory: the files a run is made of, and how to read them safely.

A run is a directory ``<runs root>/<run_id>/`` holding

- ``run.json``      identity, written once by the launcher (id, name, plan path, seed, created)
- ``plan.toml``     the resolved plan (overrides applied)
- ``events.jsonl``  append-only event stream (see ``engine.runs.events``)
- ``status.json``   state, pid, host, create_time (the process's start time), heartbeat; rewritten
                    atomically by the worker
- ``stderr.log``    the worker's stdout/stderr
- ``checkpoints/``  safetensors weights + trainer state
- ``results.json``  written once at the end

The run directory is the truth; the TinyDB index in ``widen_tui.index`` is rebuilt from it.
This module imports nothing heavy: the CLI and the TUI read runs without torch.

Every JSON file widen writes is strict JSON (``dumps_json``): a non-finite float (a diverged loss)
is written as ``null``, never as the ``NaN`` literal other parsers refuse. Readers still accept old
files that contain ``NaN``. Files are written with the mode the umask gives (``write_json_atomic``,
``make_dir_shared``), so a runs root shared by a group stays shared.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

# States a worker records in status.json while it works, and the ones it ends with.
RUNNING_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled", "diverged")
# Effective states (never written by a worker): `lost` — the worker is gone without a final status
# (or the pid now names another process); `stale` — its process exists but is stopped or has not
# written a heartbeat for HEARTBEAT_STALE_S.
DERIVED_STATES = ("lost", "stale")
# The states in which a process may still be working on the run (cancel signals it; delete refuses).
LIVE_STATES = RUNNING_STATES + ("stale",)
# The states in which none is, the others: nothing more will come (a follower stops following,
# results.json is there if the run wrote one).
ENDED_STATES = FINAL_STATES + ("lost",)
# ended without finishing, with an error to show: `widen watch` exits 1, `widen logs` shows stderr
FAILED_STATES = ("failed", "lost", "diverged")
# A running run whose heartbeat is older than this is `stale` (its process exists) or `lost`.
HEARTBEAT_STALE_S = 60.0
# status.json's create_time and the process's may differ by rounding; a reused pid differs by more.
CREATE_TIME_TOLERANCE_S = 1.0


def runs_root() -> Path:
    """The runs root: ``$WIDEN_HOME`` if set, else ``./runs``."""
    return Path(os.environ.get("WIDEN_HOME") or "runs").resolve()


# ---------------------------------------------------------------------------------------------
# strict JSON, written with the umask's mode


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, recursively (dicts, lists,
    tuples); numpy/torch scalars become Python numbers. What ``json.dumps(allow_nan=False)`` takes."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        try:
            return strict_json(value.item())
        except (TypeError, ValueError):
            return str(value)
    return value


def _default(value: Any) -> Any:
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def dumps_json(data: Any, indent: int | None = None) -> str:
    """Strict JSON text of `data`: non-finite floats as null, unknown objects as str."""
    try:
        return json.dumps(data, indent=indent, default=_default, allow_nan=False)
    except ValueError:  # a NaN or inf somewhere (a scalar from `default` too): clean it, then dump
        return json.dumps(strict_json(data), indent=indent, default=lambda v: strict_json(_default(v)),
                          allow_nan=False)


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, which races with
    other threads creating files); the set-and-restore dance only where /proc cannot tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def make_dir_shared(path: Path | str) -> Path:
    """Give a directory the mode ``mkdir`` would (0o777 less the umask): for directories made by
    ``tempfile.mkdtemp``, which are always 0o700 — a runs root shared by a group must stay
    readable (and writable, with umask 002) by it. Returns the path."""
    path = Path(path)
    os.chmod(path, 0o777 & ~current_umask())
    return path


def mkdtemp_shared(suffix: str | None = None, prefix: str | None = None, dir: Path | str | None = None) -> Path:
    """``tempfile.mkdtemp`` whose directory follows the umask (``make_dir_shared``)."""
    return make_dir_shared(tempfile.mkdtemp(suffix=suffix, prefix=prefix, dir=dir))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write strict JSON so that readers see the old file or the new one, never half of either.
    The file gets the mode the umask gives (not mkstemp's 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps_json(data, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            try:
                os.fchmod(f.fileno(), file_mode())
            except OSError:  # a filesystem without modes (some network or FUSE mounts): its own rule
                pass
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------------
# reading


def read_json_checked(path: Path | str) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None) — or (None, why not): "unreadable: …", "not UTF-8 …",
    "not valid JSON …", "a list, not a JSON object". A missing file is (None, None): a run dir is
    written over time and can be half made. Never raises."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path.name} unreadable: {e.strerror or e}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{path.name} unreadable: not UTF-8 (byte {e.start})"
    if not text.strip():
        return None, f"{path.name} unreadable: empty"
    try:
        data = json.loads(text)  # NaN / Infinity of older files are accepted
    except (ValueError, RecursionError) as e:
        where = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        return None, f"{path.name} unreadable: not valid JSON{where}"
    if not isinstance(data, dict):
        return None, f"{path.name} unreadable: a JSON {type(data).__name__ if data is not None else 'null'}, " \
                     "not an object"
    return data, None


def read_json(path: Path | str) -> dict | None:
    """Read a JSON object; None if it is missing, unreadable, not UTF-8, not JSON or not an object
    (``read_json_checked`` says why)."""
    return read_json_checked(path)[0]


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _clean_summary(summary: Any) -> dict:
    """results.json's summary as a record carries it: a dict, per-task figures numbers only."""
    if not isinstance(summary, dict):
        return {}
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            value = {str(k): _number(v) for k, v in value.items() if _number(v) is not None}
        out[str(key)] = value
    return out


class RunDir:
    """Paths and readers for one run directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._problems: dict[str, str] = {}

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

    def _read(self, path: Path) -> dict | None:
        data, problem = read_json_checked(path)
        if problem:
            self._problems[path.name] = problem
        else:
            self._problems.pop(path.name, None)
        return data

    def problems(self) -> list[str]:
        """Why files read so far could not be used ("status.json unreadable: not UTF-8 (byte 3)")."""
        return list(self._problems.values())

    def info(self) -> dict:
        info = self._read(self.run_json) or {}
        return {**info, "id": self.id} if info.get("id") != self.id else info

    def status(self) -> dict:
        """status.json with the *effective* state (see ``effective_state``). Without a readable
        status.json, a results.json with a final state speaks for the run."""
        status = self._read(self.status_json)
        if status is None:
            results = self.results() or {}
            state = results.get("state")
            status = {"state": state} if state in FINAL_STATES else {"state": "queued"}
        elif not isinstance(status.get("state"), str):
            status["state"] = "queued"
        status["state"] = effective_state(status, self.info())
        return status

    def results(self) -> dict | None:
        return self._read(self.results_json)

    def file_signature(self) -> list:
        """(mtime_ns, size) of status.json and results.json — what changes when a run's state
        does (a finished run resumed, or ending); the index compares it to trust a final record."""
        sig = []
        for path in (self.status_json, self.results_json):
            try:
                st = os.stat(path)
                sig.append([st.st_mtime_ns, st.st_size])
            except OSError:
                sig.append(None)
        return sig

    def record(self) -> dict:
        """The index record for this run, built from the files alone (types checked: a hand-edited
        file gives a record with blanks, never one that breaks a listing)."""
        signature = self.file_signature()
        info = self.info()
        status = self.status()
        results = self.results() or {}
        return {
            "id": self.id,
            "name": _text(info.get("name")) or self.id,
            "plan": _text(info.get("plan_path")),
            "seed": _int(info.get("seed")),
            "variant": _text(info.get("variant")),
            "group": _text(info.get("group")),
            "created": _text(info.get("created")),
            "ended": status.get("ended") if isinstance(status.get("ended"), str) else _number(status.get("ended")),
            "state": status["state"],
            "stage": _int(status.get("stage")),
            "step": _int(status.get("step")),
            "error": _text(status.get("error")),
            "summary": _clean_summary(results.get("summary")),
            # what the index compares to trust a final record without re-reading it (None: not final)
            "files": signature if status["state"] in FINAL_STATES else None,
            **({"problems": self.problems()} if self._problems else {}),
        }


# ---------------------------------------------------------------------------------------------
# liveness: is the process in status.json the run's worker, and is it working?


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


def process_create_time(pid: int) -> float | None:
    """When process `pid` started (epoch seconds, as psutil gives it); None if it is gone."""
    import psutil  # imported here: listing finished runs never needs it

    try:
        return psutil.Process(int(pid)).create_time()
    except (psutil.Error, ValueError, TypeError, OverflowError):
        return None


def process_identity(status: dict) -> str:
    """What the pid in `status` names, on this host:

    - ``"gone"``: no such process (or a zombie);
    - ``"other"``: a process whose start time is not status.json's ``create_time`` (the pid was
      reused: not our worker);
    - ``"stopped"``: our worker, stopped (SIGSTOP, a debugger);
    - ``"ours"``: our worker (or, for a status without ``create_time`` — older runs — a live
      process with that pid).
    """
    try:
        pid = int(status.get("pid") or 0)
    except (TypeError, ValueError):
        return "gone"
    if pid <= 0 or not pid_alive(pid):
        return "gone"
    import psutil

    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        proc_status = proc.status()
    except psutil.NoSuchProcess:
        return "gone"
    except (psutil.Error, OverflowError):  # access denied: it exists, we cannot tell more
        return "ours"
    if proc_status == psutil.STATUS_ZOMBIE:
        return "gone"
    recorded = _number(status.get("create_time"))
    if recorded is not None and abs(created - recorded) > CREATE_TIME_TOLERANCE_S:
        return "other"
    if proc_status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "stopped"
    return "ours"


def is_our_worker(status: dict) -> bool:
    """Whether status.json's pid is, on this host, the process that wrote it (alive or stopped):
    the only process `widen cancel` may signal."""
    same_host = status.get("host", socket.gethostname()) == socket.gethostname()
    return bool(same_host and status.get("pid")) and process_identity(status) in ("ours", "stopped")


def effective_state(status: dict, info: dict | None = None) -> str:
    """The state a person should see. A recorded `queued`/`running` is, on the worker's host,

    - `lost` when its process is gone, or the pid now names another process (create_time differs);
    - `stale` when its process exists but is stopped, or its heartbeat is older than
      HEARTBEAT_STALE_S (hung);
    - as recorded otherwise. On another host (the pid means nothing here) a stale heartbeat is
      `lost`. A status without create_time (older runs) is judged by its pid alone.
    """
    state = status.get("state", "queued")
    if not isinstance(state, str):
        state = "queued"
    if state not in RUNNING_STATES:
        return state
    same_host = status.get("host", socket.gethostname()) == socket.gethostname()
    heartbeat = status.get("heartbeat") or (info or {}).get("created_ts") or 0
    try:
        heartbeat = float(heartbeat)
    except (TypeError, ValueError):  # not epoch seconds: as good as none, rather than crash a listing
        heartbeat = 0.0
    if not math.isfinite(heartbeat):
        heartbeat = 0.0
    stale = time.time() - heartbeat > HEARTBEAT_STALE_S
    if same_host and status.get("pid"):
        identity = process_identity(status)
        if identity in ("gone", "other"):
            return "lost"
        if identity == "stopped" or (stale and heartbeat):
            return "stale"
        return state
    if state == "queued" and not status.get("pid"):
        # Not started yet: only lost if it never started for a long while.
        return "lost" if stale and heartbeat else state
    return "lost" if stale else state


def list_run_dirs(root: Path | None = None) -> list[RunDir]:
    """The run directories under `root` (those with a run.json), by id. Hidden directories (a run
    being created, ``.new-<id>``) are not runs."""
    root = Path(root) if root else runs_root()
    try:
        entries = list(root.iterdir())
    except OSError:  # missing, not a directory, unreadable
        return []
    return sorted((RunDir(p) for p in entries if not p.name.startswith(".") and (p / "run.json").exists()),
                  key=lambda r: r.id)
