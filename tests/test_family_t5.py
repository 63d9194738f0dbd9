"""T5 (and CodeT5, which is T5): both stacks, both FFN kinds, every operator that applies;
preservation measured, config depths follow, local directories load through the same code."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.expand import apply_stage
from engine.plan import ExpandSpec, ModelSpec, validate_file
from tests.tiny_models import build_t5, token_batch

EXACT_OPS = [
    {"op": "widen_ffn", "size": 3},
    {"op": "widen_ffn", "size": 2, "mode": "inplace", "init": "net2net"},
    {"op": "add_heads", "size": 1},
    {"op": "insert_identity", "layers": [0]},
    {"op": "lora", "modules": ["q", "v", "o", "up", "down"], "r": 2},
    {"op": "ia3"},
]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated=st.booleans(), stack=st.sampled_from([None, "encoder", "decoder"]), seed=st.integers(0, 500),
       ops=st.lists(st.sampled_from(range(len(EXACT_OPS))), min_size=1, max_size=4))
def test_exact_operators_on_both_stacks(gated, stack, seed, ops):
    model, view = build_t5(gated=gated, seed=seed)
    encoder, decoder = model.config.num_layers, model.config.num_decoder_layers
    specs = [ExpandSpec(stack=stack, **EXACT_OPS[i]) for i in ops]
    growth = apply_stage(model, view, 0, specs, token_batch(seed), torch.Generator().manual_seed(seed))
    for report in growth.reports:
        assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    inserted = sum(1 for i in ops if EXACT_OPS[i]["op"] == "insert_identity")
    assert model.config.num_layers == encoder + (inserted if stack in (None, "encoder") else 0)
    assert model.config.num_decoder_layers == decoder + (inserted if stack in (None, "decoder") else 0)
    assert len(model.encoder.block) == model.config.num_layers
    assert len(model.decoder.block) == model.config.num_decoder_layers
    assert [b.layer[0].SelfAttention.layer_idx for b in model.decoder.block] == list(range(len(model.decoder.block)))


def test_identity_in_the_decoder_zeroes_cross_attention_too():
    model, view = build_t5()
    apply_stage(model, view, 0, [ExpandSpec(op="insert_identity", layers=[1], stack="decoder")], token_batch(),
                torch.Generator())
    twin = model.decoder.block[2]
    assert twin.layer[1].EncDecAttention.o.weight.abs().sum() == 0
    assert twin.layer[2].DenseReluDense.wo.weight.abs().sum() == 0
    assert model.decoder.block[1].layer[1].EncDecAttention.o.weight.abs().sum() > 0


def test_split_and_mapping_are_measured_per_stack():
    model, view = build_t5()
    growth = apply_stage(model, view, 0, [ExpandSpec(op="split_residual", layers=[1], stack="encoder"),
                                          ExpandSpec(op="map_layers", mapping=[0, 1, 1, 2], stack="decoder")],
                         token_batch(), torch.Generator())
    assert [r["exact"] for r in growth.reports] == [False, False]
    assert all(0 < r["max_abs_logit_delta"] < float("inf") for r in growth.reports)
    assert (model.config.num_layers, model.config.num_decoder_layers) == (3, 4)


def test_add_heads_needs_every_block_and_a_stack_must_exist():
    model, view = build_t5()
    with pytest.raises(ValueError, match="every block"):
        apply_stage(model, view, 0, [ExpandSpec(op="add_heads", size=1, layers=[1])], token_batch(), torch.Generator())
    llama_like = ExpandSpec(op="widen_ffn", size=2, stack="encoder")
    from tests.tiny_models import build

    gpt2, gpt2_view = build("gpt2", 1, 2, 4, 8, 0)
    with pytest.raises(ValueError, match="one stack"):
        apply_stage(gpt2, gpt2_view, 0, [llama_like], token_batch(), torch.Generator())


def test_local_directory_loads_and_plan_check_uses_the_right_stack(tmp_path):
    from engine.models import load_model

    model, _ = build_t5(layers=2, decoder_layers=3)
    model.save_pretrained(tmp_path / "t5")
    loaded, view = load_model(ModelSpec(source=str(tmp_path / "t5")), seed=0)
    assert type(loaded).__name__ == "T5ForConditionalGeneration" and view.family.kind == "seq2seq"
    with torch.no_grad():
        x = token_batch()[0]
        assert torch.allclose(loaded.eval()(input_ids=x, decoder_input_ids=x, use_cache=False).logits,
                              model(input_ids=x, decoder_input_ids=x, use_cache=False).logits, atol=1e-6)
    plan = tmp_path / "plan.toml"
    plan.write_text(textwrap.dedent(f"""
        name = "t5"
        [model]
        source = "{tmp_path / 't5'}"
        [tasks.code]
        source = "{tmp_path / 'corpus.txt'}"
        [[stages]]
        task = "code"
        steps = 0
        [[stages.expand]]
        op = "insert_identity"
        layers = [2]
        stack = "decoder"
        [[stages.expand]]
        op = "widen_ffn"
        size = 2
        layers = [3]
        [[stages.expand]]
        op = "widen_ffn"
        size = 2
        stack = "middle"
    """))
    (tmp_path / "corpus.txt").write_text("x = 1\n" * 50)
    _, problems = validate_file(plan)
    text = "\n".join(map(str, problems))
    # layer 3 exists in the grown decoder (4 blocks) but not in the encoder (2 blocks)
    assert "stages.0.expand.1.layers: layer 3 out of range — the encoder has 2 layers" in text
    assert "the decoder has" not in text
    assert "stages.0.expand.2.stack: 'middle' is not a stack of this model — stacks: encoder, decoder" in text


@pytest.mark.parametrize("gated", [False, True])
def test_grown_t5_exports_as_a_standard_seq2seq_directory(tmp_path, gated):
    from engine.arch.forward import forward_logits
    from engine.data import ByteTokenizer
    from engine.export import export_model, load_export

    model, view = build_t5(gated=gated)
    specs = [ExpandSpec(op="widen_ffn", size=3), ExpandSpec(op="widen_ffn", size=2, mode="inplace"),
             ExpandSpec(op="insert_identity", layers=[1], stack="decoder"),
             ExpandSpec(op="map_layers", mapping=[0, 1, 1], stack="encoder"),
             ExpandSpec(op="lora", modules=["q", "down"], r=2)]
    apply_stage(model, view, 0, specs, token_batch(), torch.Generator().manual_seed(0))
    x = token_batch(1)[0]
    with torch.no_grad():
        expected = forward_logits(model, x)
    manifest = export_model(model, ByteTokenizer(), tmp_path / "out")
    assert manifest["model_class"] == "AutoModelForSeq2SeqLM"
    reloaded = load_export(tmp_path / "out")
    with torch.no_grad():
        assert float((forward_logits(reloaded, x) - expected).abs().max()) <= 1e-4
    config = reloaded.config
    assert (config.num_layers, config.num_decoder_layers, config.d_ff) == (3, 4, 24 + 5)
