"""Held-out evaluation: loss, perplexity and bits per byte on a task's fixed eval batches, and a
generation task's own scores (exact match, BLEU-4)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from engine.model.forward import forward_logits
from engine.runs import forgetting as metrics
from engine.runs.events import ReportProgress
from engine.runs.results import GENERATION_SCORES


@torch.no_grad()
def held_out(model, batches: list, autocast, bytes_per_token: float, all_sum=None,
             counted: int | None = None, on_batch: Callable[[int], None] | None = None) -> dict:
    """Mean loss per target token over `batches` (-100 targets, a generation task's prompt, do
    not count), its perplexity, and bits per byte (comparable across tokenizers). `all_sum`
    adds up (loss, tokens) over the ranks when each scored its share of the batches; only the
    first `counted` batches count (the others keep a sharded model's ranks in step). `on_batch`
    is told how many batches are done after each."""
    total, count = 0.0, 0
    for index, (inputs, targets) in enumerate(batches):
        with autocast():
            logits = forward_logits(model, inputs)
        if counted is None or index < counted:
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                     reduction="sum", ignore_index=-100)
            total += float(loss)
            count += int((targets != -100).sum())
        if on_batch:
            on_batch(index + 1)
    if all_sum is not None:
        total, count = all_sum([total, count])
    loss = total / max(1, count)
    return {"loss": loss, "ppl": metrics.perplexity(loss), "bpb": loss / math.log(2) / bytes_per_token}


@torch.no_grad()
def generation_scores(model, tokenizer, data, spec, device, seq_len: int) -> dict:
    """A generation task's scores on `spec.generate_examples` held-out prompts ({} otherwise)."""
    if spec.task_kind != "generation" or not spec.generate_examples:
        return {}
    from engine.train.generation import score_generation

    scores = score_generation(model, tokenizer, data, device, examples=spec.generate_examples,
                              max_new_tokens=spec.max_new_tokens, seq_len=seq_len)
    return {k: scores[k] for k in GENERATION_SCORES if k in scores}


class Evaluator:
    """Scores a run's tasks on the trained model (an engine.train.trained_model.TrainedModel): each on
    its own modules, its fixed eval batches shared out over the ranks and summed, and, with
    `score`, a generation task's scores. The model is back in training mode, on the task it was
    training, afterwards. `report` (``engine.runs.events.ReportProgress``, rank 0's) is told
    how many of this rank's batches are done, and when a generation task's decoding begins."""

    def __init__(self, plan, prepared, precision, world, report: ReportProgress | None = None):
        self.plan, self.prepared, self.precision, self.world = plan, prepared, precision, world
        self.report = report

    def __call__(self, trained, task: str, score: bool = False) -> dict:
        training_task, world, model, report = trained.active_task, self.world, trained.module, self.report
        trained.activate(task)
        model.eval()
        batches, counted = world.shard_list(self.prepared.eval_sets[task], lockstep=trained.sharded)
        if report:
            report("evaluate", task, 0, len(batches))
        on_batch = (lambda done: report("evaluate", task, done, len(batches))) if report else None
        result = held_out(model, batches, self.precision.autocast, self.prepared.bytes_per_token[task],
                          world.all_sum if world.distributed else None, counted, on_batch)
        if score:
            spec = self.plan.tasks[task]
            if report and spec.task_kind == "generation" and spec.generate_examples:
                report("generate", task, 0, None)  # decoding reports no steps: its start is what shows
            result.update(generation_scores(model, self.prepared.tokenizer, self.prepared.tasks[task],
                                            self.plan.tasks[task], self.prepared.device, self.plan.train.seq_len))
        model.train()
        trained.activate(training_task)
        return result
