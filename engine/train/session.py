"""One run's life in its worker process: wait for its turn, start from the shared prefix when
another variant trained it already, train, and record how it ended.

``engine.train.worker`` (the process) holds the run's lock and calls ``run``; ``engine.train.loop`` is the
training loop itself and knows nothing of queues or caches.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from engine.errors import WidenError
from engine.names import child_path, name_problem
from engine.plan.problems import Problem
from engine.runs.rundir import RunDir
from engine.runs.status import StatusFile, identity, record_ending
from engine.train import checkpoint, distributed, prefix_cache
from engine.train.divergence import Diverged
from engine.train.loop import Cancelled, Trainer

TURN_POLL_S = 1.0


def run(run_dir: Path | str, resume: bool = False) -> int:
    """Run (or resume) the plan in `run_dir`; returns the process exit code (0 done or cancelled,
    1 otherwise). Never raises: every ending is recorded in status.json (and events and results
    where they can still be written) as one line; unexpected errors add a traceback to stderr."""
    run = RunDir(run_dir)
    world = distributed.join()
    trainer, status = None, None
    try:
        if world.is_main:  # rank 0 alone touches the run's files (and holds the run's lock)
            checkpoint.remove_leftovers(run.checkpoints)
            status = StatusFile(run.status_json, world_size=world.size)
        wait_turn(run, status, resume)  # every rank: none waits in a collective for longer than it allows
        if not resume:
            refuse_operator_misfits(run)
        trainer = Trainer(run.path, resume=resume, status=status, world=world)
        prefix = None if resume else SharedPrefix.of(run, trainer.plan)
        from_cache = prefix is not None and world.is_main and prefix.restore()
        from_cache = world.broadcast_flag(from_cache)  # the others wait for rank 0's files
        if prefix is not None and not from_cache:
            trainer.on_stage_end.append(prefix.publish_after)
        trainer.run_plan(from_cache=from_cache)
        distributed.leave(world)
        return 0
    except Cancelled:
        end(world, trainer, status, run, "cancelled", None)
        return 0
    except Diverged as e:
        end(world, trainer, status, run, "diverged", str(e))
        return 1
    except WidenError as e:
        message = str(e).splitlines()[0]
        end(world, trainer, status, run, "failed",
            message if message.startswith("stage ") else where(trainer) + message)
        return 1
    except Exception as e:
        traceback.print_exc()
        if world.distributed and collective_failed(e):
            end(world, trainer, status, run, "failed",
                f"{where(trainer)}{lost_peer(world)} — `widen resume {run.id}` continues from the last checkpoint")
            return 1
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno == errno.ENOSPC else detail
        end(world, trainer, status, run, "failed", f"{where(trainer)}{e.__class__.__name__}: {reason}")
        return 1


def refuse_operator_misfits(run: RunDir) -> None:
    """The plan's operators on its model built on the meta device, before any weight is loaded: a
    misfit fails the run in seconds, not after minutes of loading. `widen plan check` and the
    foreground `widen run` refuse such a plan already; `widen run --detach` returns before this
    check (it needs torch: seconds), so the worker makes it. Every rank checks: all fail alike."""
    from engine.grow.operator_fit import operator_fit_problems
    from engine.plan import PlanError
    from engine.plan.load import read_toml

    problems = operator_fit_problems(read_toml(run.plan))
    if problems:
        raise PlanError([Problem("", "; ".join(str(p) for p in problems))])


def collective_failed(error: Exception) -> bool:
    """A collective that failed because a peer went away (gloo reports it as a RuntimeError)."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and any(k in str(error) for k in ("gloo", "NCCL", "Connection reset")))


def lost_peer(world: distributed.World) -> str:
    """Which rank a failed collective lost, as far as this rank can tell (torchrun's report in
    stderr.log names it for sure)."""
    others = [r for r in range(world.size) if r != world.rank]
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    return f"{who} of the run's {world.size} processes is gone (a collective failed; torchrun's report in stderr.log)"


def where(trainer: Trainer | None) -> str:
    """'stage S step K: ' once training has a position, else nothing."""
    if trainer is None or not trainer.started:
        return ""
    return f"stage {trainer.position.stage} step {trainer.position.step}: "


def end(world: distributed.World, trainer: Trainer | None, status: StatusFile | None, run: RunDir, state: str,
        message: str | None) -> None:
    """Record how the run ended wherever anything can still be written: stderr.log, then
    results/events/status; a full disk still gets the final status (written in place)."""
    extra = {"error": message} if message else {}
    if not world.is_main:
        return  # rank 0 records the ending (and torchrun ends the other ranks with it)
    if message:
        try:
            print(f"widen: run {state}: {message}", file=sys.stderr, flush=True)
        except OSError:
            pass
    if trainer is not None:
        try:
            trainer.finish(state, error=message)
            return
        except Exception:
            pass
    if status is not None:
        status.close(state=state, ended=time.time(), **extra)
    else:
        record_ending(run.status_json, {"state": state, **extra, "ended": time.time(), **identity()})


def wait_turn(run: RunDir, status: StatusFile | None, resume: bool) -> None:
    """Runs of one `widen run` (variants, seeds) go one after another: wait while the run
    before this one is queued or running (a cancel still works while waiting). Only rank 0
    has a `status` to write."""
    before = run.info().get("after")
    if not before or resume or name_problem(before):  # run.json is untrusted: a name, not a path
        return
    previous = RunDir(child_path(run.path.parent, before))
    while previous.exists() and previous.status()["state"] in ("queued", "running"):
        if run.cancel_request.exists():
            raise Cancelled()
        if status:
            status.write(state="queued", waiting_for=before)
        time.sleep(TURN_POLL_S)
    if status:
        status.write(state="running", waiting_for=None)


class SharedPrefix:
    """A variant's shared stages: restored from the prefix cache when another variant trained
    them, else published there when this run has trained them."""

    def __init__(self, run: RunDir, stages: int, key: str):
        self.run, self.stages, self.key = run, stages, key

    @classmethod
    def of(cls, run: RunDir, plan) -> "SharedPrefix | None":
        stages = run.info().get("prefix_stages") or 0
        if not isinstance(stages, int) or not 0 < stages <= len(plan.stages):
            return None  # none, or a damaged run.json: train the stages here rather than trust it
        return cls(run, stages, plan.prefix_key(stages))

    def restore(self) -> bool:
        """Copy the cached checkpoint in and replay its events (marked cached), if there is one."""
        entry = prefix_cache.lookup(self.run.path.parent, self.key)
        if entry is None:
            return False
        events, _ = prefix_cache.restore(entry, self.run.checkpoints / "latest")
        from engine.runs.events import EventWriter

        writer = EventWriter(self.run.events)
        for event in events:
            writer.write_raw(event.model_copy(update={"cached": True}))
        writer.close()
        return True

    def publish_after(self, trainer: Trainer, index: int) -> None:
        """Stage-end hook: after the last shared stage, publish its checkpoint and events."""
        if index != self.stages - 1 or not trainer.is_main:
            return
        from engine.runs.events import read_all
        from engine.runs.records import ProgressEvent, StartEvent, StatusEvent, SystemEvent

        events = [e for e in read_all(self.run.events)
                  if not isinstance(e, StartEvent | StatusEvent | SystemEvent | ProgressEvent)]
        prefix_cache.publish(self.run.path.parent, self.key, self.run.checkpoints / "latest", events,
                             {"run": self.run.id, "stages": self.stages, "key": self.key,
                              "wall_s": trainer.history.wall_s})
