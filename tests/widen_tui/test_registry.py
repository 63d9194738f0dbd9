"""The runs index (widen_tui.index): records, names, refresh from run dirs, and safety under
concurrent writers and writers killed mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.runs.rundir import RunDir, write_json_atomic
from widen_tui.index import RunIndex, RunNotFound

REPO = Path(__file__).resolve().parents[2]


def make_run(root: Path, run_id: str, *, name: str | None = None, created: str | None = None,
             state: str = "done", pid: int | None = None, summary: dict | None = None) -> RunDir:
    """A fake run dir, written the way the launcher and the worker write theirs."""
    run = RunDir(root / run_id)
    name = name or run_id
    write_json_atomic(run.run_json, {"id": run_id, "name": name, "plan_path": f"experiments/{name}.toml",
                                     "seed": 0, "created": created or "2025-01-01T00:00:00"})
    set_status(run, state, pid=pid)
    if summary is not None:
        write_json_atomic(run.results_json, {"summary": summary})
    return run


def set_status(run: RunDir, state: str, pid: int | None = None) -> None:
    ended = "2025-01-01T01:00:00" if state in ("done", "failed", "cancelled") else None
    write_json_atomic(run.status_json, {"state": state, "pid": pid, "host": socket.gethostname(),
                                        "heartbeat": time.time(), "ended": ended})


def record(run_id: str, created: str = "2025-01-01T00:00:00", name: str | None = None, **kw) -> dict:
    rec = {"id": run_id, "name": name or run_id, "plan": None, "state": "done", "created": created,
           "ended": None, "seed": 0, "stage": None, "step": None, "error": None, "summary": {}}
    return rec | kw


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def run_python(code: str, *args: str, **kw) -> subprocess.Popen:
    """A separate Python process running ``code`` with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env, **kw)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


# -- records -------------------------------------------------------------------------------------


def test_upsert_get_all_remove(root):
    index = RunIndex(root)
    assert index.all() == [] and index.get("a") is None  # no root, no index: empty, nothing created
    assert not root.exists()

    index.upsert(record("b", created="2025-01-02T00:00:00"))
    index.upsert(record("c", created="2025-01-01T00:00:00"))
    index.upsert(record("a", created="2025-01-02T00:00:00"))
    assert [r["id"] for r in index.all()] == ["c", "a", "b"]  # by created, then id

    index.upsert(record("a", created="2025-01-02T00:00:00", state="failed", error="boom"))
    assert index.get("a") == record("a", created="2025-01-02T00:00:00", state="failed", error="boom")
    assert len(index.all()) == 3

    # The file is plain TinyDB JSON keyed by run id.
    assert set(json.loads(index.path.read_text())["runs"]) == {"a", "b", "c"}

    index.remove("a")
    index.remove("a")  # already gone: no error
    assert index.get("a") is None
    assert [r["id"] for r in index.all()] == ["c", "b"]

    with pytest.raises(ValueError):
        index.upsert({"name": "no id"})


def test_unchanged_upsert_and_refresh_do_not_write(root):
    make_run(root, "r1", state="running", pid=os.getpid())
    index = RunIndex(root)
    index.refresh()
    inode = index.path.stat().st_ino  # every write replaces the file, so a new inode
    index.refresh()
    index.upsert(index.get("r1"))
    assert index.path.stat().st_ino == inode


# -- names ---------------------------------------------------------------------------------------


def test_resolve(root):
    index = RunIndex(root)
    index.upsert(record("20250101-mlp-ab12", created="2025-01-01T00:00:00", name="mlp"))
    index.upsert(record("20250102-mlp-cd34", created="2025-01-02T00:00:00", name="mlp-wide"))
    index.upsert(record("20250103-gpt-ef56", created="2025-01-03T00:00:00", name="gpt-tiny"))
    index.upsert(record("20250103", created="2024-12-31T00:00:00", name="odd"))

    assert index.resolve("20250102-mlp-cd34") == "20250102-mlp-cd34"
    assert index.resolve("20250103") == "20250103"  # exact id beats a prefix of another id
    assert index.resolve("20250101") == "20250101-mlp-ab12"  # unique prefix
    assert index.resolve("last") == index.resolve("latest") == "20250103-gpt-ef56"
    assert index.resolve("TINY") == "20250103-gpt-ef56"  # unique piece of a name
    assert index.resolve("mlp") == "20250101-mlp-ab12"  # a full name beats names containing it
    assert index.resolve("wide") == "20250102-mlp-cd34"

    with pytest.raises(RunNotFound, match=r"^'2025010' matches 4 runs: .* — give more of the id$"):
        index.resolve("2025010")
    with pytest.raises(RunNotFound) as err:
        index.resolve("m")
    assert str(err.value) == "'m' matches 2 runs: 20250101-mlp-ab12, 20250102-mlp-cd34 — give more of the id"
    with pytest.raises(RunNotFound) as err:
        index.resolve("nope")
    assert str(err.value) == f"no run 'nope' in {root} — see `widen runs`"
    assert isinstance(err.value, ValueError)
    with pytest.raises(RunNotFound):
        index.resolve("  ")


