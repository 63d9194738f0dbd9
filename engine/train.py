"""The training loop: stages, expansion, freezing, evaluation, checkpoints, cancellation.

Written for one process today and for ``torchrun`` tomorrow: only rank 0 writes files, and the
batches are a pure function of (seed, stage, step), so a resume — or another rank — gets exactly
the batch it would have had. Building the model is ``engine.build``; saving and loading state is
``engine.checkpoint`` (typed, no pickle).

A run ends in one of: ``done``; ``cancelled`` (checkpoint first); ``diverged`` (a non-finite loss,
gradient or weight: nothing non-finite is ever saved, so the last checkpoint is a good one and
``widen resume --set train.lr=...`` continues from it); ``failed`` (one line naming the stage and
step in status.json, the traceback in stderr.log).
"""

from __future__ import annotations

import errno
import math
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from engine import checkpoint, metrics, prefix_cache
from engine.arch.forward import batch_to, forward_logits, loss_of, model_kind
from engine.build import (load_plan_task, op_generator, pick_device, probe_batch, replay_expansions, stage_seed,
                          task_eval_batches, task_train_batch)
from engine.checkpoint import History, Position, TrainerState
from engine.data import load_tokenizer
from engine.errors import WidenError
from engine.events import EventWriter
from engine.expand import Freezer, StageGrowth, apply_stage, count_params
from engine.growth import (PlateauDetector, carry_optimizer_state, combine_growth, continue_schedule, grow_model,
                           growth_generator)
from engine.models import check_vocabulary, load_model
from engine.names import child_path, name_problem
from engine.plan import Plan, load_plan
from engine.results import build_results
from engine.rundir import RunDir, process_create_time, write_json_atomic
from engine.system import SystemMonitor
from engine.task_modules import TaskModules

SYSTEM_SAMPLE_S = 5.0        # seconds between system samples
# A training loss above this many times that of guessing uniformly (ln vocab) is divergence too:
# no model that still learns gets there, and such a run goes on with finite garbage for a long
# time before anything overflows (tiny-neo at lr 1e4: losses of 1e10 for 200 steps, never NaN).
DIVERGED_LOSS_FACTOR = 20.0
HEARTBEAT_S = 5.0


class Cancelled(Exception):
    pass


class Diverged(WidenError):
    """A non-finite loss, gradient norm or weight: the run stops before anything non-finite is
    saved."""

    def __init__(self, stage: int, step: int, what: str, run_id: str = "RUN"):
        self.stage, self.step = stage, step
        super().__init__(f"diverged at stage {stage} step {step}: {what} — the last checkpoint is kept; "
                         f"continue with a lower learning rate: widen resume {run_id} --set train.lr=...")


