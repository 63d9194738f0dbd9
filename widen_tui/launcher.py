"""Start, cancel and resume engine subprocesses. No torch here: the worker imports it.

Workers run detached (their own session, output to the run's stderr.log), so closing the CLI or
the TUI, or losing the SSH connection, never stops a run.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.plan import Plan
from engine.rundir import RunDir, pid_alive, read_json, runs_root, write_json_atomic
from widen_tui.registry import RunIndex


def new_run_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:32] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(2)}"


def create_run(plan: Plan, plan_path: Path | str | None, root: Path | None = None,
               name: str | None = None, **info) -> RunDir:
    """Make the run directory (resolved plan + identity) and index it as `queued`. `info` adds
    identity fields (variant, group, prefix_stages, after)."""
    root = Path(root) if root else runs_root()
    root.mkdir(parents=True, exist_ok=True)
    name = name or plan.name
    run = RunDir(root / new_run_id(name))
    run.path.mkdir()
    run.plan.write_text(plan.to_toml())
    now = time.time()
    write_json_atomic(run.run_json, {
        "id": run.id, "name": name, "plan_name": plan.name, "seed": plan.seed,
        "plan_path": str(Path(plan_path).resolve()) if plan_path else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)), "created_ts": now,
        **{k: v for k, v in info.items() if v is not None},
    })
    RunIndex(root).upsert(run.record())
    return run


def create_runs(plan: Plan, plan_path: Path | str | None, seeds: list[int] | None = None,
                root: Path | None = None) -> list[RunDir]:
    """One run per (seed, variant) of a plan; a plan without variants and seeds is one run.

    Runs of one call form a group and go one after another (each waits for the one before:
    `after`), so the first variant trains the shared stages and the others start from the
    prefix cache; they still run detached, whoever started them."""
    seeds = seeds or [plan.seed]
    variants = [v.name for v in plan.variants] or [None]
    if len(seeds) == 1 and variants == [None]:
        return [create_run(plan.model_copy(update={"seed": seeds[0]}), plan_path, root)]
    group = new_run_id(plan.name)
    runs: list[RunDir] = []
    for seed in seeds:
        for variant in variants:
            resolved = plan.for_variant(variant) if variant else plan
            resolved = resolved.model_copy(update={"seed": seed})
            label = "-".join(str(x) for x in (plan.name, variant, f"s{seed}" if len(seeds) > 1 else None) if x)
            runs.append(create_run(resolved, plan_path, root, name=label, group=group, variant=variant,
                                   prefix_stages=len(plan.stages) if variant else None,
                                   after=runs[-1].id if runs else None))
    return runs


def start_worker(run: RunDir, resume: bool = False) -> int:
    """Spawn `python -m engine.worker RUN_DIR` detached; returns its pid."""
    args = [sys.executable, "-m", "engine.worker", str(run.path)] + (["--resume"] if resume else [])
    with open(run.stderr, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd=os.getcwd(), env=_worker_env())
    # Note the pid at once, so a worker that dies before writing its own status shows as `lost`.
    # The worker needs seconds to import torch; if it was quicker, its own status (same pid) stays.
    if (read_json(run.status_json) or {}).get("pid") != proc.pid:
        write_json_atomic(run.status_json, {"state": "queued", "pid": proc.pid, "host": socket.gethostname(),
                                            "heartbeat": time.time()})
    return proc.pid


def _worker_env() -> dict:
    env = dict(os.environ)
    # the worker must import this checkout's engine even when started from elsewhere
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def cancel(run: RunDir) -> str:
    """Ask a run to stop: it checkpoints and ends as `cancelled`. Returns what was done."""
    status = run.status()
    if status["state"] not in ("queued", "running"):
        return f"already {status['state']}"
    run.cancel_request.touch()  # seen by the worker on any host sharing the runs root
    pid = status.get("pid")
    if pid and pid_alive(pid):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    return "cancel requested"


def resume(run: RunDir) -> int:
    status = run.status()
    if status["state"] in ("queued", "running"):
        raise RuntimeError(f"run {run.id} is still {status['state']} — nothing to resume")
    if status["state"] == "done":
        raise RuntimeError(f"run {run.id} is done — nothing to resume")
    if not (run.checkpoints / "latest").exists():
        raise RuntimeError(f"run {run.id} has no checkpoint — start it again with `widen run`")
    run.cancel_request.unlink(missing_ok=True)
    return start_worker(run, resume=True)


def delete_run(run: RunDir, index: RunIndex | None = None) -> None:
    """Delete a run for good: its directory and its index record. A queued or running run is refused
    (its worker would keep writing into a directory that is gone): cancel it first."""
    index = index or RunIndex(run.path.parent)
    if run.path.exists():
        state = run.status()["state"]
        if state in ("queued", "running"):
            raise RuntimeError(f"run {run.id} is {state} — cancel it first, then delete it")
        shutil.rmtree(run.path)
    index.remove(run.id)
