"""widen's growth inside a user's own Hugging Face ``Trainer``.

``GrowthCallback`` is a plan's ``[stages.grow]`` as a ``TrainerCallback``: the operators (tables
as in ``[[stages.grow.expand]]``, validated by their schemas) and the trigger settings
(engine.plan.GrowSpec: "plateau", "at", "budget"; engine.grow.triggers decides when). At a growth the
model grows in place (engine.grow.growth.grow_model, measured on a fixed probe batch), and the
Trainer's optimizer and learning-rate schedule are rebuilt with the AdamW state carried over
(carry_optimizer_state) and the schedule continued (continue_schedule) — the rule of
engine/grow/growth.py, so training goes on where it was. Each growth is logged through the Trainer
(``trainer.log``: ``state.log_history`` and every ``report_to`` tracker) and, with `run_dir`, the
whole training is written as a widen run directory (start, stage, step, eval, expand, status
events; status.json with a heartbeat; results.json), which ``widen runs`` / ``watch`` / ``show`` /
``compare`` and the TUI read like any run (the runs index picks new directories up by itself).

``TaskModulesCallback`` switches task-specific modules (engine.api.TaskModules) to the task each
evaluation dataset is named after (``eval_dataset={"code": ..., "docs": ...}``).

One process, one device (no DDP / FSDP / DeepSpeed wrapping: growing a wrapped model in place is
refused in one line).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from engine.errors import WidenError
from engine.grow.apply import Freezer, StageGrowth
from engine.grow.growth import (
    apply_state_policy,
    carry_optimizer_state,
    combine_growth,
    continue_schedule,
    grow_model,
    growth_generator,
)
from engine.grow.triggers import Progress, make_trigger
from engine.model.forward import IGNORE_INDEX
from engine.model.view import ArchView, active_params, count_params

__all__ = ["GrowthCallback", "GrowthSettingsError", "TaskModulesCallback"]

PROBE_ROWS = 4
STAGE = 0  # a Trainer run is one stage of widen's vocabulary


class GrowthSettingsError(WidenError, ValueError):
    """Growth settings the plan schema refuses, or a Trainer setup the callback cannot grow in."""


def grow_spec(expand: Sequence[dict], trigger: str = "plateau", **settings):
    """The engine.plan.GrowSpec of these settings (as a plan's ``[stages.grow]``), every operator
    checked against its schema: one line per problem, ``grow.expand.0.sise: unknown key — ...``."""
    from pydantic import ValidationError

    from engine.plan import GrowSpec, problems_from_pydantic

    data = {"trigger": trigger, **settings, "expand": [dict(op) for op in expand]}
    try:
        spec = GrowSpec.model_validate(data)
    except ValidationError as e:
        problems = problems_from_pydantic(e.errors(), prefix="grow", model=GrowSpec)
        raise GrowthSettingsError("\n".join(f"{p.path}: {p.message}" for p in problems)) from None
    problems = []
    for i, op in enumerate(spec.expand):
        from engine.ops.params import OPS

        if op.op not in OPS:
            problems.append(f"grow.expand.{i}.op: unknown operator '{op.op}' — ops: {', '.join(OPS)}")
            continue
        try:
            op.params()
        except ValidationError as e:
            problems += [f"{p.path}: {p.message}" for p in
                         problems_from_pydantic(e.errors(), prefix=f"grow.expand.{i}", model=OPS[op.op].schema)]
    if problems:
        raise GrowthSettingsError("\n".join(problems))
    return spec


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _new_run_dir(root: Path, name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:32] or "run"
    return root / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(2)}"


class _RunWriter:
    """The widen run directory of a Trainer run: run.json, status.json (heartbeat), events.jsonl,
    results.json at the end (engine.runs.rundir's layout, as a worker writes it)."""

    def __init__(self, path: Path, name: str, seed: int):
        from engine.runs.events import EventWriter
        from engine.runs.rundir import RunDir, write_json_atomic
        from engine.runs.status import StatusFile

        self.run = RunDir(path)
        path.mkdir(parents=True, exist_ok=False)
        now = time.time()
        write_json_atomic(self.run.run_json, {
            "id": self.run.id, "name": name, "plan_name": name, "seed": seed, "plan_path": None,
            "source": "transformers.Trainer (engine.integrations.hf)",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)), "created_ts": now})
        self.status = StatusFile(self.run.status_json)
        self.events = EventWriter(self.run.events)
        self.name, self.seed, self.started = name, seed, now

    def emit(self, kind: str, **fields):
        return self.events.emit(kind, **fields)

    def finish(self, state: str, history: dict, tasks: list[str], params: int, active: int) -> None:
        from engine.runs.results import build_results
        from engine.runs.rundir import write_json_atomic

        identity = {"run": self.run.id, "plan": self.name, "state": state, "seed": self.seed,
                    "variant": None, "group": None}
        document = build_results(identity, tasks, history, params, {"peak_rss_mb": None, "torch_peak_mb": None},
                                 active_params=active)
        write_json_atomic(self.run.results_json, document)
        self.emit("status", state=state)
        self.status.close(state=state, ended=time.time())
        self.events.close()