class StatusFile:
    """status.json: state, pid, host, heartbeat and progress. A thread keeps the heartbeat fresh
    while the main thread is busy (a long eval must not look like a dead worker)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"state": "running", "pid": os.getpid(), "create_time": process_create_time(os.getpid()),
                     "host": socket.gethostname(), "started": time.time(), "heartbeat": time.time()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.write()
            except OSError:  # a full disk: the main thread reports it; keep beating when space returns
                pass

    def write(self, **fields):
        with self._lock:
            self.data.update(fields, heartbeat=time.time())
            write_json_atomic(self.path, self.data)

    def close(self, **fields):
        self._stop.set()
        try:
            self.write(**fields)
        except OSError:
            # No room for a temporary copy (a full disk): overwrite in place, which needs no new
            # blocks for a file this small, so the final state is still recorded.
            with self._lock:
                self.data.update(fields, heartbeat=time.time())
                write_in_place(self.path, self.data)


def write_in_place(path: Path, data: dict) -> None:
    import json

    with open(path, "r+" if path.exists() else "w") as f:
        text = json.dumps(data, default=str)
        f.write(text)
        f.truncate(len(text))
        f.flush()
        os.fsync(f.fileno())


def lr_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Make `lr` the schedule's base rate (a resume with `--set train.lr=...`); a no-op when it
    already is, so an ordinary resume stays bit-exact."""
    if all(base == lr for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class Trainer:
    def __init__(self, run_dir: Path, resume: bool = False):
        self.run = RunDir(run_dir)
        self.plan: Plan = load_plan(self.run.plan)
        self.info = self.run.info()
        self.resume = resume
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.cancel_requested = False
        self.status: StatusFile | None = None
        self.monitor: SystemMonitor | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self):
        plan = self.plan
        self.events = EventWriter(self.run.events) if self.is_main else None
        self.monitor = SystemMonitor()
        self._last_system = 0.0
        self._peak_rss_mb = 0.0
        self.device = pick_device(plan.train.device)
        self.tokenizer = load_tokenizer(plan.model.tokenizer)
        self.model, self.view = load_model(plan.model, plan.seed)
        check_vocabulary(self.model, self.tokenizer)
        cache = self.run.path.parent / ".cache"
        kind = model_kind(self.model)
        start = getattr(getattr(self.model, "config", None), "decoder_start_token_id", None)
        self.tasks = {name: load_plan_task(name, spec, self.tokenizer, cache, kind, start)
                      for name, spec in plan.tasks.items()}
        self.model.to(self.device)
        self.freezer = Freezer()
        self.task_modules = TaskModules() if plan.task_modules else None
        self.active_task: str | None = None
        self.eval_sets = {
            name: [batch_to(b, self.device) for b in task_eval_batches(data, plan.train)]
            for name, data in self.tasks.items()
        }
        # bytes per token of each eval stream, so a loss converts to bits per byte
        self.bytes_per_token = {n: d.eval_bytes / max(1, d.eval_tokens) for n, d in self.tasks.items()}
        self.history = History()
        self.position = Position()
        self.plateau_state: dict | None = None
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(plan.train.dtype)
        if plan.train.dtype == "float16" and self.device.type != "cuda":
            raise WidenError("train.dtype = \"float16\" needs a CUDA device — use \"bfloat16\" or \"float32\" on CPU")
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=plan.train.dtype == "float16")

    def emit(self, kind: str, **fields):
        if self.events:
            self.events.emit(kind, **fields)

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
    @torch.no_grad()
    def evaluate(self, task: str) -> dict:
        training_task = self.active_task
        self.activate(task)
        self.model.eval()
        total, count = 0.0, 0
        for inputs, targets in self.eval_sets[task]:
            with self._autocast():
                logits = forward_logits(self.model, inputs)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                     reduction="sum", ignore_index=-100)
            total += float(loss)
            count += int((targets != -100).sum())  # generation tasks: continuation tokens only
        self.model.train()
        self.activate(training_task)
        loss = total / max(1, count)
        return {"loss": loss, "ppl": metrics.perplexity(loss),
                "bpb": loss / math.log(2) / self.bytes_per_token[task]}

    @torch.no_grad()
    def score(self, task: str) -> dict:
        """A generation task's own metric (exact match, BLEU-4) on held-out examples."""
        spec = self.plan.tasks[task]
        if spec.task_kind != "generation" or not spec.generate_examples:
            return {}
        from engine.generation import score_generation

        training_task = self.active_task
        self.activate(task)
        self.model.eval()
        scores = score_generation(self.model, self.tokenizer, self.tasks[task], self.device,
                                  examples=spec.generate_examples, max_new_tokens=spec.max_new_tokens,
                                  seq_len=self.plan.train.seq_len)
        self.model.train()
        self.activate(training_task)
        return {k: scores[k] for k in ("exact_match", "bleu") if k in scores}

    def evaluate_all(self, stage: int, step: int, score: bool = True) -> dict:
        row = {}
        for task in self.tasks:
            row[task] = self.evaluate(task)
            if score:
                row[task].update(self.score(task))
            self.emit("eval", stage=stage, step=step, task=task, tokens=self.history.tokens,
                      flops=self.history.flops, global_step=self._global_step(stage, step), **row[task])
        return row

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

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
            scheduler=scheduler.state_dict() if scheduler else None,
            plateau=self.plateau_state,
            task_modules=self.task_modules.to_json() if self.task_modules else None,
            scaler=self.scaler.state_dict(), rng=checkpoint.capture_rng())
        tasks = ({task: self.task_modules.state_dict(task, self.model) for task in self.task_modules.tasks()}
                 if self.task_modules else None)
        final = checkpoint.save(self.run.checkpoints / "latest", self.model, state, tasks)
        self.emit("checkpoint", stage=self.position.stage if stage is None else stage,
                  step=self.position.step if step is None else step,
                  path=str(final.relative_to(self.run.path)), reason=reason)

    def load_checkpoint(self) -> TrainerState | None:
        state = checkpoint.load_state(self.run.checkpoints / "latest")
        if state is None:
            return None
        if state.position.stage > len(self.plan.stages):
            raise checkpoint.CheckpointError(f"checkpoint: stage {state.position.stage} is beyond the plan's "
                                             f"{len(self.plan.stages)} stages — the run directory is damaged")
        self.position = state.position
        self.history = state.history
        self.plateau_state = state.plateau
        return state

    # ------------------------------------------------------------------ variants: turn and prefix
    def wait_turn(self) -> None:
        """Runs of one `widen run` (variants, seeds) go one after another: wait while the run
        before this one is queued or running (a cancel still works while waiting)."""
        before = self.info.get("after")
        if not before or self.resume or name_problem(before):  # run.json is untrusted: a name, not a path
            return
        previous = RunDir(child_path(self.run.path.parent, before))
        while previous.exists() and previous.status()["state"] in ("queued", "running"):
            if self.cancel_requested or self.run.cancel_request.exists():
                raise Cancelled()
            if self.status:
                self.status.write(state="queued", waiting_for=before)
            time.sleep(1.0)
        if self.status:
            self.status.write(state="running", waiting_for=None)

    def _prefix(self) -> tuple[int, str] | None:
        """(shared stages, cache key) when this run is a variant with a shared prefix."""
        stages = self.info.get("prefix_stages") or 0
        if not isinstance(stages, int) or not 0 <= stages <= len(self.plan.stages):
            return None  # a damaged run.json: train the stages here rather than trust it
        return (stages, self.plan.prefix_key(stages)) if stages else None

    def restore_prefix(self) -> bool:
        """Start from the cached shared stages if another variant trained them already."""
        prefix = self._prefix()
        if prefix is None or self.resume:
            return False
        entry = prefix_cache.lookup(self.run.path.parent, prefix[1])
        if entry is None:
            return False
        events, _ = prefix_cache.restore(entry, self.run.checkpoints / "latest")
        for event in events:
            if self.events:
                self.events.write_raw({**event, "cached": True})
        return True

    def publish_prefix(self, index: int) -> None:
        prefix = self._prefix()
        if not self.is_main or prefix is None or index != prefix[0] - 1 or self.history.prefix_cached:
            return
        from engine.events import read_all

        events = [e for e in read_all(self.run.events) if e.get("type") not in ("start", "status", "system")]
        prefix_cache.publish(self.run.path.parent, prefix[1], self.run.checkpoints / "latest", events,
                             {"run": self.run.id, "stages": prefix[0], "key": prefix[1],
                              "wall_s": self.history.wall_s})

    # ------------------------------------------------------------------ main loop
    def run_plan(self):
        self.status = StatusFile(self.run.status_json) if self.is_main else None
        self.wait_turn()
        self.setup()
        plan = self.plan
        from_cache = self.restore_prefix()
        saved = self.load_checkpoint() if (self.resume or from_cache) else None
        if from_cache:
            self.history.prefix_cached = True
        self.emit("start", run=self.run.id, plan=plan.name, seed=plan.seed, device=str(self.device),
                  pid=os.getpid(), params=count_params(self.model), stages=len(plan.stages),
                  resumed=saved is not None and not from_cache, prefix_cached=from_cache,
                  task_names=list(self.tasks), variant=self.info.get("variant"),
                  stage_steps=[s.steps for s in plan.stages], system=self.monitor.gpu_status)
        if self.resume:
            # Readers drop what an earlier segment logged past this point (engine.events).
            at = self.position if saved is not None else Position()
            self.emit("resume", stage=at.stage, step=at.step, global_step=self._global_step(at.stage, at.step),
                      ops_applied=at.ops_applied, from_checkpoint=saved is not None)
        torch.manual_seed(plan.seed)
        if saved is not None:
            self._rebuild_to(self.position.stage, self.position.ops_applied, saved)
            checkpoint.load_weights(self.model, self.run.checkpoints / "latest", self.device)
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

    def _rebuild_to(self, stage: int, ops_applied: bool, saved: TrainerState):
        """Replay the expansions (and growths) a checkpoint had, so its weights fit the model."""
        stages = stage + (1 if ops_applied else 0)
        self._growth = replay_expansions(self.model, self.view, self.plan, stages, self.history.growths)
        if self.task_modules is not None and saved.task_modules:
            self.task_modules = TaskModules.from_json(saved.task_modules, self.model)
            self.active_task = None
        self.model.to(self.device)

    def run_stage(self, index: int, saved: TrainerState | None):
        plan, stage = self.plan, self.plan.stages[index]
        label = plan.stage_label(index)
        task = self.tasks[stage.task]
        self.position.stage = index
        if self.status:
            self.status.write(stage=index, stage_name=label, step=self.position.step, steps=stage.steps)
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="begin",
                  global_step=self._global_step(index, 0), tokens=self.history.tokens,
                  flops=self.history.flops)

        if not self.position.ops_applied:
            self.activate(stage.task)  # expansions are measured on the task's own model
            growth = apply_stage(self.model, self.view, index, stage.expand, probe_batch(self.eval_sets[stage.task]),
                                 op_generator(self.plan.seed, index))
            self.model.to(self.device)
            self.claim_modules(index, stage.task, growth)
            self.freezer.apply(self.model, stage.freeze, growth)
            trainable, total = self.freezer.trainable(self.model), count_params(self.model)
            for report in growth.reports:
                report.update(trainable=trainable, trainable_share=trainable / total, task=stage.task)
                self.history.expansions.append(report)
                self.emit("expand", **report)
            self.position.ops_applied, self.position.step, self.position.growths = True, 0, 0
            self._growth = growth
            self.plateau_state = None
        else:
            self.freezer.apply(self.model, stage.freeze, getattr(self, "_growth", StageGrowth()))
        self.activate(stage.task)

        optimizer, scheduler = self._optimizer(stage)
        if saved is not None and saved.optimizer is not None:
            try:
                optimizer.load_state_dict(saved.optimizer)
                scheduler.load_state_dict(saved.scheduler or {})
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise checkpoint.CheckpointError(f"checkpoint: the optimizer state does not fit the rebuilt "
                                                 f"model ({str(e).splitlines()[0][:120]})") from None
            set_learning_rate(optimizer, scheduler, stage.lr or plan.train.lr)  # a resume may lower it
            if saved.scaler:
                self.scaler.load_state_dict(saved.scaler)
            if saved.rng is not None:
                checkpoint.restore_rng(saved.rng)
        else:
            torch.manual_seed(stage_seed(plan.seed, index))

        optimizer, scheduler = self.train_steps(index, stage, task, optimizer, scheduler)
        total, trainable = count_params(self.model), self.freezer.trainable(self.model)
        self._record_unit_health(index)

        row = self.evaluate_all(stage=index, step=stage.steps)
        self.history.matrix.append(row)
        self.history.row_labels.append(f"after {label}")
        self.history.trained_at.setdefault(stage.task, index)
        self.history.stage_params.append({"stage": index, "name": label, "task": stage.task,
                                             "total": total, "trainable": trainable,
                                             "trainable_share": trainable / total})
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="end",
                  params=total, trainable=trainable)
        self.position.stage, self.position.step, self.position.ops_applied = index + 1, 0, False
        self.save_checkpoint("stage end", stage=index, step=stage.steps)
        self.publish_prefix(index)

    def _record_unit_health(self, index: int):
        """After training: do the stage's new units still differ from each other and their sources?"""
        from engine.health import similarity_report

        reports = [r for r in self.history.expansions if r["stage"] == index]
        results = getattr(self, "_growth", StageGrowth()).results
        for report, result in zip(reports, results):
            if result.units:
                report["after_training"] = similarity_report(result.units)
                self.emit("health", stage=index, op=report["op"], **report["after_training"])

    def _optimizer(self, stage):
        """AdamW over what trains now, and the stage's learning-rate schedule."""
        lr = stage.lr or self.plan.train.lr
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                masked = id(p) in self.freezer.masked
                (no_decay if masked or p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.plan.train.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]] or [{"params": []}], lr=lr)
        train = self.plan.train
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(train.schedule, s, stage.steps, train.warmup_steps))
        return optimizer, scheduler

    # ------------------------------------------------------------------ training
    def train_steps(self, index, stage, task, optimizer, scheduler):
        """Train the stage's remaining steps; returns the optimizer and schedule in use (a growth
        replaces them)."""
        train = self.plan.train
        self.model.train()
        tokens_per_step = train.batch_size * train.seq_len
        window_start, window_tokens = time.time(), 0
        trainable, total_params = self.freezer.trainable(self.model), count_params(self.model)
        plateau = self._plateau_detector(stage)
        check_losses: list[float] = []
        stage_start = time.time()
        while self.position.step < stage.steps:
            step = self.position.step
            if self.cancel_requested or self.run.cancel_request.exists():
                self.save_checkpoint("cancel", optimizer, scheduler)
                raise Cancelled()
            inputs, targets = batch_to(task_train_batch(task, train, self.plan.seed, index, step), self.device)
            with self._autocast():
                logits = forward_logits(self.model, inputs)
            loss = loss_of(logits, targets)
            if trainable:
                self.scaler.scale(loss).backward()
                grads = [p for p in self.model.parameters() if p.requires_grad]
                if train.grad_clip:
                    self.scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(grads, train.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads if p.grad is not None])
                # One sync for both checks. With float16 loss scaling an inf gradient is routine
                # (the scaler skips that step), so only the loss counts there.
                self._check_finite(index, step, loss, None if self.scaler.is_enabled() else grad_norm,
                                   logits.shape[-1])
                self.scaler.step(optimizer)
                self.scaler.update()
                optimizer.zero_grad(set_to_none=True)
            else:
                self._check_finite(index, step, loss, None, logits.shape[-1])
            scheduler.step()
            self.position.step = step + 1
            self.history.tokens += tokens_per_step
            # forward ~2·N·tokens over all weights, backward ~4·N (2 for weights we train)
            self.history.flops += tokens_per_step * (4 * total_params + 2 * (trainable or 1))
            window_tokens += tokens_per_step
            done = step + 1
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
                    optimizer, scheduler = self.grow(index, stage, optimizer, scheduler)
                    trainable, total_params = self.freezer.trainable(self.model), count_params(self.model)
            if train.eval_interval and done % train.eval_interval == 0 and done < stage.steps:
                for name in self.tasks:
                    result = self.evaluate(name)
                    self.emit("eval", stage=index, step=done, task=name, tokens=self.history.tokens,
                              flops=self.history.flops, global_step=self._global_step(index, done), **result)
            if train.checkpoint_interval and done % train.checkpoint_interval == 0 and done < stage.steps:
                self.save_checkpoint("interval", optimizer, scheduler)
            self._maybe_system_sample()
        self.history.wall_s += time.time() - stage_start
        return optimizer, scheduler

    def _check_finite(self, stage: int, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None,
                      vocab: int) -> None:
        """Raise Diverged on a non-finite loss or gradient norm, or an exploded loss."""
        values = loss.detach().float().reshape(1)
        if grad_norm is not None:
            values = torch.cat([values, grad_norm.detach().float().reshape(1).to(values.device)])
        bound = DIVERGED_LOSS_FACTOR * math.log(max(vocab, 2))
        if bool(torch.isfinite(values).all()) and float(values[0]) <= bound:  # one sync per step
            return
        loss_value = float(values[0])
        if not math.isfinite(loss_value):
            raise Diverged(stage, step, f"the loss is {loss_value}", self.run.id)
        if loss_value > bound:
            raise Diverged(stage, step, f"the loss is {loss_value:.3g}, above {DIVERGED_LOSS_FACTOR:g}·ln(vocab "
                           f"{vocab}) = {bound:.1f}", self.run.id)
        raise Diverged(stage, step, f"the gradient norm is {float(values[1])}", self.run.id)

    def _plateau_detector(self, stage) -> PlateauDetector | None:
        if stage.grow is None:
            return None
        g = stage.grow
        detector = PlateauDetector(patience=g.patience, threshold=g.threshold, mode=g.mode,
                                   cooldown=g.cooldown, warmup_checks=g.warmup_checks, max_growths=g.max_growths)
        if self.plateau_state:
            detector.load_state_dict(self.plateau_state)
        return detector

    def grow(self, index: int, stage, optimizer, scheduler):
        """Grow the model in place mid-stage: apply the stage's growth operators (measured on the
        probe batch), let the new parameters join a new optimizer that carries the old
        parameters' state over (transformed for operators that split units), log it, go on."""
        k = self.position.growths
        step = self.position.step
        before = dict(self.model.named_parameters())
        growth = grow_model(self.model, self.view, stage.grow.expand, index, k,
                            probe_batch(self.eval_sets[stage.task]), growth_generator(self.plan.seed, index, k))
        self.model.to(self.device)
        self.claim_modules(index, stage.task, growth)
        self._growth = combine_growth(self._growth, growth, before, self.model)
        self.freezer.apply(self.model, stage.freeze, self._growth)
        new_optimizer, new_scheduler = self._optimizer(stage)
        carry_optimizer_state(optimizer, new_optimizer, before, self.model, growth, masked=self.freezer.masked)
        continue_schedule(scheduler, new_scheduler)
        trainable, total = self.freezer.trainable(self.model), count_params(self.model)
        for report in growth.reports:
            report.update(trainable=trainable, trainable_share=trainable / total, task=stage.task,
                          trigger=stage.grow.trigger, growth=k, step=step,
                          global_step=self._global_step(index, step), tokens=self.history.tokens,
                          flops=self.history.flops)
            self.history.expansions.append(report)
            self.emit("expand", **report)
        self.history.growths.append({"stage": index, "growth": k, "step": step,
                                        "params": total, "tokens": self.history.tokens})
        self.position.growths = k + 1
        self.model.train()
        return new_optimizer, new_scheduler

    def _global_step(self, index: int, step: int) -> int:
        return sum(s.steps for s in self.plan.stages[:max(index, 0)]) + step

    def _maybe_system_sample(self, force: bool = False, quiet: bool = False):
        now = time.time()
        if force or now - self._last_system >= SYSTEM_SAMPLE_S:
            self._last_system = now
            sample = self.monitor.sample()
            self._peak_rss_mb = max(self._peak_rss_mb, sample.get("rss_mb") or 0.0)
            try:
                self.emit("system", **sample)
            except OSError:
                if not quiet:
                    raise

    # ------------------------------------------------------------------ the mapping sweep
    def run_sweep(self):
        """Score the plan's layer mappings of the trained model, without training."""
        from engine.sweep import default_mappings, mapping_sweep

        spec = self.plan.sweep
        self.activate(None)
        self.model.eval()
        mappings = spec.mappings or default_mappings(self.view.num_layers, spec.depth, spec.keep_ends, spec.limit)
        result = mapping_sweep(self.model, self.eval_sets[spec.task], mappings)
        result.update(task=spec.task, depth=spec.depth)
        self.sweep_result = result
        best = next((r for r in result["rows"] if not r["reference"]), None)
        reference = next((r for r in result["rows"] if r["reference"]), None)
        self.emit("sweep", task=spec.task, depth=spec.depth, rows=len(result["rows"]), best=best,
                  reference_ppl=reference and reference["ppl"], speedup=result.get("speedup"))

    # ------------------------------------------------------------------ results
    def results(self, state: str) -> dict:
        sample = self.monitor.sample()
        self._peak_rss_mb = max(self._peak_rss_mb, sample.get("rss_mb") or 0.0)
        identity = {"run": self.run.id, "plan": self.plan.name, "state": state, "seed": self.plan.seed,
                    "variant": self.info.get("variant"), "group": self.info.get("group")}
        return build_results(identity, list(self.tasks), asdict(self.history), count_params(self.model),
                             {"peak_rss_mb": self._peak_rss_mb, "torch_peak_mb": sample.get("torch_peak_mb")},
                             getattr(self, "sweep_result", None))

    def finish(self, state: str, error: str | None = None):
        """Write the ending: results.json (when setup got far enough to have any), a status event,
        status.json. Each write is tried on its own, so a full disk loses as little as it can."""
        extra = {"error": error} if error else {}
        if self.is_main:
            if self.monitor is not None and hasattr(self, "tasks"):
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