def test_resolve_finds_a_run_not_yet_indexed(root):
    index = RunIndex(root)
    with pytest.raises(RunNotFound, match="no run 'last'"):
        index.resolve("last")
    make_run(root, "20250105-new", name="fresh")
    assert index.resolve("fresh") == "20250105-new"
    assert index.get("20250105-new")["name"] == "fresh"


# -- refresh and rebuild from run dirs -----------------------------------------------------------


def test_refresh_follows_the_run_dirs(root):
    live = make_run(root, "a", created="2025-01-01T00:00:00", state="running", pid=os.getpid())
    make_run(root, "b", created="2025-01-02T00:00:00", state="done", summary={"loss": 1.5})
    index = RunIndex(root)
    assert [(r["id"], r["state"]) for r in index.refresh()] == [("a", "running"), ("b", "done")]
    assert index.get("b") == RunDir(root / "b").record()
    assert index.get("b")["summary"] == {"loss": 1.5}

    set_status(live, "done", pid=os.getpid())  # the worker finished
    write_json_atomic(live.results_json, {"summary": {"loss": 0.25}})
    make_run(root, "c", created="2025-01-03T00:00:00", state="queued")  # launched by another shell
    records = {r["id"]: r for r in index.refresh()}
    assert records["a"]["state"] == "done" and records["a"]["summary"] == {"loss": 0.25}
    assert records["c"]["state"] == "queued"
    assert records == {r["id"]: r for r in index.all()}

    # A finished run is trusted as indexed while its status/results files stay as they were read;
    # once its status.json says otherwise (it was resumed), it is re-read.
    set_status(RunDir(root / "b"), "running", pid=os.getpid())
    assert index.refresh()[1]["state"] == "running"

    # A run dir that vanished drops its record.
    (root / "c" / "run.json").unlink()
    assert [r["id"] for r in index.refresh()] == ["a", "b"]


def test_refresh_marks_a_dead_worker_lost(root):
    make_run(root, "r", state="running", pid=dead_pid())
    index = RunIndex(root)
    index.upsert(record("r", state="running"))  # as the launcher indexed it
    assert index.refresh()[0]["state"] == "lost"
    assert index.get("r")["state"] == "lost"


def test_rebuild_after_the_index_is_deleted(root):
    for i in range(5):
        make_run(root, f"r{i}", created=f"2025-01-0{i + 1}T00:00:00")
    index = RunIndex(root)
    assert index.rebuild() == 5
    index.path.unlink()
    assert index.all() == []
    assert index.rebuild() == 5
    assert [r["id"] for r in index.all()] == [f"r{i}" for i in range(5)]
    assert index.all() == [RunDir(root / f"r{i}").record() for i in range(5)]


@pytest.mark.parametrize("garbage", [b"\x00\xff{not json", b'{"runs": {"r0": ', b"", b"[1, 2]",
                                     b'{"runs": {"r0": 3}}'])
def test_a_corrupt_index_reads_as_empty_and_rebuild_mends_it(root, garbage, caplog):
    for i in range(3):
        make_run(root, f"r{i}")
    index = RunIndex(root)
    index.rebuild()
    index.path.write_bytes(garbage)
    caplog.set_level("INFO")
    assert index.all() == [] and index.get("r0") is None
    with pytest.raises(RunNotFound):
        RunIndex(root / "elsewhere").resolve("r0")
    assert not [r for r in caplog.records if r.name.startswith("widen_tui")]  # nothing noisy
    assert index.rebuild() == 3
    assert [r["id"] for r in index.all()] == ["r0", "r1", "r2"]
    index.path.write_bytes(garbage)
    assert len(index.refresh()) == 3  # refresh mends it too: every run dir is "new"


