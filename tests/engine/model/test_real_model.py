"""SmolLM2-135M-Instruct, a real pretrained model (tests/conftest.py `real_model`): what tiny random
models cannot show. Its GGUF loads as its Hugging Face directory does; one exact operator of each
kind keeps its logits on real weights; a grown model exports and reloads with the same greedy
continuation. Each test skips in one line where the package registry cannot be reached."""

from __future__ import annotations

import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.exports.hf_directory import build_from_plan, export_model, reference_logits, reload_delta, stage_probe
from engine.model.sources import load_model
from engine.plan import ModelSpec, load_plan
from engine.plan.load import validate_file
from engine.train.data import load_tokenizer

pytestmark = pytest.mark.real_model
PROMPT = "The capital of France is"
EXACT = 1e-4  # max |Δlogits| of an exact operator in float32, on logits of magnitude ~20

# One exact operator of each kind (width, heads, d_model, depth, adapters) on the real shape:
# 30 blocks, d_model 576, 9 query heads in 3 key-value groups of 64.
EXACT_OPS = {
    "widen_ffn": 'op = "widen_ffn"\nsize = 128\nlayers = [0, 14, 29]',
    "add_heads": 'op = "add_heads"\nsize = 3\nlayers = [3]',
    "widen_hidden": 'op = "widen_hidden"\nsize = 288\ninit = "lossless"',
    "insert_identity": 'op = "insert_identity"\nlayers = [29]',
    "lora": 'op = "lora"\nr = 4\nlayers = [0, 29]',
    "ia3": 'op = "ia3"\nlayers = [10]',
}


def _plan(tmp_path, source, tokenizer, expand: str, name: str):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paris is the capital of France. Rome is number {i}." for i in range(40)))
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        name = "{name}"
        seed = 1
        [model]
        source = "{source}"
        tokenizer = "{tokenizer}"
        [tasks.facts]
        source = "{corpus}"
        [train]
        batch_size = 1
        seq_len = 24
        eval_batches = 1
        device = "cpu"
        [[stages]]
        task = "facts"
        steps = 1
    """) + "".join(f"[[stages.expand]]\n{op}\n" for op in expand))
    return path


def _greedy(model, tokenizer, new_tokens: int = 8) -> list[int]:
    ids = torch.from_numpy(tokenizer.encode(PROMPT)).long()[None]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                             pad_token_id=tokenizer.pad_id)
    return out[0, ids.shape[1]:].tolist()


def test_the_gguf_loads_as_its_directory_does(real_model):
    """`[model] source = "x.gguf"` and `tokenizer = "gguf"`: transformers' GGUF reader, the same
    weights and token ids as the converted directory; plan check reads the layer count from the
    file's metadata alone."""
    gguf_spec = ModelSpec(source=str(real_model.gguf), tokenizer="gguf")
    from_gguf, view = load_model(gguf_spec, seed=0)
    from_dir, _ = load_model(ModelSpec(source=str(real_model.directory)), seed=0)
    assert view.num_layers == 30 and view.hidden_size == 576
    assert not hasattr(from_gguf.config, "quantization_config")  # a plain model: it saves and exports
    tokenizer = load_tokenizer("gguf", gguf_spec)
    assert tokenizer.encode(PROMPT).tolist() == load_tokenizer(str(real_model.directory)).encode(PROMPT).tolist()
    ids = torch.from_numpy(tokenizer.encode(PROMPT)).long()[None]
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, from_dir(ids).logits)


def test_plan_check_reads_the_gguf_metadata(real_model, tmp_path):
    plan = _plan(tmp_path, real_model.gguf, "gguf", ['op = "widen_ffn"\nsize = 64\nlayers = [30]'], "gguf-check")
    _, problems = validate_file(plan)
    assert [p.path for p in problems] == ["stages.0.expand.0.layers"]
    assert "the model has 30 layers" in problems[0].message


@pytest.mark.parametrize("op", list(EXACT_OPS))
def test_an_exact_operator_keeps_the_real_model(real_model, tmp_path, op):
    plan = load_plan(_plan(tmp_path, real_model.directory, real_model.directory, [EXACT_OPS[op]], f"real-{op}"))
    _, _, _, reports = build_from_plan(plan)
    (report,) = reports
    assert report["exact"], report
    assert report["max_abs_logit_delta"] <= EXACT, report


def test_virtual_layers_stretch_the_real_model_without_new_weights(real_model, tmp_path):
    """map_layers changes the function (measured, not exact); its virtual repeats add no parameter."""
    op = 'op = "map_layers"\nkeep_ends = {depth = 34}\nkinds = "virtual"'
    plan = load_plan(_plan(tmp_path, real_model.directory, real_model.directory, [op], "real-virtual"))
    model, view, _, (report,) = build_from_plan(plan)
    assert view.num_layers == 34 and report["params_added"] == 0
    assert 0 < report["max_abs_logit_delta"] < float("inf")


def test_a_grown_real_model_exports_and_reloads_with_the_same_continuation(real_model, tmp_path):
    plan = load_plan(_plan(tmp_path, real_model.directory, real_model.directory,
                           ['op = "widen_ffn"\nsize = 128\nlayers = "all"', EXACT_OPS["insert_identity"],
                            EXACT_OPS["lora"]], "real-export"))
    model, _, tokenizer, reports = build_from_plan(plan)
    batch = stage_probe(plan, 0, tokenizer)
    reference = reference_logits(model, batch)
    expected = _greedy(model, tokenizer)
    out = tmp_path / "export"
    manifest = export_model(model, tokenizer, out, reports=reports)
    assert manifest["num_layers"] == 31
    assert reload_delta(out, batch[0], reference) <= EXACT
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert _greedy(reloaded, tokenizer) == expected