class GrowthCallback(TrainerCallback):
    """Grow the Trainer's model when a trigger fires, as a plan's ``[stages.grow]`` does.

    `expand`: the operators, ``[{"op": "widen_ffn", "size": 64, "init": "net2net"}, ...]``;
    `trigger` and `settings`: a ``[stages.grow]``'s (``patience``, ``threshold``, ``mode``,
    ``cooldown``, ``check_interval``, ``warmup_checks``, ``max_growths``; ``at_steps`` /
    ``at_tokens`` for "at"; ``budget_flops`` / ``at_fractions`` for "budget"), validated by
    engine.plan.GrowSpec. The plateau check reads the Trainer's logged training loss: the mean of
    the losses logged over each `check_interval` steps (log every step or at a divisor of it).

    `probe`: the ``(inputs, targets)`` batch each growth is measured on (default: the first rows
    of the evaluation dataset, else of the training dataset); `freeze`: None keeps each tensor's
    ``requires_grad`` (grown tensors inherit theirs, new ones train), or a stage's policy
    ("none", "base", name globs) applied after every growth; `seed`: the operators' draws
    (engine.grow.growth.growth_generator). `run_dir`: a directory to write the run to (it must not
    exist), or True for a new one under the runs root ($WIDEN_HOME or ./runs); `run_name` names it.
    `bytes_per_token` (1.0 for a byte-level tokenizer) turns evaluation losses into bits per byte,
    widen's comparable loss; without it results.json has no evaluation matrix (the events keep
    every evaluation's loss and perplexity).

    ``attach(trainer)`` adds the callback to its Trainer (it rebuilds that Trainer's optimizer
    and schedule). ``reports``: each growth's report (the fields of an ``expand`` event)."""

    def __init__(self, expand: Sequence[dict], *, trigger: str = "plateau", probe=None, freeze=None, seed: int = 0,
                 run_dir: Path | str | bool | None = None, run_name: str = "hf-trainer",
                 bytes_per_token: float | None = None, **settings):
        self.spec = grow_spec(expand, trigger, **settings)
        if self.spec.schedule_after != "continue":
            raise GrowthSettingsError('grow.schedule_after: only "continue" in a Trainer (its scheduler is the '
                                      'Trainer\'s own) — remove it')
        self.trigger = make_trigger(self.spec)
        self.probe, self.freeze, self.seed = probe, freeze, seed
        self.run_dir, self.run_name, self.bytes_per_token = run_dir, run_name, bytes_per_token
        self.trainer = None
        self.view: ArchView | None = None
        self.growth = StageGrowth()          # everything the growths added (for freeze = "base")
        self.freezer = Freezer() if freeze is not None else None
        self.reports: list[dict] = []
        self.carried: list[dict] = []        # carry_optimizer_state's counts, per growth
        self.writer: _RunWriter | None = None
        self._check_sum, self._check_steps, self._last_logged = 0.0, 0, 0
        self._history = {"matrix": [], "row_labels": [], "expansions": [], "stage_params": [], "trained_at": {},
                         "tokens": 0, "flops": 0.0, "wall_s": 0.0, "growths": [], "prefix_cached": False}
        self._evals: dict[str, dict] = {}
        self._window = (time.time(), 0)

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer) -> "GrowthCallback":
        """Add this callback to `trainer` (whose optimizer and schedule a growth rebuilds)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _require_trainer(self):
        if self.trainer is None:
            raise GrowthSettingsError("GrowthCallback: no Trainer — add it with callback.attach(trainer) "
                                      "instead of Trainer(callbacks=[...])")
        return self.trainer

    def _progress(self, state, loss: float | None = None) -> Progress:
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        flops = float(state.total_flos) + float(getattr(self.trainer, "current_flos", 0.0) or 0.0)
        return Progress(step=state.global_step, tokens=tokens, flops=flops, loss=loss)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._require_trainer()
        if self.spec.trigger == "at" and self.spec.at_tokens and args.include_num_input_tokens_seen == "no":
            raise GrowthSettingsError("grow.at_tokens: the Trainer counts no tokens — set "
                                      "TrainingArguments(include_num_input_tokens_seen=True), or use at_steps")
        self.view = ArchView.of(trainer.model)
        if self.probe is None:
            self.probe = self._default_probe(trainer)
        if self.run_dir:
            from engine.runs.rundir import runs_root

            path = _new_run_dir(runs_root(), self.run_name) if self.run_dir is True else Path(self.run_dir)
            self.writer = _RunWriter(path, self.run_name, args.seed)
            params = count_params(trainer.model)
            self.writer.emit("start", run=self.writer.run.id, plan=self.run_name, seed=args.seed,
                             device=str(args.device), pid=os.getpid(), params=params, stages=1, resumed=False,
                             stage_steps=[state.max_steps], task_names=self._eval_tasks(trainer),
                             source="transformers.Trainer")
            self.writer.emit("stage", stage=STAGE, name="train", task="train", steps=state.max_steps, phase="begin",
                             global_step=state.global_step, tokens=0, flops=0.0)
            self.writer.status.write(stage=STAGE, stage_name="train", step=state.global_step, steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.spec.trigger != "plateau" and state.global_step < state.max_steps:
            if self.trigger.update(self._progress(state)):
                self._grow(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and not any(k.startswith("widen/") for k in logs):
            steps = state.global_step - self._last_logged
            self._last_logged = state.global_step
            self._log_step(args, state, logs)
            if self.spec.trigger == "plateau" and steps > 0:
                self._check_sum += float(logs["loss"]) * steps
                self._check_steps += steps
                if self._check_steps >= self.spec.check_interval:
                    mean = self._check_sum / self._check_steps
                    self._check_sum, self._check_steps = 0.0, 0
                    if self.trigger.update(self._progress(state, mean)) and state.global_step < state.max_steps:
                        self._grow(state)
        self._log_evals(state, logs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.writer is None:
            return
        trainer = self.trainer
        params = count_params(trainer.model)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        history = self._history
        history.update(tokens=self._progress(state).tokens, flops=self._progress(state).flops,
                       wall_s=time.time() - self.writer.started)
        history["stage_params"] = [{"stage": STAGE, "name": "train", "task": "train", "total": params,
                                    "trainable": trainable, "trainable_share": trainable / params}]
        tasks = list(self._evals)
        if self._evals and self.bytes_per_token:  # the matrix's figures are over bits per byte
            history["matrix"], history["row_labels"] = [dict(self._evals)], ["after train"]
            history["trained_at"] = {t: STAGE for t in tasks}
        self.writer.emit("stage", stage=STAGE, name="train", task="train", steps=state.max_steps, phase="end",
                         params=params, trainable=trainable)
        self.writer.finish("done", history, tasks, params, active_params(trainer.model))

    # ------------------------------------------------------------------ the growth
    def _grow(self, state) -> None:
        trainer = self.trainer
        model = trainer.model
        if trainer.model_wrapped is not model or getattr(trainer, "is_deepspeed_enabled", False) \
                or getattr(trainer, "is_fsdp_enabled", False):
            raise GrowthSettingsError("GrowthCallback: the Trainer wraps its model (DDP, FSDP or DeepSpeed) — "
                                      "growing in place needs one process on one device")
        k = self.trigger.growths - 1
        started = time.perf_counter()
        device = next(model.parameters()).device
        before = dict(model.named_parameters())
        trains = {name: p.requires_grad for name, p in before.items()}
        probe = tuple(t.to(device) for t in self.probe)
        grown = grow_model(model, self.view, self.spec.expand, STAGE, k, probe,
                           growth_generator(self.seed, STAGE, k))
        model.to(device)
        self.growth = combine_growth(self.growth, grown, before, model)
        if self.freezer is None:
            for name, p in model.named_parameters():
                p.requires_grad_(trains.get(name, True))
            masked = None
        else:
            self.freezer.apply(model, self.freeze if isinstance(self.freeze, str) else list(self.freeze), self.growth)
            masked = self.freezer.masked
        carried = self._rebuild_optimizer(trainer, before, grown, masked, state)
        model.train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        progress = self._progress(state)
        for report in grown.reports:
            report.update(trainable=trainable, trainable_share=trainable / count_params(model), task="train",
                          trigger=self.spec.trigger, growth=k, step=state.global_step,
                          global_step=state.global_step, tokens=progress.tokens, flops=progress.flops,
                          seconds=time.perf_counter() - started)
            self.reports.append(report)
            self._history["expansions"].append(report)
            if self.writer is not None:
                self.writer.emit("expand", stage=STAGE, **{k2: v for k2, v in report.items() if k2 != "stage"})
            trainer.log({"widen/growth": k, "widen/params_added": report["params_added"],
                         "widen/params": report["params_after"], "widen/exact": float(report["exact"]),
                         "widen/max_abs_logit_delta": report["max_abs_logit_delta"],
                         "widen/loss_before": report["loss_before"], "widen/loss_after": report["loss_after"]})
        self.carried.append(carried)
        self._history["growths"].append({"stage": STAGE, "growth": k, "step": state.global_step,
                                         "params": count_params(model), "tokens": progress.tokens})

    def _rebuild_optimizer(self, trainer, before: dict, grown: StageGrowth, masked, state) -> dict:
        """A fresh optimizer over what trains now (the Trainer's own create_optimizer, prepared by
        its accelerator as at the start), the old AdamW state carried over, the schedule continued."""
        old_optimizer, old_scheduler = trainer.optimizer, trainer.lr_scheduler
        trainer.optimizer, trainer.lr_scheduler = None, None
        new_raw = trainer.create_optimizer()
        if masked:  # tensors that train only their grown entries take no weight decay
            self._no_decay(new_raw, masked)
        counts = carry_optimizer_state(_unwrap_optimizer(old_optimizer), new_raw, before, trainer.model, grown,
                                       masked=masked)
        apply_state_policy(new_raw, grown, self.spec.optimizer_state)  # carry, reset or asymmetric
        accelerator = trainer.accelerator
        new_optimizer = accelerator.prepare_optimizer(new_raw)
        if old_optimizer in getattr(accelerator, "_optimizers", []):
            accelerator._optimizers.remove(old_optimizer)  # the old one would be saved and stepped by nobody
        trainer.optimizer = new_optimizer
        trainer.create_scheduler(num_training_steps=state.max_steps, optimizer=new_optimizer)
        continue_schedule(old_scheduler, trainer.lr_scheduler)
        return counts

    @staticmethod
    def _no_decay(optimizer, masked: dict) -> None:
        moved = []
        for group in optimizer.param_groups:
            if group.get("weight_decay"):
                moved += [p for p in group["params"] if id(p) in masked]
                group["params"] = [p for p in group["params"] if id(p) not in masked]
        if moved:
            zero = next((g for g in optimizer.param_groups if not g.get("weight_decay")), None)
            if zero is None:
                optimizer.add_param_group({"params": moved, "weight_decay": 0.0})
            else:
                zero["params"] += moved

    # ------------------------------------------------------------------ probe, logging
    @staticmethod
    def _eval_tasks(trainer) -> list[str]:
        if isinstance(trainer.eval_dataset, dict):
            return list(trainer.eval_dataset)
        return ["eval"] if trainer.eval_dataset is not None else []

    @staticmethod
    def _default_probe(trainer) -> tuple:
        """The first PROBE_ROWS rows of the evaluation dataset (else the training one), collated
        by the Trainer's collator: (input_ids, next-token targets)."""
        dataset = trainer.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        dataset = dataset if dataset is not None else trainer.train_dataset
        if dataset is None:
            raise GrowthSettingsError("GrowthCallback: no dataset to take a probe batch from — pass probe=(inputs, "
                                      "targets)")
        rows = [dataset[i] for i in range(min(PROBE_ROWS, len(dataset)))]
        batch = trainer.data_collator(rows)
        inputs = torch.as_tensor(batch["input_ids"])
        labels = torch.as_tensor(batch.get("labels", inputs))
        pad = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype)
        return inputs, torch.cat([labels[:, 1:], pad], dim=1)  # the model shifts labels itself; widen does not

    def _log_step(self, args, state, logs: dict) -> None:
        if self.writer is None:
            return
        progress = self._progress(state)
        now, (since, tokens_then) = time.time(), self._window
        rate = (progress.tokens - tokens_then) / max(now - since, 1e-9) if progress.tokens else None
        self._window = (now, progress.tokens)
        self.writer.emit("step", stage=STAGE, step=state.global_step, global_step=state.global_step,
                         loss=_number(logs.get("loss")), lr=_number(logs.get("learning_rate")), tokens_per_s=rate,
                         tokens=progress.tokens or None, flops=progress.flops,
                         params=count_params(self.trainer.model))
        self.writer.status.write(step=state.global_step)

    def _log_evals(self, state, logs: dict) -> None:
        for key, value in logs.items():
            match = re.fullmatch(r"eval_(?:(.+)_)?loss", key)
            if not match or not isinstance(value, (int, float)):
                continue
            task = match.group(1) or "eval"
            bpb = float(value) / (math.log(2) * self.bytes_per_token) if self.bytes_per_token else None
            scores = {"loss": float(value), "ppl": math.exp(min(float(value), 700.0)), "bpb": bpb}
            self._evals[task] = scores
            if self.writer is not None:
                self.writer.emit("eval", stage=STAGE, step=state.global_step, task=task, **scores)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class TaskModulesCallback(TrainerCallback):
    """Evaluate each task on its own modules: with ``eval_dataset={"code": ..., "docs": ...}``,
    the Trainer evaluates each dataset in turn; `tasks` (engine.api.TaskModules) is switched to
    the dataset's name before its evaluation (names it does not know run on every module), and
    back to `train_task` (None: every module) after. ``attach(trainer)`` adds it."""

    def __init__(self, tasks, train_task: str | None = None):
        self.tasks, self.train_task = tasks, train_task
        self.switched: list[str | None] = []   # the tasks switched to, in order (what was evaluated how)

    def attach(self, trainer) -> "TaskModulesCallback":
        """Add to `trainer`, and switch as its evaluation dataloaders are made (one per dataset name)."""
        original = trainer.get_eval_dataloader

        def get_eval_dataloader(eval_dataset=None):
            if isinstance(eval_dataset, str):
                self._switch(eval_dataset if eval_dataset in self.tasks.tasks() else None)
            return original(eval_dataset)

        trainer.get_eval_dataloader = get_eval_dataloader
        trainer.add_callback(self)
        return self

    def _switch(self, task: str | None) -> None:
        self.tasks.switch(task)
        self.switched.append(task)

    def on_train_begin(self, args, state, control, **kwargs):
        self._switch(self.train_task)

    def on_evaluate(self, args, state, control, **kwargs):
        self._switch(self.train_task)

