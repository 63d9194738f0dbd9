"""status.json from the worker's side: state, pid and start time, host, heartbeat, progress.

A thread keeps the heartbeat fresh while the main thread is busy (a long evaluation must not look
like a dead worker). Readers are in ``engine.runs.rundir`` (``effective_state``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from engine.runs.rundir import dumps_json, process_create_time, write_json_atomic

HEARTBEAT_S = 5.0


def identity() -> dict:
    """The fields that name this worker process: readers check them before they trust or signal it."""
    return {"pid": os.getpid(), "create_time": process_create_time(os.getpid()), "host": socket.gethostname()}


class StatusFile:
    def __init__(self, path: Path, world_size: int = 1):
        self.path = path
        self.data = {"state": "running", **identity(), "world_size": world_size, "started": time.time(),
                     "heartbeat": time.time()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.write()
            except OSError:  # a full disk: the main thread reports it; keep beating when space returns
                pass

    def write(self, **fields):
        with self._lock:
            self.data.update(fields, heartbeat=time.time())
            write_json_atomic(self.path, self.data)

    def close(self, **fields):
        """The final write; it gets through a full disk (see ``record_ending``)."""
        self._stop.set()
        with self._lock:
            self.data.update(fields, heartbeat=time.time())
            record_ending(self.path, self.data)


def record_ending(path: Path, data: dict) -> None:
    """Write a final status. With no room for a temporary copy (a full disk) overwrite in place,
    which needs no new blocks for a file this small, so the ending is still recorded."""
    try:
        write_json_atomic(path, data)
    except OSError:
        with open(path, "r+" if path.exists() else "w") as f:
            text = dumps_json(data)
            f.write(text)
            f.truncate(len(text))
            f.flush()
            os.fsync(f.fileno())
