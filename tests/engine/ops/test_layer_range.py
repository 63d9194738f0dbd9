"""A block index past the model's depth, through the Python API (no plan check before it): every
operator that takes `layers` says so in one line on that field, not with an IndexError."""

from __future__ import annotations

import pytest
import torch

from engine.ops.params import OPS, LayeredOpParams
from engine.ops.registry import apply_operator
from tests.tiny_models import build

# the settings each op needs besides `layers` (the rest are its schema's defaults)
NEEDS = {"widen_ffn": {"size": 4}, "add_heads": {"size": 2}, "concat_linear": {"modules": ["up"], "size": 2},
         "parallel_linear": {"modules": ["up"]}, "widen_mlp": {"size": 2}, "upcycle": {"experts": 4}}
LAYERED = sorted(name for name, d in OPS.items() if issubclass(d.schema, LayeredOpParams)
                 and "causal_lm" in d.model_kinds)


@pytest.mark.parametrize("op", LAYERED)
def test_a_layer_past_the_depth_is_one_line_on_layers(op):
    model, view = build("llama", 2, 2, 4, 16, seed=0)
    params = OPS[op].schema.model_validate({"op": op, "layers": [0, 5], **NEEDS.get(op, {})})
    with pytest.raises(ValueError, match=r"^layers: layer 5 out of range — the model has 2 layers \(0\.\.1\)$"):
        apply_operator(view, params, torch.Generator().manual_seed(0))