def run(run_dir: Path | str, resume: bool = False) -> int:
    """Run (or resume) the plan in `run_dir`; returns the process exit code (0 done or cancelled,
    1 otherwise). Never raises: every ending is recorded in status.json (and events, results
    where they can still be written) as one line; unexpected errors add a traceback to stderr."""
    run_dir = Path(run_dir)
    checkpoint.remove_leftovers(RunDir(run_dir).checkpoints)  # the caller holds the run's lock
    trainer = None
    try:
        trainer = Trainer(run_dir, resume=resume)
        trainer.run_plan()
        return 0
    except Cancelled:
        trainer.finish("cancelled")
        return 0
    except Diverged as e:
        _end(trainer, run_dir, "diverged", str(e))
        return 1
    except WidenError as e:
        message = str(e).splitlines()[0]
        _end(trainer, run_dir, "failed", message if message.startswith("stage ") else _where(trainer) + message)
        return 1
    except Exception as e:
        traceback.print_exc()
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno == errno.ENOSPC else detail
        _end(trainer, run_dir, "failed", f"{_where(trainer)}{e.__class__.__name__}: {reason}")
        return 1


def _where(trainer: Trainer | None) -> str:
    if trainer is None or not hasattr(trainer, "position") or trainer.monitor is None:
        return ""
    return f"stage {trainer.position.stage} step {trainer.position.step}: "


def _end(trainer: Trainer | None, run_dir: Path, state: str, message: str) -> None:
    """Record how the run ended wherever anything can still be written: stderr.log, then
    results/events/status; a full disk still gets the final status (written in place)."""
    try:
        print(f"widen: run {state}: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass
    if trainer is not None and trainer.status is not None:
        try:
            trainer.finish(state, error=message)
            return
        except Exception:
            trainer.status.close(state=state, ended=time.time(), error=message)
            return
    status = {"state": state, "error": message, "ended": time.time(), "pid": os.getpid(),
              "create_time": process_create_time(os.getpid()), "host": socket.gethostname()}
    path = RunDir(run_dir).status_json
    try:
        write_json_atomic(path, status)
    except OSError:
        write_in_place(path, status)
