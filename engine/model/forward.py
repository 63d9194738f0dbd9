"""One forward pass and loss for every kind of model widen grows, so measurement code (probes,
health, training) never asks which kind it holds.

- causal_lm  ``model(input_ids=x).logits``, next-token cross-entropy against ``y`` (targets of -100,
             prompt and padding of generation tasks, are ignored).
- seq2seq    ``x = (encoder_ids, decoder_input_ids)`` (the generation tasks of engine.train.generation:
             the encoder reads the prompt, padding masked by the config's pad id; the decoder is
             teacher-forced on the shifted continuation). A plain tensor ``x``: encoder and decoder
             both read it, a fixed, cheap probe of the whole function (text tasks).
- mlp        a plain module (``nn.Sequential``): ``model(x)``; integer targets are classes
             (cross-entropy), float targets are regression (mean squared error).
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

MODEL_KINDS = ("causal_lm", "seq2seq", "mlp")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_kind(model: torch.nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)
    if config is None:
        return "mlp"
    from engine.model.families import family_of

    return family_of(config).kind


IGNORE_INDEX = -100  # targets never scored: prompt tokens and padding of generation tasks

Batch = Union[torch.Tensor, np.ndarray, tuple, list]


def forward_logits(model: torch.nn.Module, inputs) -> torch.Tensor:
    """`inputs`: a tensor, or for seq2seq models a tuple ``(encoder_ids, decoder_input_ids)``."""
    kind = model_kind(model)
    if kind == "mlp":
        return model(inputs)
    if kind == "seq2seq":
        # no cache: transformers sizes it by the encoder depth, which a grown decoder may exceed
        if isinstance(inputs, (tuple, list)):
            encoder_ids, decoder_ids = inputs
            return model(input_ids=encoder_ids, attention_mask=_padding_mask(model, encoder_ids),
                         decoder_input_ids=decoder_ids, use_cache=False).logits
        return model(input_ids=inputs, decoder_input_ids=inputs, use_cache=False).logits
    return model(input_ids=inputs).logits


def _padding_mask(model, ids: torch.Tensor) -> torch.Tensor | None:
    """The encoder must not attend to right padding (decoder padding needs no mask: it only
    follows the real tokens, and its targets are ignored)."""
    pad = getattr(unwrap(model).config, "pad_token_id", None)
    return None if pad is None else (ids != pad).long()


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE_INDEX (-100), or mean squared
    error for float targets."""
    if targets.is_floating_point():
        return torch.nn.functional.mse_loss(logits.float(), targets.float())
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                                             ignore_index=IGNORE_INDEX)


def batch_to(batch: Batch, device) -> Batch:
    """numpy arrays or tensors, nested in tuples/lists, as tensors on `device` (same nesting,
    tuples for lists)."""
    if isinstance(batch, (tuple, list)):
        return tuple(batch_to(part, device) for part in batch)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.as_tensor(batch, device=device)
    # pinned host memory: the copy is asynchronous, the step does not wait for the host
    return torch.as_tensor(batch).pin_memory().to(device, non_blocking=True)


def slice_batch(batch: Batch, n: int) -> Batch:
    """The first n rows of every array or tensor in a (nested) batch."""
    if isinstance(batch, (tuple, list)):
        return tuple(slice_batch(part, n) for part in batch)
    return batch[:n]
