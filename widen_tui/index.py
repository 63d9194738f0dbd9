"""The runs index: a TinyDB file at ``<runs root>/index.json`` with one record per run.

The run directories are the truth (``engine.runs.rundir``); this index only makes listing fast, and
``rebuild()`` recreates it from them at any time. Several CLIs, TUIs and shells may share one runs
root (possibly over a shared filesystem), so:

- every read-modify-write holds ``index.json.lock`` (a kernel ``flock``: a killed holder releases it);
- TinyDB is opened inside the lock and closed after, never cached, so nobody writes from a stale copy;
- the file is replaced atomically, so lock-free readers see the old index or the new one, never half;
- listing works read-only: where the index cannot be written (a read-only or full runs root),
  ``refresh()`` returns the records it read from the run dirs and leaves the file as it is.

Imports nothing heavy: ``widen runs`` must start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from engine.errors import WidenError
from engine.runs.rundir import FINAL_STATES, RunDir, file_mode, list_run_dirs, runs_root, write_json_atomic

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
LOCK_TIMEOUT_S = 30.0
HALF_MADE_AGE_S = 600.0  # a `.new-<id>` run dir this old belongs to no live launcher: rebuild removes it


class RunNotFound(WidenError, ValueError):
    """A run reference that names no run, or more than one."""


class IndexWriteError(WidenError, OSError):
    """The runs index cannot be written (a read-only or full runs root)."""


class AtomicJSONStorage(Storage):
    """TinyDB storage: reads the JSON file, writes it through temp file + fsync + ``os.replace``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def read(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            log.debug("unreadable runs index %s: %s", self.path, e)
            return None
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            # Corrupt (hand-edited, or written by something else): read as empty; rebuild() mends it.
            log.debug("corrupt runs index %s; reading it as empty", self.path)
            return None
        # Valid JSON of the wrong shape would crash TinyDB later: treat it as corrupt too.
        tables = data.values() if isinstance(data, dict) else [None]
        if not all(isinstance(t, dict) and all(isinstance(d, dict) for d in t.values()) for t in tables):
            return None
        return data

    def write(self, data: dict) -> None:
        write_json_atomic(self.path, data)

    def close(self) -> None:
        pass  # nothing held open between calls


class _RunsTable(Table):
    """A table whose document ids are the run ids: the file reads ``{"runs": {"<id>": {...}}}``."""

    document_id_class = str

    def put(self, records: dict[str, dict], *, replace_all: bool = False) -> None:
        """Set whole documents in one read-modify-write (TinyDB's upsert may write twice, and merges)."""

        def update(table: dict) -> None:
            if replace_all:
                table.clear()
            table.update({rid: dict(r) for rid, r in records.items()})

        self._update_table(update)


class _RunsDB(TinyDB):
    table_class = _RunsTable
    default_table_name = "runs"


def _order(record: dict) -> tuple[str, str]:
    # `created` is ISO-8601 text, which sorts chronologically; runs without one sort first.
    created = record.get("created")
    return ("" if created is None else str(created), str(record.get("id")))


class RunIndex:
    """The TinyDB index of the runs under ``root``. Cheap to construct; holds no open files."""

    def __init__(self, root: Path | str | None = None, *, lock_timeout: float = LOCK_TIMEOUT_S):
        self.root = Path(root) if root is not None else runs_root()
        self.path = self.root / INDEX_NAME
        self.lock_path = self.root / (INDEX_NAME + ".lock")
        self.lock_timeout = lock_timeout
        self.write_error: str | None = None  # why the last refresh could not write the index

    # -- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _table(self, write: bool) -> Iterator[_RunsTable]:
        """The runs table, freshly opened; for writers, inside the cross-process lock."""
        lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
            # the umask's mode (not filelock's 0o644): a runs root shared by a group stays shared
            lock = FileLock(self.lock_path, timeout=self.lock_timeout, mode=file_mode())
        with lock, _RunsDB(self.path, storage=AtomicJSONStorage) as db:
            yield db.table(db.default_table_name)

    @staticmethod
    def _docs(table: _RunsTable) -> dict[str, dict]:
        return {str(doc.doc_id): dict(doc) for doc in table}

    def _read_docs(self) -> dict[str, dict]:
        """The records as the file holds them, lock-free (never writes; empty when unreadable)."""
        try:
            with self._table(write=False) as table:
                return self._docs(table)
        except OSError:
            return {}

    # -- reads (lock-free: the file is only ever replaced whole) -------------------------------

    def get(self, run_id: str) -> dict | None:
        with self._table(write=False) as table:
            doc = table.get(doc_id=run_id)
        return dict(doc) if doc is not None else None

    def all(self) -> list[dict]:
        """Every record, oldest first (by created, then id)."""
        with self._table(write=False) as table:
            return sorted(self._docs(table).values(), key=_order)

    # -- writes -------------------------------------------------------------------------------

    def upsert(self, record: dict) -> None:
        """Insert or replace the record of run ``record["id"]``."""
        run_id = record.get("id")
        if not run_id:
            raise ValueError("a run record needs an 'id'")
        with self._table(write=True) as table:
            if table.get(doc_id=run_id) != record:  # an unchanged record costs no write
                table.put({run_id: record})

    def remove(self, run_id: str) -> None:
        with self._table(write=True) as table:
            if table.contains(doc_id=run_id):
                table.remove(doc_ids=[run_id])

    def refresh(self) -> list[dict]:
        """Bring the index up to date with the run dirs, cheaply, and return ``all()``.

        Records of unfinished runs are re-read from their dirs (a dead worker shows as ``lost``);
        run dirs missing from the index are added; records whose dir is gone are dropped.
        A finished run's record is trusted as long as its status.json and results.json are the
        files it was read from (same mtime and size: one ``stat`` each); a run resumed since, or
        rewritten by hand, is re-read.

        Where the index cannot be written (read-only or full runs root), the records are read
        from the run dirs all the same and returned; ``write_error`` says why nothing was saved.
        """
        if not self.root.is_dir():
            return []
        self.write_error = None
        try:
            with self._table(write=True) as table:
                current = self._docs(table)
                fresh = self._fresh(current)
                if fresh != current:
                    table.put(fresh, replace_all=True)
        except OSError as e:
            self.write_error = f"cannot write the runs index {self.path}: {e.strerror or e}"
            log.debug("%s", self.write_error)
            fresh = self._fresh(self._read_docs())
        return sorted(fresh.values(), key=_order)

    def _fresh(self, current: dict[str, dict]) -> dict[str, dict]:
        fresh = {}
        for run in list_run_dirs(self.root):
            old = current.get(run.id)
            trusted = (old is not None and old.get("state") in FINAL_STATES and old.get("files") is not None
                       and old.get("files") == run.file_signature())
            fresh[run.id] = old if trusted else run.record()
        return fresh

    def rebuild(self) -> int:
        """Replace the whole index with records read from the run dirs; returns how many.
        Raises ``IndexWriteError`` (one line) when the index cannot be written."""
        try:
            with self._table(write=True) as table:
                records = {run.id: run.record() for run in list_run_dirs(self.root)}
                table.put(records, replace_all=True)
                self._sweep_temp_files()
        except OSError as e:
            raise IndexWriteError(f"cannot write the runs index {self.path}: {e.strerror or e} — "
                                  f"free space in {self.root} or make it writable") from None
        return len(records)

    def update_run(self, run: RunDir) -> dict:
        """Re-read one run's record from its directory and index it (after a resume, a cancel, or
        anything else that changes a run): returns the record. A read-only or full runs root
        leaves the index as it is (the next refresh reads the dir anyway)."""
        record = run.record()
        try:
            self.upsert(record)
        except OSError as e:
            log.debug("cannot index %s: %s", run.id, e)
        return record

    def _sweep_temp_files(self, min_age_s: float = 60.0) -> None:
        # A writer killed mid-write leaves its temp file behind. We hold the lock, so no live writer
        # owns one; the age check spares a writer on a host whose lock we might not see (odd NFS).
        for tmp in self.root.glob(f".{INDEX_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > min_age_s:
                    tmp.unlink()
        # a launcher killed while it built a run dir (``.new-<id>``, renamed into place when whole)
        for half in self.root.glob(".new-*"):
            with contextlib.suppress(OSError):
                if half.is_dir() and time.time() - half.stat().st_mtime > HALF_MADE_AGE_S:
                    shutil.rmtree(half)

    # -- names ---------------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The run id meant by ``ref``: an exact id, "last"/"latest", a unique id prefix, or a
        unique piece of a run's name. A miss re-reads the run dirs once (a run just launched
        elsewhere may not be indexed yet). Raises ``RunNotFound`` with a one-line message."""
        ref = ref.strip()
        if not ref:
            raise RunNotFound("empty run reference — see `widen runs`")
        for records in (self.all, self.refresh):
            matches = _match(records(), ref)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                shown = ", ".join(matches[:5]) + (", …" if len(matches) > 5 else "")
                raise RunNotFound(f"'{ref}' matches {len(matches)} runs: {shown} — give more of the id")
        raise RunNotFound(f"no run '{ref}' in {self.root} — see `widen runs`")


def _match(records: list[dict], ref: str) -> list[str]:
    """Candidate ids for ``ref`` in ``records`` (sorted oldest first), by the first rule that hits."""
    ids = [r["id"] for r in records]
    if ref in ids:
        return [ref]
    if ref.lower() in ("last", "latest"):
        return ids[-1:]
    if prefixed := [i for i in ids if i.startswith(ref)]:
        return prefixed
    needle = ref.casefold()
    names = [(r["id"], str(r.get("name") or "").casefold()) for r in records]
    # A name given in full beats runs whose names merely contain it ("mlp" vs "mlp-wide").
    return [i for i, n in names if n == needle] or [i for i, n in names if needle in n]
