"""Mistral and Qwen2 share the Llama description (Qwen2 adds q/k/v biases; both use GQA): every
operator kind stays exact and the grown model exports to a directory that reloads the same."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from engine.exports.hf_directory import export_model, load_export
from engine.grow.apply import apply_stage
from engine.model.forward import forward_logits
from engine.model.view import ArchView
from engine.plan import ExpandSpec
from engine.train.data import ByteTokenizer
from tests.tiny_models import VOCAB, token_batch


@pytest.mark.parametrize("config_class", [MistralConfig, Qwen2Config])
def test_llama_variants_grow_exactly_and_export(tmp_path, config_class):
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=24, max_position_embeddings=64, head_dim=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    view = ArchView(model.config, model)
    assert view.family.name == "llama"
    specs = [ExpandSpec(op="widen_ffn", size=3), ExpandSpec(op="add_heads", size=2),
             ExpandSpec(op="insert_identity", layers=[0]), ExpandSpec(op="map_layers", mapping=[0, 1, 2]),
             ExpandSpec(op="lora", modules=["q", "k", "gate"], r=2), ExpandSpec(op="ia3")]
    growth = apply_stage(model, view, 0, specs, token_batch(), torch.Generator().manual_seed(0))
    for report in growth.reports:
        assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    x = token_batch(1)[0]
    with torch.no_grad():
        expected = forward_logits(model, x)
    export_model(model, ByteTokenizer(), tmp_path / "out")
    reloaded = load_export(tmp_path / "out")
    assert type(reloaded).__name__ == type(model).__name__
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (6, 3)
    with torch.no_grad():
        assert float((forward_logits(reloaded, x) - expected).abs().max()) <= 1e-4
