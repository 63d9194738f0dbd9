"""One forward pass and loss for every kind of model widen grows, so measurement code (probes,
health, training) never asks which kind it holds.

- causal_lm  ``model(input_ids=x).logits``, next-token cross-entropy against ``y``.
- seq2seq    encoder and decoder both read ``x`` (teacher forcing), cross-entropy against ``y``:
             a fixed, cheap probe of the whole function (the generation task of the experiments
             builds real prompt/continuation pairs).
- mlp        a plain module (``nn.Sequential``): ``model(x)``; integer targets are classes
             (cross-entropy), float targets are regression (mean squared error).
"""

from __future__ import annotations

import torch

MODEL_KINDS = ("causal_lm", "seq2seq", "mlp")


def model_kind(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return "mlp"
    from engine.arch.families import family_for

    return family_for(getattr(config, "model_type", "")).kind


def forward_logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    kind = model_kind(model)
    if kind == "mlp":
        return model(inputs)
    if kind == "seq2seq":
        # no cache: transformers sizes it by the encoder depth, which a grown decoder may exceed
        return model(input_ids=inputs, decoder_input_ids=inputs, use_cache=False).logits
    return model(input_ids=inputs).logits


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.is_floating_point():
        return torch.nn.functional.mse_loss(logits.float(), targets.float())
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten())
