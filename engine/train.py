"""The training loop: stages, expansion, freezing, evaluation, checkpoints, cancellation.

Written for one process today and for ``torchrun`` tomorrow: only rank 0 writes files, and the
batches are a pure function of (seed, stage, step), so a resume — or another rank — gets exactly
the batch it would have had.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from engine.arch.forward import forward_logits, loss_of
from engine import metrics
from engine.data import eval_batches, load_task, load_tokenizer, train_batch
from engine.events import EventWriter
from engine.expand import Freezer, StageGrowth, apply_stage, count_params
from engine.models import check_vocabulary, load_model
from engine.plan import Plan, load_plan
from engine.rundir import RunDir, write_json_atomic
from engine.system import SystemMonitor

PROBE_SEQUENCES = 4          # sequences in the fixed probe batch used to measure expansions
SYSTEM_SAMPLE_S = 5.0        # seconds between system samples
HEARTBEAT_S = 5.0


class Cancelled(Exception):
    pass


# -- shared with engine.export (build a plan's model without training) -------------------------
def op_generator(seed: int, stage: int) -> torch.Generator:
    """The generator a stage's operators draw from: the same in a run, a resume and an export."""
    return torch.Generator().manual_seed(seed * 1000 + stage)


def task_eval_batches(data, train) -> list:
    """A task's fixed eval batches (numpy) for the plan's `train` settings."""
    return eval_batches(data.eval, train.batch_size, train.seq_len, train.eval_batches)


def probe_batch(eval_set: list) -> tuple:
    """The fixed probe batch that measures expansions: the first eval batch, PROBE_SEQUENCES rows."""
    return tuple(t[:PROBE_SEQUENCES] for t in eval_set[0])


def replay_expansions(model, view, plan, stages: int) -> StageGrowth:
    """Apply the operators of the first `stages` stages unmeasured (to fit a checkpoint's shape);
    returns the last stage's growth."""
    growth = StageGrowth()
    for index in range(stages):
        growth = apply_stage(model, view, index, plan.stages[index].expand, None,
                             op_generator(plan.seed, index), measure=False)
    return growth


