"""The built-in models (engine.model.sources.BUILTIN_MODELS): built with no network, seeded, for
the byte tokenizer; the shape `widen plan check` reads from the entry alone (no transformers) is
the loaded model's; and the Llama-shaped one takes the operators GPT-Neo has no class for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.model.sources import BUILTIN_MODELS, load_architecture, load_model
from engine.model.view import active_params, count_params
from engine.train.data import ByteTokenizer


def spec(name: str) -> SimpleNamespace:
    return SimpleNamespace(source=f"builtin:{name}", revision=None, family=None)


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_a_builtin_model_is_its_entry(name):
    checked = load_architecture(spec(name))   # what plan check reads: the entry, without transformers
    model, view = load_model(spec(name), seed=3)
    again, _ = load_model(spec(name), seed=3)
    assert model.config.vocab_size == ByteTokenizer.vocab_size
    facts = ("num_layers", "hidden_size", "ffn_size", "num_heads", "num_kv_heads")
    assert [getattr(checked, f) for f in facts] == [getattr(view, f) for f in facts]
    assert checked.family.name == view.family.name
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tiny_llama_upcycles_exactly_and_counts_its_active_parameters():
    from engine.ops.params import UpcycleParams
    from engine.ops.registry import apply_operator

    model, view = load_model(spec("tiny-llama"), seed=0, attention="eager")
    assert view.family.name == "llama" and view.num_kv_heads == 2 and view.ffn_size == 344
    dense = count_params(model)
    assert active_params(model) == dense
    inputs = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(inputs).logits
    apply_operator(view, UpcycleParams(experts=4, top_k=2, init="copy"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = model(inputs).logits
    assert view.family.name == "mixtral" and (after - before).abs().max() <= 1e-5
    ffn = 3 * 128 * 344                  # gate, up, down of one dense FFN = one expert
    router = 4 * 128                     # per layer
    assert count_params(model) == dense + 4 * (3 * ffn + router)
    assert active_params(model) == dense + 4 * (ffn + router)   # 2 of 4 experts per token
