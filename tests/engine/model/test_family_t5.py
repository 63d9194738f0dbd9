"""T5 (and CodeT5, which is T5): both stacks, both FFN kinds, every operator that applies;
preservation measured, config depths follow, local directories load through the same code."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.grow.apply import apply_stage
from engine.plan import ExpandSpec, ModelSpec, validate_file
from tests.tiny_models import build_t5, token_batch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These matrices are tiny: on busy cores one intra-op thread is many times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXACT_OPS = [
    {"op": "widen_ffn", "size": 3},
    {"op": "widen_ffn", "size": 2, "mode": "inplace"},
    {"op": "widen_ffn", "size": 2, "mode": "inplace", "init": "net2net"},
    {"op": "widen_ffn", "size": 2, "mode": "inplace", "init": "copy_halve"},
    {"op": "add_heads", "size": 1},
    {"op": "insert_identity", "layers": [0]},
    {"op": "map_layers"},  # the identity mapping of the stack's depth at that point
    {"op": "lora", "modules": ["q", "v", "o", "up", "down"], "r": 2},
    {"op": "ia3"},
]
STACKS = ("encoder", "decoder")


def exact_specs(ops: list[int], stack: str | None, depths: dict[str, int]) -> list[ExpandSpec]:
    """The chosen exact ops on `stack` (None: both); identity mappings follow the depth reached."""
    specs = []
    for i in ops:
        op = EXACT_OPS[i]
        chosen = [stack] if stack else list(STACKS)
        if op["op"] == "map_layers":  # depths differ per stack: one identity mapping each
            specs += [ExpandSpec(op="map_layers", mapping=list(range(depths[s])), stack=s) for s in chosen]
            continue
        specs.append(ExpandSpec(stack=stack, **op))
        if op["op"] == "insert_identity":
            for s in chosen:
                depths[s] += 1
    return specs


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated=st.booleans(), stack=st.sampled_from([None, *STACKS]), seed=st.integers(0, 500),
       decoder_layers=st.integers(2, 3), heads=st.integers(2, 4), d_kv=st.sampled_from([4, 8]),
       d_model=st.sampled_from([16, 24, 32]), d_ff=st.sampled_from([16, 24, 32]),
       ops=st.lists(st.sampled_from(range(len(EXACT_OPS))), min_size=1, max_size=3))
def test_exact_operators_on_either_stack(gated, stack, seed, decoder_layers, heads, d_kv, d_model, d_ff, ops):
    model, view = build_t5(layers=2, decoder_layers=decoder_layers, heads=heads, d_kv=d_kv, d_model=d_model,
                           d_ff=d_ff, gated=gated, seed=seed)
    depths = {"encoder": 2, "decoder": decoder_layers}
    specs = exact_specs(ops, stack, depths)
    growth = apply_stage(model, view, 0, specs, token_batch(seed), torch.Generator().manual_seed(seed))
    for report in growth.reports:
        assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    # the depth fields follow, in the config and in the config copies the stacks keep
    assert (model.config.num_layers, model.config.num_decoder_layers) == (depths["encoder"], depths["decoder"])
    assert (len(model.encoder.block), len(model.decoder.block)) == (depths["encoder"], depths["decoder"])
    assert (model.encoder.config.num_layers, model.decoder.config.num_layers) == (depths["encoder"], depths["decoder"])
    for blocks in (model.encoder.block, model.decoder.block):  # the relative bias: first block only
        assert [b.layer[0].SelfAttention.has_relative_attention_bias for b in blocks] == [True] + [False] * (len(blocks) - 1)
    decoder_attention = [m for b in model.decoder.block for m in (b.layer[0].SelfAttention, b.layer[1].EncDecAttention)]
    assert [m.layer_idx for m in decoder_attention] == [i // 2 for i in range(2 * depths["decoder"])]
    # KV caches: a cached forward and generation match the uncached ones (a cache slot per block)
    x = token_batch(seed)[0]
    with torch.no_grad():
        uncached = model(input_ids=x, decoder_input_ids=x, use_cache=False).logits
        assert torch.allclose(model(input_ids=x, decoder_input_ids=x).logits, uncached, atol=1e-5)
        prompt = x[:, :4]
        cached = model.generate(prompt, max_new_tokens=2, do_sample=False, min_new_tokens=2)
        assert torch.equal(cached, model.generate(prompt, max_new_tokens=2, do_sample=False, min_new_tokens=2,
                                                  use_cache=False))


def test_moving_or_dropping_block_0_keeps_the_stack_position_bias():
    """T5's block 0 computes the relative position bias for its whole stack; after a mapping the
    first block holds that table, and the grown model equals a stock T5 built with those blocks."""
    from transformers import AutoModelForSeq2SeqLM

    model, view = build_t5(layers=2, decoder_layers=3, gated=True)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    table = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    apply_stage(model, view, 0, [ExpandSpec(op="map_layers", mapping=[1, 0], stack="encoder"),
                                 ExpandSpec(op="map_layers", mapping=[2, 1], stack="decoder")],
                token_batch(), torch.Generator())
    assert model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight is table
    assert not hasattr(model.decoder.block[1].layer[0].SelfAttention, "relative_attention_bias")
    # the same function, built by hand: a stock 2 + 2 block T5 loaded with the moved weights
    reference = AutoModelForSeq2SeqLM.from_config(model.config, attn_implementation="eager").eval()
    moved = {}
    for stack, sources in (("encoder", [1, 0]), ("decoder", [2, 1])):
        for target, source in enumerate(sources):
            prefix = f"{stack}.block.{source}."
            moved.update({k.replace(prefix, f"{stack}.block.{target}.", 1): v for k, v in old.items()
                          if k.startswith(prefix) and "relative_attention_bias" not in k})
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        moved[bias] = old[bias]
    moved.update({k: v for k, v in old.items() if ".block." not in k})
    reference.load_state_dict(moved, strict=True)
    x = token_batch(3)[0]
    with torch.no_grad():
        delta = (model(input_ids=x, decoder_input_ids=x).logits - reference(input_ids=x, decoder_input_ids=x).logits)
    assert float(delta.abs().max()) <= 1e-5


def test_a_decoder_deeper_than_the_encoder_still_generates_with_the_cache():
    """transformers sizes T5's decoder KV cache by num_layers (the encoder's depth) unless the
    config has decoder_layers; widen keeps that field equal to the decoder's depth."""
    model, view = build_t5(layers=2, decoder_layers=2)
    apply_stage(model, view, 0, [ExpandSpec(op="insert_identity", layers=[0, 1], stack="decoder")], token_batch(),
                torch.Generator())
    assert (model.config.num_layers, model.config.num_decoder_layers, model.config.decoder_layers) == (2, 4, 4)
    prompt = token_batch(2)[0][:, :5]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        assert torch.equal(cached, model.generate(prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3,
                                                  use_cache=False))


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
    from engine.model.sources import load_model

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
        [[stages.expand]]
        op = "map_layers"
        mapping = [1, 0, 2]
        stack = "encoder"
        [[stages.expand]]
        op = "map_layers"
        mapping = [1, 0, 2, 3]
        stack = "decoder"
    """))
    (tmp_path / "corpus.txt").write_text("x = 1\n" * 50)
    _, problems = validate_file(plan)
    text = "\n".join(map(str, problems))
    # layer 3 exists in the grown decoder (4 blocks) but not in the encoder (2 blocks)
    assert "stages.0.expand.1.layers: layer 3 out of range — the encoder has 2 layers" in text
    assert "the decoder has" not in text
    assert "stages.0.expand.2.stack: 'middle' is not a stack of this model — stacks: encoder, decoder" in text
    assert "stages.0.expand.3.mapping: layer 2 out of range — the encoder has 2 layers" in text
    assert "expand.4" not in text  # the decoder has 4 blocks by then; moving block 0 is allowed
    assert len(problems) == 3, text


@pytest.mark.parametrize("gated", [False, True])
def test_grown_t5_exports_as_a_standard_seq2seq_directory(tmp_path, gated):
    from engine.exports.hf_directory import export_model, load_export
    from engine.model.forward import forward_logits
    from engine.train.data import ByteTokenizer

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
    # plain transformers generates with the deeper decoder (config.decoder_layers sizes its cache)
    prompt = x[:, :4]
    with torch.no_grad():
        assert torch.equal(reloaded.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False),
                           model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False))
