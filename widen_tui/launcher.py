"""Start, cancel and resume engine subprocesses. No torch here: the worker imports it.

Workers run detached (their own session, output to the run's stderr.log), so closing the CLI or
the TUI, or losing the SSH connection, never stops a run.

A run on several machines (``train.distributed.nnodes`` > 1) starts one torchrun agent per
machine; they meet at the plan's c10d rendezvous (``rdzv_endpoint``, the run id as rendezvous id).
``start_worker`` starts the first machine's; ``join`` starts another machine's on the same run
directory (a shared runs root), and writes nothing of the run but its own log.
"""

from __future__ import annotations

import json
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

from engine.errors import RunCreateError, WidenError
from engine.plan import Plan
from engine.runs.rundir import (
    LIVE_STATES,
    RunDir,
    is_our_worker,
    process_create_time,
    read_json,
    runs_root,
    write_json_atomic,
)
from widen_tui.index import RunIndex


def new_run_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:32] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(2)}"


def create_run(plan: Plan, plan_path: Path | str | None, root: Path | None = None,
               name: str | None = None, **info) -> RunDir:
    """Make the run directory (resolved plan + identity) and index it as `queued`. `info` adds
    identity fields (variant, group, prefix_stages, after).

    The directory is built whole as a hidden ``.new-<id>`` (listings skip it) and renamed into
    place, so a full disk never leaves a half-made run; that failure is a ``RunCreateError``."""
    root = Path(root) if root else runs_root()
    name = name or plan.name
    run = RunDir(root / new_run_id(name))
    tmp = RunDir(root / f".new-{run.id}")
    now = time.time()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.path.mkdir()
        tmp.plan.write_text(plan.to_toml())
        write_json_atomic(tmp.run_json, {
            "id": run.id, "name": name, "plan_name": plan.name, "seed": plan.seed,
            "plan_path": str(Path(plan_path).resolve()) if plan_path else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)), "created_ts": now,
            **{k: v for k, v in info.items() if v is not None},
        })
        os.rename(tmp.path, run.path)
        RunIndex(root).upsert(run.record())
    except OSError as e:
        shutil.rmtree(tmp.path, ignore_errors=True)
        shutil.rmtree(run.path, ignore_errors=True)  # made, but it cannot be indexed: nothing can run
        raise RunCreateError(f"cannot create the run: {e.strerror or e} — free space in {root}") from None
    return run


def create_runs(plan: Plan, plan_path: Path | str | None, seeds: list[int] | None = None,
                root: Path | None = None) -> list[RunDir]:
    """One run per (seed, variant) of a plan; a plan without variants and seeds is one run.

    Runs of one call form a group and go one after another (each waits for the one before:
    `after`), so the first variant trains the shared stages and the others start from the
    prefix cache; they still run detached, whoever started them."""
    seeds = seeds or [plan.seed]
    variants = [v.name for v in plan.variants] or [None]
    nnodes = plan.train.distributed.nnodes if plan.train.distributed else 1
    if nnodes > 1 and (len(seeds) > 1 or variants != [None]):
        # each run of a group would wait for its own `widen join` on every machine, and the first
        # machine's torchrun of the first run hosts the rendezvous store the later ones lean on
        raise RunCreateError(f"a plan on several machines (train.distributed.nnodes {nnodes}) runs as one run: "
                             "drop its variants and --seeds, and start each variant or seed by itself "
                             "(--set / --seed)")
    if len(seeds) == 1 and variants == [None]:
        return [create_run(plan.model_copy(update={"seed": seeds[0]}), plan_path, root)]
    group = new_run_id(plan.name)
    runs: list[RunDir] = []
    try:
        for seed in seeds:
            for variant in variants:
                resolved = plan.for_variant(variant) if variant else plan
                resolved = resolved.model_copy(update={"seed": seed})
                label = "-".join(str(x) for x in (plan.name, variant, f"s{seed}" if len(seeds) > 1 else None) if x)
                runs.append(create_run(resolved, plan_path, root, name=label, group=group, variant=variant,
                                       prefix_stages=len(plan.stages) if variant else None,
                                       after=runs[-1].id if runs else None))
    except RunCreateError:  # all of the group or none: the runs made so far would wait for ever
        for run in runs:
            shutil.rmtree(run.path, ignore_errors=True)
            try:
                RunIndex(run.path.parent).remove(run.id)
            except OSError:
                pass
        raise
    return runs


