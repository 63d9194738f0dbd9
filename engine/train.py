"""The training loop: stages, expansion, freezing, evaluation, growth, checkpoints.

Read it top to bottom: ``run_plan`` evaluates the initial model, then ``run_stage`` for each
stage: apply its operators (measured), freeze, train its steps (``train_steps``: one batch, one
step, growth on a plateau, periodic evals and checkpoints), evaluate every task, checkpoint.

The same loop runs in one process or on every rank under ``torchrun`` (``engine.distributed``:
DDP, each rank its rows of the global batch): only rank 0 writes files, and the batches are a
pure function of (seed, stage, step), so a resume (or another rank) gets exactly the batch it
would have had. Around the loop: ``engine.build`` makes the model and data,
``engine.checkpoint`` saves typed state without pickle, ``engine.divergence`` stops a run before
anything non-finite is saved, ``engine.session`` runs it all in the worker (queue, prefix cache,
how a run ended).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from engine import checkpoint
from engine.arch.forward import batch_to, forward_logits, loss_of
from engine.build import op_generator, prepare, probe_batch, replay_expansions, stage_seed, task_train_batch
from engine.checkpoint import History, Position, TrainerState
from engine.distributed import World
from engine.divergence import Diverged, check_step
from engine.evaluation import generation_scores, held_out
from engine.events import EventWriter
from engine.expand import Freezer, StageGrowth, apply_stage, count_params
from engine.growth import (PlateauDetector, carry_optimizer_state, combine_growth, continue_schedule, grow_model,
                           growth_generator)
from engine.optim import Precision, make_optimizer, set_learning_rate
from engine.plan import Plan, load_plan
from engine.results import build_results
from engine.rundir import RunDir, write_json_atomic
from engine.status import StatusFile
from engine.system import SystemMonitor
from engine.task_modules import TaskModules

SYSTEM_SAMPLE_S = 5.0        # seconds between system samples


class Cancelled(Exception):
    pass


class Trainer:
    def __init__(self, run_dir: Path, resume: bool = False, status: StatusFile | None = None,
                 world: World | None = None):
        self.run = RunDir(run_dir)
        self.plan: Plan = load_plan(self.run.plan)
        self.info = self.run.info()
        self.resume = resume
        self.world = world or World()
        self.is_main = self.world.is_main
        self.status = status
        self.cancel_requested = False
        self.started = False         # set up, with a position in the plan
        self.on_stage_end: list[Callable[["Trainer", int], None]] = []   # after each stage's checkpoint

    # ------------------------------------------------------------------ set-up
    def setup(self):
        plan = self.plan
        self.events = EventWriter(self.run.events) if self.is_main else None
        self.monitor = SystemMonitor(SYSTEM_SAMPLE_S)
        prepared = prepare(plan, self.run.path.parent / ".cache")
        self.device, self.tokenizer, self.model, self.view = (prepared.device, prepared.tokenizer,
                                                              prepared.model, prepared.view)
        self.tasks, self.eval_sets, self.bytes_per_token = prepared.tasks, prepared.eval_sets, prepared.bytes_per_token
        self.precision = Precision(plan.train.dtype, self.device)
        self.freezer = Freezer()
        self.task_modules = TaskModules() if plan.task_modules else None
        self.active_task: str | None = None
        self.history, self.position = History(), Position()
        self.plateau_state: dict | None = None
        self._growth = StageGrowth()
        self.started = True

    def emit(self, kind: str, **fields):
        if self.events:
            self.events.emit(kind, **fields)

    def _global_step(self, index: int, step: int) -> int:
        return sum(s.steps for s in self.plan.stages[:max(index, 0)]) + step

    # ------------------------------------------------------------------ task modules
    def activate(self, task: str | None) -> None:
        """With task-specific modules, switch the model to `task`'s own modules."""
        if self.task_modules is not None and task != self.active_task:
            self.task_modules.activate(self.model, task)
            self.active_task = task

    def claim_modules(self, index: int, task: str, growth: StageGrowth) -> None:
        """What a stage (or a growth) added belongs to its task; the first stage shapes the base."""
        if self.task_modules is not None:
            self.task_modules.claim(task, self.model, growth, allow_shared=index == 0)
            self.active_task = None  # the new modules are on: switch again
            self.activate(task)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, task: str, score: bool = False) -> dict:
        """Held-out loss/ppl/bpb of `task` on its own modules (and, with `score`, its generation
        scores); the model is back in training mode on the training task afterwards."""
        training_task = self.active_task
        self.activate(task)
        self.model.eval()
        result = held_out(self.model, self.world.shard_list(self.eval_sets[task]), self.precision.autocast,
                          self.bytes_per_token[task], self.world.all_sum if self.world.distributed else None)
        if score:
            result.update(generation_scores(self.model, self.tokenizer, self.tasks[task], self.plan.tasks[task],
                                            self.device, self.plan.train.seq_len))
        self.model.train()
        self.activate(training_task)
        return result

    def evaluate_all(self, stage: int, step: int, score: bool = True) -> dict:
        row = {}
        for task in self.tasks:
            row[task] = self.evaluate(task, score)
            self.emit("eval", stage=stage, step=step, task=task, tokens=self.history.tokens,
                      flops=self.history.flops, global_step=self._global_step(stage, step), **row[task])
        return row

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, reason: str, optimizer=None, scheduler=None, stage: int | None = None,
                        step: int | None = None):
        """Save weights + trainer state; `stage`/`step` label the event (default: the position).
        Non-finite weights are never saved: the last checkpoint stays a good one."""
        if not self.is_main:
            return
        if not checkpoint.finite_weights(self.model):
            raise Diverged(self.position.stage, self.position.step, "the weights are not finite", self.run.id)
        state = TrainerState(
            position=self.position, history=self.history,
            optimizer=optimizer.state_dict() if optimizer else None,
            scheduler=scheduler.state_dict() if scheduler else None, plateau=self.plateau_state,
            task_modules=self.task_modules.to_json() if self.task_modules else None,
            scaler=self.precision.scaler.state_dict(), rng=checkpoint.capture_rng())
        tasks = ({task: self.task_modules.state_dict(task, self.model) for task in self.task_modules.tasks()}
                 if self.task_modules else None)
        final = checkpoint.save(self.run.checkpoints / "latest", self.model, state, tasks)
        self.emit("checkpoint", stage=self.position.stage if stage is None else stage,
                  step=self.position.step if step is None else step,
                  path=str(final.relative_to(self.run.path)), reason=reason)

    def _load_state(self) -> TrainerState | None:
        """checkpoints/latest's position, history and plateau state (None when there is none)."""
        state = checkpoint.load_state(self.run.checkpoints / "latest")
        if state is None:
            return None
        if state.position.stage > len(self.plan.stages):
            raise checkpoint.CheckpointError(f"checkpoint: stage {state.position.stage} is beyond the plan's "
                                             f"{len(self.plan.stages)} stages — the run directory is damaged")
        self.position, self.history, self.plateau_state = state.position, state.history, state.plateau
        return state

    def _rebuild(self, state: TrainerState) -> None:
        """Replay the expansions (and growths) the checkpoint had, so its weights fit; load them."""
        stages = state.position.stage + (1 if state.position.ops_applied else 0)
        self._growth = replay_expansions(self.model, self.view, self.plan, stages, self.history.growths)
        if self.task_modules is not None and state.task_modules:
            self.task_modules = TaskModules.from_json(state.task_modules, self.model)
            self.active_task = None
        self.model.to(self.device)
        checkpoint.load_weights(self.model, self.run.checkpoints / "latest", self.device)

    # ------------------------------------------------------------------ the plan
    def run_plan(self, from_cache: bool = False):
        """Train every stage not done yet; `from_cache`: checkpoints/latest holds a variant's
        shared stages from the prefix cache (continued as a resume is)."""
        if self.status is None and self.is_main:
            self.status = StatusFile(self.run.status_json)
        self.setup()
        plan = self.plan
        saved = self._load_state() if (self.resume or from_cache) else None
        self.history.prefix_cached = self.history.prefix_cached or from_cache
        self.emit("start", run=self.run.id, plan=plan.name, seed=plan.seed, device=str(self.device),
                  pid=os.getpid(), world_size=self.world.size, params=count_params(self.model), stages=len(plan.stages),
                  resumed=saved is not None and not from_cache, prefix_cached=from_cache,
                  task_names=list(self.tasks), variant=self.info.get("variant"),
                  stage_steps=[s.steps for s in plan.stages], system=self.monitor.gpu_status)
        if self.resume:  # readers drop what an earlier segment logged past this point (engine.events)
            at = self.position
            self.emit("resume", stage=at.stage, step=at.step, global_step=self._global_step(at.stage, at.step),
                      ops_applied=at.ops_applied, from_checkpoint=saved is not None)
        torch.manual_seed(plan.seed)
        if saved is not None:
            self._rebuild(saved)
        if not self.position.initial_done:
            self.history.matrix.append(self.evaluate_all(stage=-1, step=0))
            self.history.row_labels.append("initial")
            self.position.initial_done = True
        start_stage = self.position.stage
        for index in range(start_stage, len(plan.stages)):
            self.run_stage(index, saved if index == start_stage else None)
        if plan.sweep:
            self.run_sweep()
        self.finish("done")

    def run_stage(self, index: int, saved: TrainerState | None):
        plan, stage = self.plan, self.plan.stages[index]
        label = plan.stage_label(index)
        self.position.stage = index
        if self.status:
            self.status.write(stage=index, stage_name=label, step=self.position.step, steps=stage.steps)
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="begin",
                  global_step=self._global_step(index, 0), tokens=self.history.tokens, flops=self.history.flops)
        if not self.position.ops_applied:
            self.activate(stage.task)  # expansions are measured on the task's own model
            self._growth = apply_stage(self.model, self.view, index, stage.expand,
                                       probe_batch(self.eval_sets[stage.task]), op_generator(plan.seed, index))
            self.model.to(self.device)
            self.claim_modules(index, stage.task, self._growth)
            self.freezer.apply(self.model, stage.freeze, self._growth)
            self._log_expansions(index, self._growth.reports)
            self.position.ops_applied, self.position.step, self.position.growths = True, 0, 0
            self.plateau_state = None
        else:
            self.freezer.apply(self.model, stage.freeze, self._growth)
        self.activate(stage.task)

        optimizer, scheduler = make_optimizer(self.model, self.freezer.masked, plan.train, stage)
        if saved is not None and saved.optimizer is not None:
            self._load_optimizer(saved, optimizer, scheduler, stage.lr or plan.train.lr)
        else:
            torch.manual_seed(stage_seed(plan.seed, index))
        self.train_steps(index, stage, optimizer, scheduler)

        total, trainable = count_params(self.model), self.freezer.trainable(self.model)
        self._record_unit_health(index)
        self.history.matrix.append(self.evaluate_all(stage=index, step=stage.steps))
        self.history.row_labels.append(f"after {label}")
        self.history.trained_at.setdefault(stage.task, index)
        self.history.stage_params.append({"stage": index, "name": label, "task": stage.task, "total": total,
                                          "trainable": trainable, "trainable_share": trainable / total})
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="end",
                  params=total, trainable=trainable)
        self.position.stage, self.position.step, self.position.ops_applied = index + 1, 0, False
        self.save_checkpoint("stage end", stage=index, step=stage.steps)
        for hook in self.on_stage_end:
            hook(self, index)

    def _load_optimizer(self, saved: TrainerState, optimizer, scheduler, lr: float) -> None:
        try:
            optimizer.load_state_dict(saved.optimizer)
            scheduler.load_state_dict(saved.scheduler or {})
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint: the optimizer state does not fit the rebuilt "
                                             f"model ({str(e).splitlines()[0][:120]})") from None
        set_learning_rate(optimizer, scheduler, lr)  # a resume may lower it
        if saved.scaler:
            self.precision.scaler.load_state_dict(saved.scaler)
        if saved.rng is not None:
            checkpoint.restore_rng(saved.rng)

    def _log_expansions(self, index: int, reports: list[dict], **fields) -> None:
        trainable, total = self.freezer.trainable(self.model), count_params(self.model)
        for report in reports:
            report.update(trainable=trainable, trainable_share=trainable / total, task=self.plan.stages[index].task,
                          **fields)
            self.history.expansions.append(report)
            self.emit("expand", **report)

    def _record_unit_health(self, index: int):
        """After training: do the stage's new units still differ from each other and their sources?"""
        from engine.health import similarity_report

        reports = [r for r in self.history.expansions if r["stage"] == index]
        for report, result in zip(reports, self._growth.results):
            if result.units:
                report["after_training"] = similarity_report(result.units)
                self.emit("health", stage=index, op=report["op"], **report["after_training"])

    # ------------------------------------------------------------------ the steps
    def train_steps(self, index, stage, optimizer, scheduler):
        """Train the stage's remaining steps (a growth swaps in a new optimizer and schedule)."""
        train, data, scaler, world = self.plan.train, self.tasks[stage.task], self.precision.scaler, self.world
        self.model.train()
        trainee = world.wrap(self.model)  # DDP in a distributed run: its hooks average the gradients
        tokens_per_step = train.batch_size * train.seq_len
        window_start, window_tokens = time.time(), 0
        trainable, total_params = self.freezer.trainable(self.model), count_params(self.model)
        plateau = PlateauDetector.for_stage(stage.grow, self.plateau_state) if stage.grow else None
        check_losses: list[float] = []
        stage_start = time.time()
        while self.position.step < stage.steps:
            step = self.position.step
            if world.broadcast_flag(self.is_main and (self.cancel_requested or self.run.cancel_request.exists())):
                self.save_checkpoint("cancel", optimizer, scheduler)
                raise Cancelled()
            batch = world.shard_rows(task_train_batch(data, train, self.plan.seed, index, step), train.batch_size)
            inputs, targets = batch_to(batch, self.device)
            with self.precision.autocast():
                logits = forward_logits(trainee, inputs)
            loss = loss_of(logits, targets)
            grad_norm = None
            if trainable:
                scaler.scale(loss).backward()
                grads = [p for p in self.model.parameters() if p.requires_grad]
                if train.grad_clip:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(grads, train.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads if p.grad is not None])
            # The global batch's loss (every rank decides alike). With float16 loss scaling an inf
            # gradient is routine (the scaler skips that step).
            loss = torch.tensor(world.all_sum([float(loss.detach())])[0] / world.size) if world.distributed else loss
            check_step(loss, None if scaler.is_enabled() else grad_norm, logits.shape[-1], index, step, self.run.id)
            if trainable:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            self.position.step = done = step + 1
            self.history.tokens += tokens_per_step
            # forward ~2·N·tokens over all weights, backward ~4·N (2 for weights we train)
            self.history.flops += tokens_per_step * (4 * total_params + 2 * (trainable or 1))
            window_tokens += tokens_per_step
            if plateau is not None:
                check_losses.append(float(loss.detach()))
            if done % train.log_interval == 0 or done == stage.steps:
                elapsed = time.time() - window_start
                self.emit("step", stage=index, step=done, global_step=self._global_step(index, done),
                          loss=float(loss.detach()), lr=scheduler.get_last_lr()[0],
                          tokens_per_s=window_tokens / max(elapsed, 1e-9),
                          tokens=self.history.tokens, flops=self.history.flops, params=total_params)
                window_start, window_tokens = time.time(), 0
                if self.status:
                    self.status.write(step=done)
            if plateau is not None and done % stage.grow.check_interval == 0:
                grow_now = plateau.update(sum(check_losses) / len(check_losses))
                check_losses = []
                self.plateau_state = plateau.state_dict()
                if grow_now and done < stage.steps:
                    started = time.perf_counter()
                    optimizer, scheduler = self.grow(index, stage, optimizer, scheduler)
                    trainable, total_params = self.freezer.trainable(self.model), count_params(self.model)
                    trainee = world.wrap(self.model)  # unwrap, grow, re-wrap
                    self.history.growths[-1]["seconds"] = time.perf_counter() - started
            if train.eval_interval and done % train.eval_interval == 0 and done < stage.steps:
                for name in self.tasks:
                    self.emit("eval", stage=index, step=done, task=name, tokens=self.history.tokens,
                              flops=self.history.flops, global_step=self._global_step(index, done),
                              **self.evaluate(name))
            if train.checkpoint_interval and done % train.checkpoint_interval == 0 and done < stage.steps:
                self.save_checkpoint("interval", optimizer, scheduler)
            self._maybe_system_sample()
        self.history.wall_s += time.time() - stage_start

    def grow(self, index: int, stage, optimizer, scheduler):
        """Grow the model in place mid-stage: apply the stage's growth operators (measured on the
        probe batch), let the new parameters join a new optimizer that carries the old
        parameters' state over (transformed for operators that split units), log it, go on."""
        k, step = self.position.growths, self.position.step
        before = dict(self.model.named_parameters())
        growth = grow_model(self.model, self.view, stage.grow.expand, index, k,
                            probe_batch(self.eval_sets[stage.task]), growth_generator(self.plan.seed, index, k))
        self.model.to(self.device)
        self.claim_modules(index, stage.task, growth)
        self._growth = combine_growth(self._growth, growth, before, self.model)
        self.freezer.apply(self.model, stage.freeze, self._growth)
        new_optimizer, new_scheduler = make_optimizer(self.model, self.freezer.masked, self.plan.train, stage)
        carry_optimizer_state(optimizer, new_optimizer, before, self.model, growth, masked=self.freezer.masked)
        continue_schedule(scheduler, new_scheduler)
        self._log_expansions(index, growth.reports, trigger=stage.grow.trigger, growth=k, step=step,
                             global_step=self._global_step(index, step), tokens=self.history.tokens,
                             flops=self.history.flops)
        self.history.growths.append({"stage": index, "growth": k, "step": step, "params": count_params(self.model),
                                     "tokens": self.history.tokens})
        self.position.growths = k + 1
        self.model.train()
        return new_optimizer, new_scheduler

    def _maybe_system_sample(self, force: bool = False, quiet: bool = False):
        if force or self.monitor.due():
            try:
                self.emit("system", **self.monitor.sample())
            except OSError:
                if not quiet:
                    raise

    # ------------------------------------------------------------------ after the stages
    def run_sweep(self):
        """Score the plan's layer mappings of the trained model, without training."""
        from engine.sweep import sweep_trained

        spec = self.plan.sweep
        self.activate(None)
        self.model.eval()
        self.sweep_result = result = sweep_trained(self.model, self.view, spec, self.eval_sets[spec.task])
        best = next((r for r in result["rows"] if not r["reference"]), None)
        reference = next((r for r in result["rows"] if r["reference"]), None)
        self.emit("sweep", task=spec.task, depth=spec.depth, rows=len(result["rows"]), best=best,
                  reference_ppl=reference and reference["ppl"], speedup=result.get("speedup"))

    def results(self, state: str) -> dict:
        sample = self.monitor.sample()
        identity = {"run": self.run.id, "plan": self.plan.name, "state": state, "seed": self.plan.seed,
                    "variant": self.info.get("variant"), "group": self.info.get("group")}
        return build_results(identity, list(self.tasks), asdict(self.history), count_params(self.model),
                             {"peak_rss_mb": self.monitor.peak_rss_mb, "torch_peak_mb": sample.get("torch_peak_mb")},
                             getattr(self, "sweep_result", None))

    def finish(self, state: str, error: str | None = None):
        """Write the ending: results.json (once set up), a status event, status.json. Each write
        is tried on its own, so a full disk loses as little as it can."""
        if not self.is_main:
            return
        extra = {"error": error} if error else {}
        if self.started:
            self._maybe_system_sample(force=True, quiet=True)
            try:
                write_json_atomic(self.run.results_json, {**self.results(state), **extra})
            except OSError:
                pass
            try:
                self.emit("status", state=state, **extra)
            except OSError:
                pass
        self.status.close(state=state, ended=time.time(), **extra)
        self.run.cancel_request.unlink(missing_ok=True)

