"""The runs index follows the run dirs: a finished run that is resumed shows as running (and,
once it ends again, with its new figures); listing works on a runs root it cannot write; a run
dir is created whole or not at all."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from engine.errors import RunCreateError, WidenError
from engine.runs.rundir import RunDir, list_run_dirs, write_json_atomic
from widen_tui.index import IndexWriteError, RunIndex


def make_run(root: Path, run_id: str, state: str = "done", ppl: float | None = 20.0) -> RunDir:
    run = RunDir(root / run_id)
    write_json_atomic(run.run_json, {"id": run_id, "name": run_id, "created": "2025-01-01T00:00:00"})
    set_state(run, state, ppl)
    return run


def set_state(run: RunDir, state: str, ppl: float | None = None) -> None:
    live = state in ("queued", "running")
    status = {"state": state, "host": socket.gethostname(), "heartbeat": time.time(),
              "pid": os.getpid() if live else 12345}
    if live:
        status["create_time"] = psutil.Process().create_time()
    else:
        status["ended"] = time.time()
    write_json_atomic(run.status_json, status)
    if ppl is not None:
        write_json_atomic(run.results_json, {"state": state, "summary": {"final_ppl": {"prose": ppl}}})
    # the index compares mtime and size: make sure a rewrite within one clock tick is seen
    bump = time.time() + (run._bumps if hasattr(run, "_bumps") else 0)
    run._bumps = getattr(run, "_bumps", 0) + 1
    for path in (run.status_json, run.results_json):
        if path.exists():
            os.utime(path, (bump, bump))


def test_a_resumed_run_is_not_trusted_as_finished(tmp_path):
    run = make_run(tmp_path, "r1", "cancelled", ppl=30.0)
    index = RunIndex(tmp_path)
    assert index.refresh()[0]["state"] == "cancelled"

    set_state(run, "running")  # resumed: the worker writes its status; results.json is the old one
    record = index.refresh()[0]
    assert record["state"] == "running"

    set_state(run, "done", ppl=12.0)  # and ends again, with new results
    record = index.refresh()[0]
    assert record["state"] == "done" and record["summary"]["final_ppl"] == {"prose": 12.0}
    assert index.get("r1")["state"] == "done"


def test_resuming_through_the_launcher_updates_the_index_at_once(tmp_path, monkeypatch):
    import widen_tui.launcher as launcher

    run = make_run(tmp_path, "r1", "cancelled")
    index = RunIndex(tmp_path)
    index.refresh()
    (run.checkpoints / "latest").mkdir(parents=True)
    real_popen = subprocess.Popen
    monkeypatch.setattr(launcher.subprocess, "Popen",
                        lambda args, **kw: real_popen([sys.executable, "-c", "import time; time.sleep(30)"], **kw))
    monkeypatch.setattr(launcher, "_await_run_lock", lambda proc, run: None, raising=False)
    pid = launcher.start_worker(run, resume=True)
    try:
        assert index.get("r1")["state"] == "queued"  # without a refresh
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_update_run_is_the_helper_for_any_caller(tmp_path):
    run = make_run(tmp_path, "r1", "failed", ppl=None)
    index = RunIndex(tmp_path)
    index.refresh()
    set_state(run, "running")
    assert index.update_run(run)["state"] == "running"
    assert index.get("r1")["state"] == "running"


def test_finished_runs_cost_one_stat_each_and_are_not_rewritten(tmp_path):
    for i in range(300):
        make_run(tmp_path, f"r{i:04d}", "done")
    index = RunIndex(tmp_path)
    index.refresh()
    inode = index.path.stat().st_ino
    started = time.perf_counter()
    records = index.refresh()
    elapsed = time.perf_counter() - started
    assert len(records) == 300 and index.path.stat().st_ino == inode  # nothing re-read or written
    assert elapsed < 1.0, f"refresh of 300 finished runs took {elapsed:.3f}s"


# -- a runs root that cannot be written ------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class _ReadOnlyLock:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        raise OSError(errno.EROFS, "Read-only file system")

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("failure", ["full disk", "read-only"])
def test_listing_works_when_the_index_cannot_be_written(tmp_path, monkeypatch, failure):
    import widen_tui.index as registry

    make_run(tmp_path, "r1", "done", ppl=11.0)
    make_run(tmp_path, "r2", "running")
    if failure == "full disk":
        monkeypatch.setattr(registry, "write_json_atomic", _no_space)
    else:
        monkeypatch.setattr(registry, "FileLock", _ReadOnlyLock)
    index = RunIndex(tmp_path)
    records = index.refresh()
    assert [(r["id"], r["state"]) for r in records] == [("r1", "done"), ("r2", "running")]
    assert index.write_error and "cannot write the runs index" in index.write_error
    assert not index.path.exists()

    from widen_tui.cli import app

    env = {"WIDEN_HOME": str(tmp_path)}
    result = CliRunner().invoke(app, ["runs"], env=env)
    assert result.exit_code == 0, result.output
    assert "r1" in result.stdout and "r2" in result.stdout
    result = CliRunner().invoke(app, ["show", "r1"], env=env)
    assert result.exit_code == 0 and "r1" in result.stdout
    result = CliRunner().invoke(app, ["db", "rebuild"], env=env)
    assert isinstance(result.exception, IndexWriteError) and isinstance(result.exception, WidenError)
    message = str(result.exception)
    assert "\n" not in message and "cannot write the runs index" in message and "free space" in message


# -- a run dir is made whole or not at all ---------------------------------------------------------


def _plan():
    from engine.plan import plan_from_dict

    return plan_from_dict({"name": "tiny", "model": {"source": "builtin:tiny-neo"},
                           "tasks": {"prose": {"source": "builtin:pydoc"}},
                           "stages": [{"task": "prose", "steps": 1}]})


@pytest.mark.parametrize("where", ["run.json", "rename", "index"])
def test_create_run_on_a_full_disk_leaves_nothing_half_made(tmp_path, monkeypatch, where):
    import widen_tui.index as registry
    import widen_tui.launcher as launcher

    if where == "run.json":
        monkeypatch.setattr(launcher, "write_json_atomic", _no_space)
    elif where == "rename":
        monkeypatch.setattr(launcher.os, "rename", _no_space)
    else:
        monkeypatch.setattr(registry, "write_json_atomic", _no_space)
    root = tmp_path / "runs"
    with pytest.raises(RunCreateError) as caught:
        launcher.create_run(_plan(), None, root)
    message = str(caught.value)
    assert message.startswith("cannot create the run: No space left on device") and f"free space in {root}" in message
    assert [p.name for p in root.iterdir() if not p.name.startswith("index.json")] == []


def test_create_run_builds_in_a_hidden_dir_that_listings_skip(tmp_path):
    from widen_tui.launcher import create_run

    root = tmp_path / "runs"
    run = create_run(_plan(), None, root)
    assert run.exists() and (run.plan).exists()
    assert not any(p.name.startswith(".new-") for p in root.iterdir())
    half = root / ".new-20250101-000000-half-made-0000"
    half.mkdir()
    (half / "run.json").write_text('{"id": "x"}')
    assert [r.id for r in list_run_dirs(root)] == [run.id]
    assert [r["id"] for r in RunIndex(root).refresh()] == [run.id]


def test_a_group_is_created_whole_or_not_at_all(tmp_path, monkeypatch):
    import widen_tui.launcher as launcher
    from engine.plan import plan_from_dict

    plan = plan_from_dict({"name": "tiny", "model": {"source": "builtin:tiny-neo"},
                           "tasks": {"prose": {"source": "builtin:pydoc"}},
                           "stages": [{"task": "prose", "steps": 1}],
                           "variants": [{"name": "a", "stages": [{"task": "prose", "steps": 1}]},
                                        {"name": "b", "stages": [{"task": "prose", "steps": 1}]}]})
    real, made = launcher.create_run, []

    def second_fails(*args, **kwargs):
        if made:
            raise RunCreateError("cannot create the run: No space left on device — free space in x")
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(launcher, "create_run", second_fails)
    root = tmp_path / "runs"
    with pytest.raises(RunCreateError):
        launcher.create_runs(plan, None, root=root)
    assert len(made) == 1 and not made[0].path.exists()
    assert list_run_dirs(root) == [] and RunIndex(root).all() == []


def test_rebuild_removes_run_dirs_a_killed_launcher_left_half_made(tmp_path):
    make_run(tmp_path, "r1")
    old, young = tmp_path / ".new-old", tmp_path / ".new-young"
    for half in (old, young):
        half.mkdir()
        (half / "plan.toml").write_text("")
    long_ago = time.time() - 3600
    os.utime(old, (long_ago, long_ago))
    assert RunIndex(tmp_path).rebuild() == 1
    assert not old.exists() and young.exists()  # a young one may be a launcher at work
