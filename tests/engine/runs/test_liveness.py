"""Liveness by process identity: a status.json's pid counts as the run's worker only while the
process with that pid is the one that wrote it (same start time, psutil's create_time). A reused
pid is `lost` and never signalled; a stopped or silent worker is `stale`; a finished run whose
status.json is gone or broken keeps the state its results.json records."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from engine.runs.rundir import HEARTBEAT_STALE_S, RunDir, effective_state, is_our_worker, write_json_atomic
from widen_tui.index import RunIndex
from widen_tui.launcher import cancel


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def make_run(root: Path, status: dict | None, results: dict | None = None, run_id: str = "r1") -> RunDir:
    run = RunDir(root / run_id)
    write_json_atomic(run.run_json, {"id": run_id, "name": run_id, "created": "2025-01-01T00:00:00",
                                     "created_ts": time.time()})
    if status is not None:
        write_json_atomic(run.status_json, status)
    if results is not None:
        write_json_atomic(run.results_json, results)
    return run


def worker_status(proc, *, create_time: float | None = None, heartbeat: float | None = None,
                  state: str = "running") -> dict:
    status = {"state": state, "pid": proc.pid, "host": socket.gethostname(),
              "heartbeat": time.time() if heartbeat is None else heartbeat}
    if create_time is not None:
        status["create_time"] = create_time
    return status


def survives(proc, seconds: float = 0.3) -> bool:
    time.sleep(seconds)
    return proc.poll() is None


def test_our_worker_is_running_and_cancel_signals_it(tmp_path, sleeper):
    run = make_run(tmp_path, worker_status(sleeper, create_time=psutil.Process(sleeper.pid).create_time()))
    assert run.status()["state"] == "running"
    assert is_our_worker(run.status())
    assert cancel(run) == "cancel requested"
    assert run.cancel_request.exists()
    sleeper.wait(timeout=5)
    assert sleeper.returncode == -signal.SIGTERM


def test_a_reused_pid_is_lost_and_cancel_sends_no_signal(tmp_path, sleeper):
    """status.json names a live pid, but that process started at another time: not our worker."""
    wrong = psutil.Process(sleeper.pid).create_time() - 3600.0
    run = make_run(tmp_path, worker_status(sleeper, create_time=wrong))
    assert run.status()["state"] == "lost"
    assert not is_our_worker(worker_status(sleeper, create_time=wrong))
    assert RunIndex(tmp_path).refresh()[0]["state"] == "lost"
    outcome = cancel(run)
    assert "lost" in outcome
    assert survives(sleeper), "cancel signalled a process that is not the run's worker"


def test_cancel_of_a_live_status_naming_another_process_only_leaves_the_request(tmp_path, sleeper, monkeypatch):
    """Even where the state reads as live (a stale listing), cancel checks identity itself before
    it signals: only cancel.request is written, and it says so."""
    import widen_tui.launcher as launcher

    wrong = psutil.Process(sleeper.pid).create_time() - 3600.0
    run = make_run(tmp_path, worker_status(sleeper, create_time=wrong))
    real_status = RunDir.status
    monkeypatch.setattr(RunDir, "status", lambda self: {**real_status(self), "state": "running"})
    outcome = launcher.cancel(run)
    assert run.cancel_request.exists()
    assert "no worker process" in outcome
    assert survives(sleeper)


def test_a_status_without_create_time_falls_back_to_the_pid(tmp_path, sleeper):
    """Runs written before create_time existed: a live pid still counts."""
    run = make_run(tmp_path, worker_status(sleeper))
    assert run.status()["state"] == "running"
    sleeper.kill()
    sleeper.wait()
    assert run.status()["state"] == "lost"


def test_a_stopped_worker_is_stale(tmp_path, sleeper):
    run = make_run(tmp_path, worker_status(sleeper, create_time=psutil.Process(sleeper.pid).create_time()))
    os.kill(sleeper.pid, signal.SIGSTOP)
    try:
        deadline = time.time() + 5
        while psutil.Process(sleeper.pid).status() != psutil.STATUS_STOPPED and time.time() < deadline:
            time.sleep(0.01)
        assert run.status()["state"] == "stale"
        assert RunIndex(tmp_path).refresh()[0]["state"] == "stale"
        # still the run's worker: cancel may signal it (it ends once it continues)
        assert "cancel requested" in cancel(run)
    finally:
        os.kill(sleeper.pid, signal.SIGCONT)
    sleeper.wait(timeout=5)
    assert sleeper.returncode == -signal.SIGTERM


def test_a_silent_worker_is_stale_not_running_forever(tmp_path, sleeper):
    created = psutil.Process(sleeper.pid).create_time()
    old = time.time() - HEARTBEAT_STALE_S - 5
    run = make_run(tmp_path, worker_status(sleeper, create_time=created, heartbeat=old))
    assert run.status()["state"] == "stale"
    # an old-format status (no create_time) with a silent live pid: stale too
    assert effective_state(worker_status(sleeper, heartbeat=old)) == "stale"
    # a fresh heartbeat: running again
    write_json_atomic(run.status_json, worker_status(sleeper, create_time=created))
    assert run.status()["state"] == "running"


def test_a_worker_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    status = {"state": "running", "pid": 1, "host": "elsewhere", "heartbeat": time.time()}
    assert effective_state(status) == "running"
    assert effective_state({**status, "heartbeat": time.time() - HEARTBEAT_STALE_S - 5}) == "lost"
    assert not is_our_worker(status)


def test_launcher_records_the_workers_create_time(tmp_path, monkeypatch):
    """start_worker writes the first status with the child's create_time (the worker's own
    StatusFile later writes the same)."""
    import sys

    import widen_tui.launcher as launcher

    run = make_run(tmp_path, None)
    monkeypatch.setattr(launcher, "worker_env", lambda: dict(os.environ))
    monkeypatch.setattr(launcher, "_await_run_lock", lambda proc, run: None, raising=False)
    real_popen = subprocess.Popen
    monkeypatch.setattr(launcher.subprocess, "Popen",
                        lambda args, **kw: real_popen([sys.executable, "-c", "import time; time.sleep(30)"], **kw))
    pid = launcher.start_worker(run)
    try:
        status = run.status()
        assert status["pid"] == pid and status["state"] == "queued"
        assert abs(status["create_time"] - psutil.Process(pid).create_time()) < 1e-3
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- a finished run whose status.json is gone or broken ---------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage", "a list"])
def test_results_speak_for_a_finished_run_without_a_readable_status(tmp_path, damage):
    run = make_run(tmp_path, {"state": "done", "pid": 1, "host": socket.gethostname(), "ended": time.time()},
                   {"state": "done", "summary": {"final_ppl": {"prose": 12.5}}})
    text = run.status_json.read_text()
    if damage == "missing":
        run.status_json.unlink()
    else:
        run.status_json.write_bytes({"empty": b"", "truncated": text[: len(text) // 2].encode(),
                                     "garbage": b"\xff\xfe\x00garbage", "a list": b"[1, 2]"}[damage])
    assert run.status()["state"] == "done"
    record = RunIndex(tmp_path).refresh()[0]
    assert record["state"] == "done" and record["summary"]["final_ppl"] == {"prose": 12.5}
    if damage != "missing":
        assert any(p.startswith("status.json unreadable") for p in run.problems())


def test_without_status_or_final_results_the_run_is_not_done(tmp_path):
    old = time.time() - 3 * HEARTBEAT_STALE_S
    run = make_run(tmp_path, None, {"state": "running"})  # a results.json that is not final
    write_json_atomic(run.run_json, {"id": "r1", "name": "r1", "created_ts": old})
    assert run.status()["state"] == "lost"