class SeedsError(WidenError, ValueError):
    """`--seeds` that are not distinct integers."""


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` as [0, 1, 2] (None: the plan's seed)."""
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SeedsError(f"--seeds '{text}': give integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SeedsError(f"--seeds '{text}': give distinct integers, e.g. --seeds 0,1,2")
    return seeds


def distributed_overrides(nproc: int | None, nnodes: int | None, rdzv_endpoint: str | None) -> list[str]:
    """--nproc / --nnodes / --rdzv-endpoint as `--set` overrides (the endpoint quoted: a TOML string)."""
    extra = [f"train.distributed.nproc={nproc}"] if nproc else []
    extra += [f"train.distributed.nnodes={nnodes}"] if nnodes else []
    extra += [f"train.distributed.rdzv_endpoint={json.dumps(rdzv_endpoint)}"] if rdzv_endpoint else []
    return extra


def worker_command(run: RunDir, resume: bool = False) -> list[str]:
    """`python -m engine.train.worker RUN_DIR`, under torchrun (`python -m torch.distributed.run`)
    when the plan asks for several processes: `--standalone` on one machine, the plan's c10d
    rendezvous (the run id as its id) on several. Every machine of a run runs the same command."""
    worker = ["-m", "engine.train.worker", str(run.path)] + (["--resume"] if resume else [])
    spec = _distributed(run)
    nproc, nnodes = (spec.nproc, spec.nnodes) if spec else (1, 1)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes > 1 and spec.rdzv_endpoint:  # plan check requires the endpoint; without one: a single machine
        return [*torchrun, f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={run.id}", *worker]
    if nproc <= 1:
        return [sys.executable, *worker]
    return [*torchrun, "--standalone", f"--nproc_per_node={nproc}", *worker]


def _distributed(run: RunDir):
    """The run's ``train.distributed`` (None for one process, or a broken plan: the worker reports it)."""
    from engine.plan import load_plan

    try:
        return load_plan(run.plan).train.distributed
    except ValueError:
        return None


def nnodes(run: RunDir) -> int:
    """How many machines the run's plan trains on."""
    spec = _distributed(run)
    return spec.nnodes if spec else 1


def join_lines(run: RunDir, resume: bool = False) -> list[str]:
    """What to run on every other machine of a multi-node run: `widen join RUN`, and the raw
    torchrun line it amounts to (the run directory as this machine sees it)."""
    import shlex

    return [f"widen join {run.id}", shlex.join(["python", *worker_command(run, resume)[1:]])]


def start_worker(run: RunDir, resume: bool = False) -> int:
    """Spawn the run's worker detached (engine.train.worker, or torchrun over N of them); returns its pid."""
    from engine.errors import RunStateError

    if _lock_held(run):
        raise RunStateError(f"run {run.id} already has a worker — `widen watch {run.id}`")
    args = worker_command(run, resume)
    with open(run.stderr, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd=os.getcwd(), env=worker_env())
    spec = _distributed(run)
    if spec and spec.nnodes > 1 and spec.rdzv_endpoint:
        _note_rendezvous(run, proc.pid, spec, resume)
    else:
        _await_run_lock(proc, run)
        # Note the pid at once, so a worker that dies before writing its own status shows as `lost`;
        # its create_time tells our worker from a process that gets the pid later.
        # The worker needs seconds to import torch; if it was quicker, its own status (same pid) stays.
        written = (read_json(run.status_json) or {}).get("pid")
        if written != proc.pid and not (isinstance(written, int) and _parent(written) == proc.pid):
            write_json_atomic(run.status_json, {"state": "queued", "pid": proc.pid, "host": socket.gethostname(),
                                                "create_time": process_create_time(proc.pid),
                                                "heartbeat": time.time()})
    if resume:  # the index still says how the run ended before: it is queued again
        RunIndex(run.path.parent).update_run(run)
    return proc.pid


# torchrun's agents wait this long (c10d's default join_timeout) for every machine to join
RENDEZVOUS_WAIT_S = 600.0


def _note_rendezvous(run: RunDir, pid: int, spec, resume: bool) -> None:
    """The queued status of a multi-node run: no rank starts (nor takes the run's lock) until
    every machine has joined, so nothing is awaited here. `widen join` reads `rendezvous` and
    `resume` from it (the worker's own status, once rank 0 runs, has neither). No process beats
    while the agents wait: the heartbeat is set to when torchrun gives up waiting, so the run reads
    as queued, not stale or lost, until then."""
    write_json_atomic(run.status_json, {
        "state": "queued", "pid": pid, "host": socket.gethostname(), "create_time": process_create_time(pid),
        "heartbeat": time.time() + RENDEZVOUS_WAIT_S, "rendezvous": spec.rdzv_endpoint,
        "nnodes": spec.nnodes, "resume": resume})


def join(run: RunDir) -> tuple[int, Path]:
    """Start this machine's torchrun agent for a multi-node run another machine started
    (`widen run` / `widen resume`), on the same run directory: the command `start_worker` ran
    there, `--resume` as it was. It takes no lock and writes neither status nor index (rank 0
    does, wherever it lands); its output goes to ``stderr-<host>-<pid>.log`` in the run directory.
    Returns (the agent's pid, that log)."""
    from engine.errors import RunStateError

    spec = _distributed(run)
    if not spec or spec.nnodes <= 1:
        raise RunStateError(f"run {run.id} trains on one machine (train.distributed.nnodes is 1) — nothing to "
                            "join; start a run on several with `widen run PLAN --nnodes N --rdzv-endpoint HOST:PORT`")
    recorded = read_json(run.status_json) or {}  # as written, not the effective state: see _note_rendezvous
    state = recorded.get("state")
    if state == "done":
        raise RunStateError(f"run {run.id} is done — nothing to join")
    if state in ("failed", "cancelled", "diverged"):
        raise RunStateError(f"run {run.id} is {state} — `widen resume {run.id}` on the first machine, then "
                            f"`widen join {run.id}` here")
    if state != "queued" or not recorded.get("rendezvous"):
        raise RunStateError(f"run {run.id} is {state or 'not started'} and not waiting for machines to join — "
                            f"nothing to join (`widen watch {run.id}`)")
    resume = recorded.get("resume") is True
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()).strip(".-")[:64] or "host"
    log_path = run.path / f".stderr-{host}-{os.getpid()}.log.new"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(worker_command(run, resume), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd=os.getcwd(), env=worker_env())
    named = run.path / f"stderr-{host}-{proc.pid}.log"  # the agent's pid: the process to look for
    try:
        os.rename(log_path, named)  # the agent keeps writing to the file it has open
    except OSError:
        named = log_path
    return proc.pid, named


def _await_run_lock(proc: subprocess.Popen, run: RunDir, timeout_s: float = 30.0) -> None:
    """Wait until the new worker holds the run's lock (it takes it before importing torch, in a
    fraction of a second); a second worker on one run exits at once, which is refused here."""
    from engine.errors import RunStateError
    from engine.train.worker import BUSY_EXIT, OWNER_FILE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code == BUSY_EXIT:
            raise RunStateError(f"run {run.id} already has a worker — `widen watch {run.id}`")
        if code is not None:
            if code != 0 and _lock_held(run):  # torchrun reports its rank 0's refusal as a failure
                raise RunStateError(f"run {run.id} already has a worker — `widen watch {run.id}`")
            return  # it ended on its own (its status says how)
        try:
            owner = int((run.path / OWNER_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner == proc.pid or (owner and _parent(owner) == proc.pid):  # torchrun's rank 0: its child
            return
        time.sleep(0.02)


def _parent(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _lock_held(run: RunDir) -> bool:
    """Whether a worker holds the run's lock now (a try that gives it back at once)."""
    from filelock import FileLock, Timeout

    from engine.train.worker import LOCK_FILE

    lock = FileLock(run.path / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def worker_env() -> dict:
    env = dict(os.environ)
    # the worker must import this checkout's engine even when started from elsewhere
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # glibc raises its mmap threshold each time a large block is freed, so the transient tensors of
    # an evaluation or a growth end up in the heap and stay resident; a fixed threshold gives them
    # back (a 113M-parameter FSDP rank: 2.8 -> 2.2 GiB peak, benchmarks/memory.py)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    return env


def cancel(run: RunDir) -> str:
    """Ask a run to stop: it checkpoints and ends as `cancelled`. Returns what was done.

    The request is the file ``cancel.request`` (seen by the worker on any host sharing the runs
    root); SIGTERM goes only to a process that is the run's worker — same host, same pid and the
    same start time as status.json records — never to whoever has the pid now."""
    status = run.status()
    if status["state"] not in LIVE_STATES:
        return f"already {status['state']}"
    run.cancel_request.touch()
    if status.get("rendezvous") and status["state"] in ("queued", "stale"):
        return _cancel_waiting(run, status)
    pid = status.get("pid")
    if pid and is_our_worker(status):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return "cancel requested (cancel.request written; the worker could not be signalled)"
        return "cancel requested" + (" (the worker is stopped: it ends when it continues)"
                                     if status["state"] == "stale" else "")
    return "cancel requested (cancel.request written; no worker process of this run on this host to signal)"


def _cancel_waiting(run: RunDir, status: dict) -> str:
    """A multi-node run whose machines have not all joined: no rank exists to see the request and
    record the ending, so stop this machine's agent and record `cancelled` here. (Were the ranks
    starting just now, rank 0 sees cancel.request at its first step and ends it so itself.)"""
    if is_our_worker(status):
        try:
            os.kill(int(status["pid"]), signal.SIGTERM)
        except (ProcessLookupError, PermissionError, TypeError, ValueError):
            pass
    recorded = read_json(run.status_json) or {}
    write_json_atomic(run.status_json, {**recorded, "state": "cancelled", "ended": time.time()})
    return ("cancelled before every machine had joined (a `widen join` already started elsewhere gives up "
            f"after {RENDEZVOUS_WAIT_S:.0f} s of waiting)")


# What a resume may change: settings the checkpoint does not depend on. The model, the tasks and
# the stages' operators shape the checkpoint, so they stay as the run began.
# A checkpoint (whole, or an FSDP run's DCP shards) loads on any N and strategy, so those may change too.
RESUMABLE_FIELDS = re.compile(r"^(train\.(lr|grad_clip|eval_interval|log_interval|checkpoint_interval)"
                              r"|train\.distributed\.(nproc|nnodes|rdzv_endpoint|strategy)|stages\.\d+\.lr)$")


def resume(run: RunDir, overrides: list[str] | None = None) -> int:
    """Start a worker that continues `run` from its latest checkpoint; `overrides` (`key=value`,
    as `--set`) change what RESUMABLE_FIELDS allows, e.g. a lower `train.lr` after a divergence."""
    from engine.errors import RunStateError

    status = run.status()
    state = status["state"]
    if state in ("queued", "running", "stale"):
        raise RunStateError(f"run {run.id} is still {state} — nothing to resume"
                            + (" (cancel it first: `widen cancel`)" if state == "stale" else ""))
    if state == "done":
        raise RunStateError(f"run {run.id} is done — nothing to resume")
    if not (run.checkpoints / "latest").exists() and state != "diverged":
        raise RunStateError(f"run {run.id} has no checkpoint — start it again with `widen run`")
    if overrides:
        _apply_resume_overrides(run, overrides)
    run.cancel_request.unlink(missing_ok=True)
    return start_worker(run, resume=True)


def _apply_resume_overrides(run: RunDir, overrides: list[str]) -> None:
    """Rewrite the run's plan.toml with `overrides` (validated as a whole plan first)."""
    from engine.plan import PlanError, Problem, apply_overrides, parse_override, plan_from_dict, read_toml

    bad = [key for key, _ in map(parse_override, overrides) if not RESUMABLE_FIELDS.match(key)]
    if bad:
        raise PlanError([Problem(f"--set {key}", "a resume cannot change this (the checkpoint depends on "
                                 "it) — allowed: train.lr, train.grad_clip, train.eval_interval, "
                                 "train.log_interval, train.checkpoint_interval, train.distributed.nproc, "
                                 "train.distributed.nnodes, train.distributed.rdzv_endpoint, "
                                 "train.distributed.strategy, stages.N.lr") for key in bad])
    plan = plan_from_dict(apply_overrides(read_toml(run.plan), overrides))
    tmp = run.plan.with_name(f".plan.toml.{os.getpid()}.tmp")
    tmp.write_text(plan.to_toml())
    os.replace(tmp, run.plan)


def delete_run(run: RunDir, index: RunIndex | None = None) -> None:
    """Delete a run for good: its directory and its index record. A queued or running run is refused
    (its worker would keep writing into a directory that is gone): cancel it first."""
    index = index or RunIndex(run.path.parent)
    if run.path.exists():
        state = run.status()["state"]
        if state in LIVE_STATES:
            raise RuntimeError(f"run {run.id} is {state} — cancel it first, then delete it")
        shutil.rmtree(run.path)
    index.remove(run.id)
