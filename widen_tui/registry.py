"""The runs index: a TinyDB file at ``<runs root>/index.json`` with one record per run.

The run directories are the truth (``engine.rundir``); this index only makes listing fast, and
``rebuild()`` recreates it from them at any time. Several CLIs, TUIs and shells may share one runs
root (possibly over a shared filesystem), so:

- every read-modify-write holds ``index.json.lock`` (a kernel ``flock``: a killed holder releases it);
- TinyDB is opened inside the lock and closed after, never cached, so nobody writes from a stale copy;
- the file is replaced atomically, so lock-free readers see the old index or the new one, never half.

Imports nothing heavy: ``widen runs`` must start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from engine.errors import WidenError
from engine.rundir import FINAL_STATES, RunDir, list_run_dirs, runs_root, write_json_atomic

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
LOCK_TIMEOUT_S = 30.0


class RunNotFound(WidenError, ValueError):
    """A run reference that names no run, or more than one."""


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

    # -- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _table(self, write: bool) -> Iterator[_RunsTable]:
        """The runs table, freshly opened; for writers, inside the cross-process lock."""
        lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.lock_path, timeout=self.lock_timeout)
        with lock, _RunsDB(self.path, storage=AtomicJSONStorage) as db:
            yield db.table(db.default_table_name)

    @staticmethod
    def _docs(table: _RunsTable) -> dict[str, dict]:
        return {str(doc.doc_id): dict(doc) for doc in table}

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
        Finished runs are trusted as indexed: their files no longer change.
        """
        if not self.root.is_dir():
            return []
        with self._table(write=True) as table:
            current = self._docs(table)
            fresh = {}
            for run in list_run_dirs(self.root):
                old = current.get(run.id)
                final = old is not None and old.get("state") in FINAL_STATES
                fresh[run.id] = old if final else run.record()
            if fresh != current:
                table.put(fresh, replace_all=True)
        return sorted(fresh.values(), key=_order)

    def rebuild(self) -> int:
        """Replace the whole index with records read from the run dirs; returns how many."""
        with self._table(write=True) as table:
            records = {run.id: run.record() for run in list_run_dirs(self.root)}
            table.put(records, replace_all=True)
            self._sweep_temp_files()
        return len(records)

    def _sweep_temp_files(self, min_age_s: float = 60.0) -> None:
        # A writer killed mid-write leaves its temp file behind. We hold the lock, so no live writer
        # owns one; the age check spares a writer on a host whose lock we might not see (odd NFS).
        for tmp in self.root.glob(f".{INDEX_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > min_age_s:
                    tmp.unlink()

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
