"""The training loop. Read it top to bottom: ``run_plan`` evaluates the initial model, then
``run_stage`` for each stage: apply its operators (measured), freeze, train its steps
(``train_steps``: one batch, one step, growth on a plateau, periodic evals and checkpoints),
evaluate every task, checkpoint.

The same loop runs in one process or on every rank under ``torchrun``: each rank trains its rows
of the global batch (a pure function of seed, stage and step), only rank 0 writes files.
``engine.train.trained_model`` holds the model and where its parameters live (whole, DDP, or FSDP
shards, gathered whole for every change of shape); ``engine.train.build`` makes model and data,
``engine.train.checkpoint`` saves typed state without pickle, ``engine.train.session`` runs it all in the
worker (queue, prefix cache, how a run ended).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Callable

import torch

from engine.grow import flops, sweep
from engine.grow.growth import Progress, apply_state_policy, carry_optimizer_state, continue_schedule, make_trigger
from engine.model.view import count_params
from engine.ops import health
from engine.plan import Plan, load_plan
from engine.runs import results, trackers
from engine.runs.events import EventWriter, ThrottledProgress
from engine.runs.rundir import RunDir
from engine.runs.status import StatusFile
from engine.train import checkpoint, moe, speed
from engine.train.build import prepare, probe_batch, stage_seed, task_train_batch
from engine.train.checkpoint import History, Position, TrainerState
from engine.train.distributed import World
from engine.train.divergence import Diverged, DivergenceWatch
from engine.train.evaluation import Evaluator
from engine.train.optim import Precision
from engine.train.system import SystemMonitor, rank_rows
from engine.train.trained_model import TrainedModel

SYSTEM_SAMPLE_S = 5.0        # seconds between system samples


class Cancelled(Exception):
    pass


class Trainer:
    def __init__(self, run_dir: Path, resume: bool = False, status: StatusFile | None = None,
                 world: World | None = None):
        self.run = RunDir(run_dir)
        self.plan: Plan = load_plan(self.run.plan)
        self.info, self.resume, self.status = self.run.info(), resume, status
        self.world = world or World()
        self.is_main = self.world.is_main
        self.cancel_requested, self.started = False, False   # started: set up, with a position in the plan
        self.on_stage_end: list[Callable[["Trainer", int], None]] = []   # after each stage's checkpoint

    def setup(self):
        self.events = EventWriter(self.run.events) if self.is_main else None
        trackers.attach(self.events, self.plan.train.report_to, self.run.path)  # a copy of the metrics, if asked
        # loading, tokenizing and evaluating a real model take minutes without a step: `progress`
        # events (before `start`, which needs the model) say what the worker is busy with
        self.report_progress = ThrottledProgress(self.emit) if self.is_main else None
        self.monitor = SystemMonitor(SYSTEM_SAMPLE_S)
        prepared = prepare(self.plan, self.run.path.parent / ".cache", self.world, self.report_progress)
        self.device, self.tokenizer, self.tasks = prepared.device, prepared.tokenizer, prepared.tasks
        self.eval_sets, self.bytes_per_token = prepared.eval_sets, prepared.bytes_per_token
        self.m = TrainedModel(self.plan, prepared, self.world)
        self.precision = Precision(self.plan.train.dtype, self.device)
        self.evaluate = Evaluator(self.plan, prepared, self.precision, self.world, self.report_progress)
        self.history, self.position = History(), Position()
        self.plateau_state: dict | None = None
        self.started = True

    @property
    def model(self) -> torch.nn.Module:
        return self.m.module

    def emit(self, kind: str, **fields):
        if self.events:
            self.events.emit(kind, **fields)

    def _global_step(self, index: int, step: int) -> int:
        return sum(s.steps for s in self.plan.stages[:max(index, 0)]) + step

    # ------------------------------------------------------------------ evaluation
    def evaluate_all(self, stage: int, step: int, score: bool = True, same_as: dict | None = None) -> dict:
        """Every task's evaluation, emitted as `eval` events; `same_as`: the row of a model this one
        equals (a stage that neither trained nor grew it), emitted again without re-evaluating."""
        row = {}
        for task in self.tasks:
            row[task] = same_as[task] if same_as is not None else self.evaluate(self.m, task, score)
            self.emit("eval", stage=stage, step=step, task=task, tokens=self.history.tokens,
                      flops=self.history.flops, global_step=self._global_step(stage, step), **row[task])
        return row

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, reason: str, optimizer=None, scheduler=None, stage: int | None = None,
                        step: int | None = None):
        """Save weights + trainer state; `stage`/`step` label the event. Non-finite weights are
        never saved. A sharded model (FSDP) is saved sharded — a collective: every rank checks
        and writes its own shards (DCP), rank 0 the rest, nothing is gathered but the small task
        modules. A whole model is written by rank 0 alone."""
        weights, tasks = self.m.weights(), self.m.task_tensors()
        moments = self.m.optimizer_state(optimizer) if optimizer else None
        sharded = isinstance(weights, checkpoint.ShardedWeights)
        if not sharded and not self.is_main:
            return
        finite = checkpoint.finite_weights(weights)
        if sharded:  # every rank's shards: the ranks stop alike
            finite = self.world.all_sum([0.0 if finite else 1.0])[0] == 0
        if not finite:
            raise Diverged(self.position.stage, self.position.step, "the weights are not finite", self.run.id)
        state = TrainerState(
            position=self.position, history=self.history, optimizer=moments,
            scheduler=scheduler.state_dict() if scheduler else None, plateau=self.plateau_state,
            task_modules=self.m.task_modules.to_json() if self.m.task_modules else None,
            scaler=self.precision.scaler.state_dict(), rng=checkpoint.capture_rng())
        latest = self.run.checkpoints / "latest"
        final = checkpoint.save_sharded(latest, self.world, weights, state, tasks) if sharded else \
            checkpoint.save(latest, weights, state, tasks)
        self.emit("checkpoint", stage=self.position.stage if stage is None else stage,
                  step=self.position.step if step is None else step,
                  path=str(final.relative_to(self.run.path)), reason=reason)

    def load_checkpoint(self) -> TrainerState | None:
        """checkpoints/latest: its position, history and plateau state; the model rebuilt to its
        shape (expansions and growths replayed) with its weights. None when there is none."""
        state = checkpoint.load_state(self.run.checkpoints / "latest", stages=len(self.plan.stages))
        if state is None:
            return None
        self.position, self.history, self.plateau_state = state.position, state.history, state.plateau
        stages = state.position.stage + (1 if state.position.ops_applied else 0)
        self.m.rebuild(stages, self.history.growths, task_modules=state.task_modules)
        self.m.shard()  # FSDP: the weights load straight into the shards (each rank reads its own)
        checkpoint.load_weights(self.model, self.run.checkpoints / "latest", self.device)
        return state

    # ------------------------------------------------------------------ the plan
    def run_plan(self, from_cache: bool = False):
        """Train every stage not done yet; `from_cache`: checkpoints/latest holds a variant's
        shared stages from the prefix cache (continued as a resume is)."""
        if self.status is None and self.is_main:
            self.status = StatusFile(self.run.status_json)
        self.setup()
        plan = self.plan
        torch.manual_seed(plan.seed)
        params = count_params(self.model)  # before any stage
        if (self.resume or from_cache) and self.report_progress:
            self.report_progress("load", "checkpoint", 0, None)
        saved = self.load_checkpoint() if (self.resume or from_cache) else None
        self.history.prefix_cached = self.history.prefix_cached or from_cache
        self.emit("start", run=self.run.id, plan=plan.name, seed=plan.seed, device=str(self.device),
                  pid=os.getpid(), world_size=self.world.size, strategy=plan.train.strategy,
                  attention=speed.attention_of(self.model), params=params, stages=len(plan.stages),
                  attention_note=getattr(self.model, "attention_fallback", None), task_names=list(self.tasks),
                  resumed=saved is not None and not from_cache, prefix_cached=from_cache, variant=self.info.get("variant"),
                  stage_steps=[s.steps for s in plan.stages], system=self.monitor.gpu_status)
        if self.resume:  # readers drop what an earlier segment logged past this point (engine.runs.events)
            at = self.position
            self.emit("resume", stage=at.stage, step=at.step, global_step=self._global_step(at.stage, at.step),
                      ops_applied=at.ops_applied, from_checkpoint=saved is not None)
        if not self.position.initial_done:
            self.history.add_row("initial", self.evaluate_all(stage=-1, step=0))
            self.position.initial_done = True
        start_stage = self.position.stage
        for index in range(start_stage, len(plan.stages)):
            self.run_stage(index, saved if index == start_stage else None)
        if plan.sweep:
            self.m.gather(len(plan.stages), self.history.growths)  # FSDP: the sweep maps whole blocks
            self.sweep_result = sweep.sweep_after_training(self)
        self.finish("done")

    def run_stage(self, index: int, saved: TrainerState | None):
        plan, stage = self.plan, self.plan.stages[index]
        label = plan.stage_label(index)
        self.position.stage = index
        if self.status:
            self.status.write(stage=index, stage_name=label, step=self.position.step, steps=stage.steps)
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="begin",
                  global_step=self._global_step(index, 0), tokens=self.history.tokens, flops=self.history.flops)
        if not self.position.ops_applied:  # its operators, then its freezing
            self._log_expansions(index, self.m.expand(index, probe_batch(self.eval_sets[stage.task]),
                                                      self.history.growths))
            self.position.ops_applied, self.position.step, self.position.growths = True, 0, 0
            self.plateau_state = None
        else:
            self.m.freeze(index)
        self.m.activate(stage.task)
        self.m.restarts = self._restarts(index)  # a resume's lr schedule restarts where its growths did
        self._profile_flops(stage.task)
        self.m.shard()  # FSDP: the whole model is sharded for training (nothing otherwise)

        optimizer, scheduler = self.m.make_optimizer(stage)
        if saved is not None and saved.optimizer is not None:
            checkpoint.restore_training(saved, optimizer, scheduler, self.precision.scaler, stage.lr or plan.train.lr,
                                        self.m.load_optimizer_state)
        else:
            torch.manual_seed(stage_seed(plan.seed, index))
        self.train_steps(index, stage, optimizer, scheduler)
        if self.m.task_modules is not None:  # FSDP: swapping a task's modules needs the model whole
            self.m.gather(index + 1, self.history.growths)

        total, trainable = count_params(self.model), self.m.freezer.trainable(self.model)
        for report, units in health.after_training(self.history.expansions, self.m.growth, index):
            self.emit("health", stage=index, op=report["op"], **units)
            warning = health.twin_warning(report, units)
            if warning:
                self.emit("warning", source="health", message=warning)
        # a stage of 0 steps that grew nothing (a plan's "score the pretrained model" stage) left the
        # model as the last row measured it: on a real model, evaluating it again costs minutes
        unchanged = stage.steps == 0 and not stage.expand and self.history.matrix
        self.history.add_row(f"after {label}", self.evaluate_all(
            stage=index, step=stage.steps, same_as=self.history.matrix[-1] if unchanged else None))
        self.history.add_stage(index, label, stage.task, total, trainable)
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="end",
                  params=total, trainable=trainable)
        self.position.stage, self.position.step, self.position.ops_applied = index + 1, 0, False
        self.save_checkpoint("stage end", stage=index, step=stage.steps)
        for hook in self.on_stage_end:
            hook(self, index)

    def _profile_flops(self, task: str) -> None:
        """What a step of the model as it now is costs (engine.grow.flops: the matmuls that run, the
        gradients autograd computes), read once per shape, freezing and active task: here, while
        the model is whole (before FSDP shards it)."""
        self.flop_profile = flops.profile(self.model, self.m.view, sample_inputs=probe_batch(self.eval_sets[task])[0],
                                          checkpointing=self.plan.train.checkpointing)

    def _restarts(self, index: int) -> list[int]:
        """The stage steps at which stage `index`'s lr schedule went back to its peak so far:
        its growths', under ``schedule_after = "rewarm"``."""
        grow = self.plan.stages[index].grow
        if grow is None or grow.schedule_after != "rewarm":
            return []
        return [g["step"] for g in self.history.growths if g["stage"] == index]

    def _log_expansions(self, index: int, reports: list[dict], **fields) -> None:
        trainable, total = self.m.freezer.trainable(self.model), count_params(self.model)
        for report in reports:
            report.update(trainable=trainable, trainable_share=trainable / total, task=self.plan.stages[index].task,
                          **fields)
            self.history.expansions.append(report)
            self.emit("expand", **report)

    # ------------------------------------------------------------------ the steps
    def train_steps(self, index, stage, optimizer, scheduler):
        """Train the stage's remaining steps (a growth swaps in a new optimizer and schedule)."""
        train, data, world = self.plan.train, self.tasks[stage.task], self.world
        self.model.train()
        trainee = self.m.trainee()  # DDP / FSDP / compiled: what the batches go through
        tokens_per_step = train.batch_size * train.seq_len
        window_start, window_tokens = time.time(), 0
        trainable, total_params = self.m.freezer.trainable(self.model), count_params(self.model)
        trigger = make_trigger(stage.grow, self.plateau_state) if stage.grow else None
        check_losses: list[torch.Tensor] = []   # on the device until a plateau check reads them
        watch = DivergenceWatch(index, self.run.id)  # read once per log interval (engine.train.divergence)
        stage_start = time.time()
        while self.position.step < stage.steps:
            step = self.position.step
            # a cancel: every step in one process; under torchrun once per log window (its broadcast
            # is a host sync on CUDA, and the step loop syncs no more often than it logs)
            asked = step % train.log_interval == 0 or not world.distributed
            if asked and world.broadcast_flag(self.is_main and (self.cancel_requested or self.run.cancel_request.exists())):
                watch.check()
                self.save_checkpoint("cancel", optimizer, scheduler)
                raise Cancelled()
            whole = task_train_batch(data, train, self.plan.seed, index, step)  # the global batch: its FLOPs
            batch = world.shard_rows(whole, train.batch_size)
            loss, grad_norm, vocab = self.m.forward_backward(trainee, batch, self.precision, optimizer, trainable)
            loss = world.mean_on_device(loss)  # the global batch's loss: every rank decides alike
            watch.add(loss, None if self.precision.scaler.is_enabled() else grad_norm, vocab, step)
            if trainable:
                self.precision.scaler.step(optimizer)
                self.precision.scaler.update()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            self.position.step = done = step + 1
            self.history.tokens += tokens_per_step
            self.history.flops += self.flop_profile.step_flops(whole[0])  # docs/flops.md
            window_tokens += tokens_per_step
            if trigger is not None:
                check_losses.append(loss.detach())
            if done % train.log_interval == 0 or done == stage.steps:
                logged_loss = watch.check()  # this step's loss, read with the window's check
                routing = self.m.routers.drain(world)  # a mixture of experts' routers since the last log
                elapsed = time.time() - window_start
                self.emit("step", stage=index, step=done, global_step=self._global_step(index, done),
                          loss=logged_loss, lr=scheduler.get_last_lr()[0],
                          tokens_per_s=window_tokens / max(elapsed, 1e-9),
                          tokens=self.history.tokens, flops=self.history.flops, params=total_params,
                          **moe.step_fields(routing, logged_loss))
                if routing is not None:
                    self.emit("experts", stage=index, step=done, global_step=self._global_step(index, done),
                              **routing.event_fields())
                if world.distributed:  # each rank's memory
                    self.emit("ranks", stage=index, step=done, global_step=self._global_step(index, done),
                              ranks=rank_rows(world, self.device))
                window_start, window_tokens = time.time(), 0
                if self.status:
                    self.status.write(step=done)
            if trigger is not None:  # the plateau test reads the mean loss of each check interval
                checked = done % stage.grow.check_interval == 0
                mean = sum(torch.stack(check_losses).tolist()) / len(check_losses) if checked else None
                grow_now = trigger.update(Progress(step=done, tokens=self.history.tokens, flops=self.history.flops,
                                                   loss=mean))
                check_losses = [] if checked else check_losses
                self.plateau_state = trigger.state_dict()
                if grow_now and done < stage.steps:
                    watch.check()
                    optimizer, scheduler = self.grow(index, optimizer, scheduler)
                    trainable, total_params = self.m.freezer.trainable(self.model), count_params(self.model)
                    trainee = self.m.trainee()  # unwrap, grow, re-wrap (re-compile)
            if train.eval_interval and done % train.eval_interval == 0 and done < stage.steps:
                watch.check()
                self.evaluate_all(stage=index, step=done, score=False)
            if train.checkpoint_interval and done % train.checkpoint_interval == 0 and done < stage.steps:
                watch.check()
                self.save_checkpoint("interval", optimizer, scheduler)
            self._maybe_system_sample()
        watch.check()  # the stage's last steps, before its end evaluation and checkpoint
        self.history.wall_s += time.time() - stage_start

    def grow(self, index: int, optimizer, scheduler):
        """Grow the model in place mid-stage (whole: FSDP gathers it first, shards it after): apply
        the stage's growth operators (measured on the probe batch), let the new parameters join a
        new optimizer that carries the old parameters' state over (transformed for operators that
        split units), log it, go on."""
        started, stage = time.perf_counter(), self.plan.stages[index]
        k, step = self.position.growths, self.position.step
        # asymmetric reset reads each new entry's mask on the whole model: FSDP gathers it for that
        by_units = self.m.grows_by_units(stage.grow.expand) and stage.grow.optimizer_state != "asymmetric"
        if not by_units:  # FSDP: whole on every rank for operators that are not per block
            optimizer, scheduler = self.m.gather(index + 1, self.history.growths, optimizer, scheduler)
        growth, before = self.m.grow(index, k, probe_batch(self.eval_sets[stage.task]), self.history.growths,
                                     optimizer if by_units else None)
        self._profile_flops(stage.task)
        if stage.grow.schedule_after == "rewarm":  # the new schedule restarts at this step (engine.train.optim)
            self.m.restarts = [*self.m.restarts, step]
        new_optimizer, new_scheduler = self.m.make_optimizer(stage)
        if by_units:  # the moments were carried block by block, as the blocks grew
            self.m.load_carried(new_optimizer)
        else:
            carry_optimizer_state(optimizer, new_optimizer, before, self.model, growth, masked=self.m.freezer.masked)
        apply_state_policy(new_optimizer, growth, stage.grow.optimizer_state)  # carry, reset or asymmetric
        continue_schedule(scheduler, new_scheduler)
        self._log_expansions(index, growth.reports, trigger=stage.grow.trigger, growth=k, step=step,
                             global_step=self._global_step(index, step), tokens=self.history.tokens,
                             flops=self.history.flops)
        self.history.growths.append({"stage": index, "growth": k, "step": step, "params": count_params(self.model),
                                     "tokens": self.history.tokens})
        self.position.growths = k + 1
        self.model.train()
        new_optimizer, new_scheduler = self.m.shard(new_optimizer, new_scheduler)
        del optimizer
        gc.collect()  # the old model's FSDP state holds reference cycles: free it now, not at some later collection
        self.history.growths[-1]["seconds"] = time.perf_counter() - started
        return new_optimizer, new_scheduler

    def _maybe_system_sample(self, force: bool = False, quiet: bool = False):
        if force or self.monitor.due():
            try:
                self.emit("system", **self.monitor.sample())
            except OSError:
                if not quiet:
                    raise

    def finish(self, state: str, error: str | None = None):
        """Write the ending (results.json, a status event, status.json): rank 0 alone."""
        if self.is_main:
            results.write_ending(self, state, error)