def test_rebuild_sweeps_temp_files_of_killed_writers(root):
    make_run(root, "r0")
    root.joinpath(".index.json.abc.tmp").write_text('{"runs": {"r0"')
    old = time.time() - 3600
    os.utime(root / ".index.json.abc.tmp", (old, old))
    root.joinpath(".index.json.new.tmp").write_text("{}")  # might be a live writer's: spared
    RunIndex(root).rebuild()
    assert sorted(p.name for p in root.glob(".index.json.*")) == [".index.json.new.tmp"]


# -- many processes ------------------------------------------------------------------------------


def test_concurrent_writers(root):
    n_procs, n_own = 6, 25
    start_at = time.time() + 1.0  # all start together, after their imports
    code = f"""
        import sys, time
        from widen_tui.index import RunIndex
        w = int(sys.argv[1])
        index = RunIndex({str(root)!r})
        time.sleep(max(0.0, {start_at} - time.time()))
        for i in range({n_own}):
            index.upsert({{"id": f"w{{w}}-{{i:02d}}", "name": "own", "state": "running",
                          "created": f"2025-01-01T00:{{w:02d}}:{{i:02d}}"}})
            index.upsert({{"id": "shared", "name": "shared", "state": "running", "step": w * 1000 + i}})
    """
    procs = [run_python(code, str(w)) for w in range(n_procs)]
    for p in procs:
        assert p.wait(timeout=60) == 0

    data = json.loads((root / "index.json").read_text())  # valid JSON
    index = RunIndex(root)
    ids = {r["id"] for r in index.all()}
    assert len(ids) == n_procs * n_own + 1
    assert ids == {f"w{w}-{i:02d}" for w in range(n_procs) for i in range(n_own)} | {"shared"}
    assert set(data["runs"]) == ids
    assert index.get("shared")["step"] % 1000 < n_own
    assert not list(root.glob(".index.json.*.tmp"))  # no writer left a temp file behind


def test_a_writer_killed_mid_write_leaves_a_whole_index_and_no_stuck_lock(root, tmp_path):
    index = RunIndex(root, lock_timeout=5)
    written: set[str] = {"seed"}
    index.upsert(record("seed"))
    rng = random.Random()
    for round_ in range(6):
        log = tmp_path / f"writer{round_}.log"
        # A biggish summary makes each write take a while, so kills often land inside one.
        code = f"""
            import sys
            from widen_tui.index import RunIndex
            index = RunIndex({str(root)!r})
            summary = {{f"metric{{k}}": k / 7 for k in range(300)}}
            for i in range(100000):
                rid = "k{round_}-%05d" % i
                index.upsert({{"id": rid, "name": "k", "state": "running", "summary": summary}})
                print(rid, flush=True)  # printed = the upsert returned
        """
        with open(log, "w") as out:
            proc = run_python(code, stdout=out)
        deadline = time.time() + 30
        while not log.read_text() and time.time() < deadline:  # wait for the imports and a first write
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        written |= set(log.read_text().split())

        json.loads(index.path.read_text())  # parses: old file or new, never torn
        assert written <= {r["id"] for r in index.all()}  # nothing finished before the kill is lost
        t0 = time.monotonic()
        index.upsert(record(f"after{round_}"))  # the killed writer's lock went with it
        assert time.monotonic() - t0 < 5
        written.add(f"after{round_}")
    assert len(written) > 6 + 1 + 6  # the writer really did write between kills


def test_a_lock_holder_killed_does_not_block_the_next_writer(root):
    index = RunIndex(root, lock_timeout=5)
    index.upsert(record("a"))
    holder = run_python(f"""
        import time
        from filelock import FileLock
        with FileLock({str(index.lock_path)!r}):
            print("held", flush=True)
            time.sleep(60)
    """, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    holder.stdout.close()
    t0 = time.monotonic()
    index.upsert(record("b"))
    assert time.monotonic() - t0 < 5
    assert [r["id"] for r in index.all()] == ["a", "b"]
