"""Held-out evaluation: loss, perplexity and bits per byte on a task's fixed eval batches, and a
generation task's own scores (exact match, BLEU-4)."""

from __future__ import annotations

import math

import torch

from engine import metrics
from engine.arch.forward import forward_logits
from engine.results import GENERATION_SCORES


@torch.no_grad()
def held_out(model, batches: list, autocast, bytes_per_token: float, all_sum=None) -> dict:
    """Mean loss per target token over `batches` (-100 targets, a generation task's prompt, do
    not count), its perplexity, and bits per byte (comparable across tokenizers). `all_sum`
    adds up (loss, tokens) over the ranks when each scored its share of the batches."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        with autocast():
            logits = forward_logits(model, inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                 reduction="sum", ignore_index=-100)
        total += float(loss)
        count += int((targets != -100).sum())
    if all_sum is not None:
        total, count = all_sum([total, count])
    loss = total / max(1, count)
    return {"loss": loss, "ppl": metrics.perplexity(loss), "bpb": loss / math.log(2) / bytes_per_token}


@torch.no_grad()
def generation_scores(model, tokenizer, data, spec, device, seq_len: int) -> dict:
    """A generation task's scores on `spec.generate_examples` held-out prompts ({} otherwise)."""
    if spec.task_kind != "generation" or not spec.generate_examples:
        return {}
    from engine.generation import score_generation

    scores = score_generation(model, tokenizer, data, device, examples=spec.generate_examples,
                              max_new_tokens=spec.max_new_tokens, seq_len=seq_len)
    return {k: scores[k] for k in GENERATION_SCORES if k in scores}