class StatusFile:
    """status.json: state, pid, host, heartbeat and progress. A thread keeps the heartbeat fresh
    while the main thread is busy (a long eval must not look like a dead worker)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.time(), "heartbeat": time.time()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            self.write()

    def write(self, **fields):
        with self._lock:
            self.data.update(fields, heartbeat=time.time())
            write_json_atomic(self.path, self.data)

    def close(self, **fields):
        self._stop.set()
        self.write(**fields)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = \"cuda\" but CUDA is not available — use \"auto\" or \"cpu\"")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def lr_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class Trainer:
    def __init__(self, run_dir: Path, resume: bool = False):
        self.run = RunDir(run_dir)
        self.plan: Plan = load_plan(self.run.plan)
        self.resume = resume
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.cancel_requested = False

    # ------------------------------------------------------------------ set-up
    def setup(self):
        plan = self.plan
        self.events = EventWriter(self.run.events) if self.is_main else None
        self.status = StatusFile(self.run.status_json) if self.is_main else None
        self.monitor = SystemMonitor()
        self._last_system = 0.0
        self.device = pick_device(plan.train.device)
        self.tokenizer = load_tokenizer(plan.model.tokenizer)
        cache = self.run.path.parent / ".cache"
        self.tasks = {name: load_task(name, spec, self.tokenizer, cache) for name, spec in plan.tasks.items()}
        self.model, self.view = load_model(plan.model, plan.seed)
        check_vocabulary(self.model, self.tokenizer)
        self.model.to(self.device)
        self.freezer = Freezer()
        self.eval_sets = {
            name: [self._tensors(b) for b in task_eval_batches(data, plan.train)]
            for name, data in self.tasks.items()
        }
        # bytes per token of each eval stream, so a loss converts to bits per byte
        self.bytes_per_token = {n: d.eval_bytes / max(1, d.eval_tokens) for n, d in self.tasks.items()}
        self.history = {"matrix": [], "row_labels": [], "expansions": [], "stage_params": [],
                        "trained_at": {}, "tokens": 0, "flops": 0.0, "wall_s": 0.0, "curves": []}
        self.position = {"stage": 0, "step": 0, "ops_applied": False, "initial_done": False}
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(plan.train.dtype)
        if plan.train.dtype == "float16" and self.device.type != "cuda":
            raise ValueError("train.dtype = \"float16\" needs a CUDA device — use \"bfloat16\" or \"float32\" on CPU")
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=plan.train.dtype == "float16")

    def _tensors(self, batch):
        inputs, targets = batch
        return (torch.as_tensor(inputs, device=self.device), torch.as_tensor(targets, device=self.device))

    def emit(self, kind: str, **fields):
        if self.events:
            self.events.emit(kind, **fields)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, task: str) -> dict:
        self.model.eval()
        total, count = 0.0, 0
        for inputs, targets in self.eval_sets[task]:
            with self._autocast():
                logits = forward_logits(self.model, inputs)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                     reduction="sum")
            total += float(loss)
            count += targets.numel()
        self.model.train()
        loss = total / max(1, count)
        return {"loss": loss, "ppl": metrics.perplexity(loss),
                "bpb": loss / math.log(2) / self.bytes_per_token[task]}

    def evaluate_all(self, stage: int, step: int) -> dict:
        row = {}
        for task in self.tasks:
            row[task] = self.evaluate(task)
            self.emit("eval", stage=stage, step=step, task=task, tokens=self.history["tokens"], **row[task])
        return row

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, reason: str, optimizer=None, scheduler=None, stage: int | None = None,
                        step: int | None = None):
        """Save weights + trainer state; `stage`/`step` label the event (default: the position)."""
        if not self.is_main:
            return
        from safetensors.torch import save_model

        final = self.run.checkpoints / "latest"
        tmp = self.run.checkpoints / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        torch.save({
            "position": dict(self.position),
            "history": self.history,
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }, tmp / "trainer.pt")
        # swap directories so a crash leaves either the old checkpoint or the new one
        old = self.run.checkpoints / ".old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        self.emit("checkpoint", stage=self.position["stage"] if stage is None else stage,
                  step=self.position["step"] if step is None else step,
                  path=str(final.relative_to(self.run.path)), reason=reason)

    def load_checkpoint(self) -> dict | None:
        path = self.run.checkpoints / "latest" / "trainer.pt"
        if not path.exists():
            return None
        state = torch.load(path, weights_only=False, map_location="cpu")
        self.position = state["position"]
        self.history = state["history"]
        return state

    # ------------------------------------------------------------------ main loop
    def run_plan(self):
        self.setup()
        plan = self.plan
        saved = self.load_checkpoint() if self.resume else None
        self.emit("start", run=self.run.id, plan=plan.name, seed=plan.seed, device=str(self.device),
                  pid=os.getpid(), params=count_params(self.model), stages=len(plan.stages),
                  resumed=saved is not None, task_names=list(self.tasks),
                  stage_steps=[s.steps for s in plan.stages], system=self.monitor.gpu_status)
        torch.manual_seed(plan.seed)
        if saved is not None:
            self._rebuild_to(self.position["stage"], self.position["ops_applied"])
            from safetensors.torch import load_model as load_weights

            load_weights(self.model, str(self.run.checkpoints / "latest" / "model.safetensors"),
                         device=str(self.device))
        if not self.position["initial_done"]:
            self.history["matrix"].append(self.evaluate_all(stage=-1, step=0))
            self.history["row_labels"].append("initial")
            self.position["initial_done"] = True

        start_stage = self.position["stage"]
        for index in range(start_stage, len(plan.stages)):
            self.run_stage(index, saved if index == start_stage else None)
        self.finish("done")

    def _rebuild_to(self, stage: int, ops_applied: bool):
        """Replay the expansions a checkpoint had, so its weights fit the model's shape."""
        self._growth = replay_expansions(self.model, self.view, self.plan, stage + (1 if ops_applied else 0))
        self.model.to(self.device)

    def _op_generator(self, stage: int) -> torch.Generator:
        return op_generator(self.plan.seed, stage)

    def run_stage(self, index: int, saved: dict | None):
        plan, stage = self.plan, self.plan.stages[index]
        label = plan.stage_label(index)
        task = self.tasks[stage.task]
        self.position["stage"] = index
        if self.status:
            self.status.write(stage=index, stage_name=label, step=self.position["step"], steps=stage.steps)
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="begin")

        if not self.position["ops_applied"]:
            growth = apply_stage(self.model, self.view, index, stage.expand, probe_batch(self.eval_sets[stage.task]),
                                 self._op_generator(index))
            self.model.to(self.device)
            self.freezer.apply(self.model, stage.freeze, growth)
            trainable, total = self.freezer.trainable(self.model), count_params(self.model)
            for report in growth.reports:
                report.update(trainable=trainable, trainable_share=trainable / total)
                self.history["expansions"].append(report)
                self.emit("expand", **report)
            self.position.update(ops_applied=True, step=0)
            self._growth = growth
        else:
            self.freezer.apply(self.model, stage.freeze, getattr(self, "_growth", StageGrowth()))
        total, trainable = count_params(self.model), self.freezer.trainable(self.model)

        optimizer, scheduler = self._optimizer(stage)
        if saved is not None and saved.get("optimizer") is not None:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
            rng = saved["rng"]
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

        self.train_steps(index, stage, task, optimizer, scheduler, trainable)
        self._record_unit_health(index)

        row = self.evaluate_all(stage=index, step=stage.steps)
        self.history["matrix"].append(row)
        self.history["row_labels"].append(f"after {label}")
        self.history["trained_at"].setdefault(stage.task, index)
        self.history["stage_params"].append({"stage": index, "name": label, "task": stage.task,
                                             "total": total, "trainable": trainable,
                                             "trainable_share": trainable / total})
        self.emit("stage", stage=index, name=label, task=stage.task, steps=stage.steps, phase="end",
                  params=total, trainable=trainable)
        self.position.update(stage=index + 1, step=0, ops_applied=False)
        self.save_checkpoint("stage end", stage=index, step=stage.steps)

    def _record_unit_health(self, index: int):
        """After training: do the stage's new units still differ from each other and their sources?"""
        from engine.health import similarity_report

        reports = [r for r in self.history["expansions"] if r["stage"] == index]
        results = getattr(self, "_growth", StageGrowth()).results
        for report, result in zip(reports, results):
            if result.units:
                report["after_training"] = similarity_report(result.units)
                self.emit("health", stage=index, op=report["op"], **report["after_training"])

    def _optimizer(self, stage):
        lr = stage.lr or self.plan.train.lr
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                masked = id(p) in self.freezer.masked
                (no_decay if masked or p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.plan.train.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
        train = self.plan.train
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(train.schedule, s, stage.steps, train.warmup_steps))
        return optimizer, scheduler

    def train_steps(self, index, stage, task, optimizer, scheduler, trainable: int):
        train = self.plan.train
        self.model.train()
        tokens_per_step = train.batch_size * train.seq_len
        window_start, window_tokens = time.time(), 0
        params_for_flops = trainable or 1
        total_params = count_params(self.model)
        stage_start = time.time()
        while self.position["step"] < stage.steps:
            step = self.position["step"]
            if self.cancel_requested or self.run.cancel_request.exists():
                self.save_checkpoint("cancel", optimizer, scheduler)
                raise Cancelled()
            inputs, targets = self._tensors(train_batch(task.train, train.batch_size, train.seq_len,
                                                        self.plan.seed, index, step))
            with self._autocast():
                logits = forward_logits(self.model, inputs)
            loss = loss_of(logits, targets)
            if trainable:
                self.scaler.scale(loss).backward()
                if train.grad_clip:
                    self.scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in self.model.parameters() if p.requires_grad], train.grad_clip)
                self.scaler.step(optimizer)
                self.scaler.update()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            self.position["step"] = step + 1
            self.history["tokens"] += tokens_per_step
            # forward ~2·N·tokens over all weights, backward ~4·N (2 for weights we train)
            self.history["flops"] += tokens_per_step * (4 * total_params + 2 * params_for_flops)
            window_tokens += tokens_per_step
            done = step + 1
            if done % train.log_interval == 0 or done == stage.steps:
                elapsed = time.time() - window_start
                self.emit("step", stage=index, step=done, global_step=self._global_step(index, done),
                          loss=float(loss.detach()), lr=scheduler.get_last_lr()[0],
                          tokens_per_s=window_tokens / max(elapsed, 1e-9),
                          tokens=self.history["tokens"], flops=self.history["flops"])
                window_start, window_tokens = time.time(), 0
                if self.status:
                    self.status.write(step=done)
            if train.eval_interval and done % train.eval_interval == 0 and done < stage.steps:
                for name in self.tasks:
                    result = self.evaluate(name)
                    self.emit("eval", stage=index, step=done, task=name, tokens=self.history["tokens"], **result)
            if train.checkpoint_interval and done % train.checkpoint_interval == 0 and done < stage.steps:
                self.save_checkpoint("interval", optimizer, scheduler)
            self._maybe_system_sample()
        self.history["wall_s"] += time.time() - stage_start

    def _global_step(self, index: int, step: int) -> int:
        return sum(s.steps for s in self.plan.stages[:index]) + step

    def _maybe_system_sample(self, force: bool = False):
        now = time.time()
        if force or now - self._last_system >= SYSTEM_SAMPLE_S:
            self._last_system = now
            self.emit("system", **self.monitor.sample())

    # ------------------------------------------------------------------ results
    def results(self, state: str) -> dict:
        h = self.history
        tasks = list(self.tasks)
        matrix = h["matrix"]
        forgetting = metrics.forgetting(matrix, h["trained_at"]) if matrix else {}
        forgetting_ppl = metrics.forgetting(matrix, h["trained_at"], "ppl") if matrix else {}
        final = matrix[-1] if matrix else {}
        summary = {
            "final_ppl": {t: final[t]["ppl"] for t in final},
            "final_bpb": {t: final[t]["bpb"] for t in final},
            "forgetting": {t: (f["absolute"] if f else None) for t, f in forgetting.items()},
            "bwt": metrics.backward_transfer(matrix, h["trained_at"]) if matrix else None,
            "params": count_params(self.model),
            "params_added": sum(r["params_added"] for r in h["expansions"]),
            "trainable_share": h["stage_params"][-1]["trainable_share"] if h["stage_params"] else None,
            "max_abs_logit_delta": max((r["max_abs_logit_delta"] for r in h["expansions"]), default=None),
            "tokens": h["tokens"],
            "wall_s": round(h["wall_s"], 2),
            "tokens_per_s": h["tokens"] / h["wall_s"] if h["wall_s"] else None,
            "peak_rss_mb": self.monitor.sample()["rss_mb"],
        }
        return {
            "run": self.run.id, "plan": self.plan.name, "state": state, "seed": self.plan.seed,
            "tasks": tasks,
            "sign_convention": metrics.SIGN_CONVENTION,
            "forgetting_definition": metrics.FORGETTING_DEFINITION,
            "matrix": {"rows": h["row_labels"], "tasks": tasks,
                       "loss": [[r[t]["loss"] for t in tasks] for r in matrix],
                       "ppl": [[r[t]["ppl"] for t in tasks] for r in matrix],
                       "bpb": [[r[t]["bpb"] for t in tasks] for r in matrix]},
            "forgetting": {"loss": forgetting, "ppl": forgetting_ppl},
            "stages": h["stage_params"],
            "expansions": h["expansions"],
            "summary": summary,
        }

    def finish(self, state: str, error: str | None = None):
        self._maybe_system_sample(force=True)
        if self.is_main:
            write_json_atomic(self.run.results_json, self.results(state))
            self.emit("status", state=state, **({"error": error} if error else {}))
            self.status.close(state=state, ended=time.time(), **({"error": error} if error else {}))
            self.run.cancel_request.unlink(missing_ok=True)


def run(run_dir: Path | str, resume: bool = False) -> int:
    """Run (or resume) the plan in `run_dir`; returns the process exit code."""
    trainer = Trainer(Path(run_dir), resume=resume)
    try:
        trainer.run_plan()
        return 0
    except Cancelled:
        trainer.finish("cancelled")
        return 0
    except Exception as e:
        message = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if getattr(trainer, "status", None) is not None:
            try:
                trainer.finish("failed", error=message)
            except Exception:
                trainer.status.close(state="failed", ended=time.time(), error=message)
        else:
            write_json_atomic(RunDir(run_dir).status_json,
                              {"state": "failed", "error": message, "ended": time.time(),
                               "pid": os.getpid(), "host": socket.gethostname()})
        raise

