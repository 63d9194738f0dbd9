"""Every family of the table through every operator that applies to it: exact where it claims to
be, exported to a directory plain transformers reloads with the same logits, trained through the
engine from a local directory; the operators that do not apply refuse in one line. Families and
their tiny configs come from the family table (tests/tiny_models.py), so a new entry is tested here.
Plus `[model] family`: a model type widen does not list runs under a named family whose module
tree it has, and one whose tree differs is refused with what differs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.exports.hf_directory import export_model
from engine.grow.apply import apply_stage
from engine.model.families import family_named
from engine.model.forward import forward_logits
from engine.model.sources import ModelLoadError, load_architecture, load_model
from engine.plan import ExpandSpec, ModelSpec
from engine.train.data import ByteTokenizer
from tests.tiny_models import ALL_DECODER_FAMILIES, randomize, tiny_config, token_batch

# (name, spec, exact): applied in this order to one model; a spec its family refuses is skipped
# here and tested in test_refused_ops_say_why_in_one_line
GROWTH = [
    # multiples of 8: MoE families' experts run through torch's grouped_mm (16-byte strides)
    ("widen_ffn parallel", dict(op="widen_ffn", size=8), True),
    ("widen_ffn net2net", dict(op="widen_ffn", size=8, init="net2net", mode="inplace"), True),
    # 4 -> 8 heads: transformers' configs want heads to divide the hidden size (16)
    ("add_heads", dict(op="add_heads", size=4), True),
    ("parallel_linear", dict(op="parallel_linear", modules=["o"]), True),
    ("concat_linear", dict(op="concat_linear", modules=["up"], size=2), True),
    ("insert_identity", dict(op="insert_identity", layers=[0]), True),
    ("map_layers virtual", dict(op="map_layers", mapping=[0, 1, 2, 1], kinds="virtual"), False),
    # adapters go on projections the Linear ops above left plain (PEFT cannot wrap their wrappers)
    ("lora", dict(op="lora", modules=["q"], r=2), True),
    ("ia3", dict(op="ia3", modules=["v"]), True),
    ("split_residual", dict(op="split_residual", layers=[3], k=2), False),
]


def _build(family: str, vocab: int | None = None, seed: int = 0):
    config = tiny_config(family, layers=2, heads=4, head_dim=4, ffn=24)
    if vocab:
        config.vocab_size = vocab
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(model)
    return model


@pytest.mark.parametrize("family", ALL_DECODER_FAMILIES)
def test_operators_keep_the_function_and_export_reloads(family, tmp_path):
    from engine.model.view import ArchView

    entry = family_named(family)
    model = _build(family)
    view = ArchView(model.config, model)
    assert view.family.name == family
    # heads added to a family that derives head_dim from the hidden size cannot be exported (a
    # stock config cannot describe them): test_ops_heads covers those
    skip = {"add_heads"} if entry.attention.width_follows_hidden else set()
    specs = [(name, ExpandSpec(**spec), exact) for name, spec, exact in GROWTH
             if entry.refusal(spec["op"]) is None and spec["op"] not in skip]
    growth = apply_stage(model, view, 0, [s for _, s, _ in specs], token_batch(), torch.Generator().manual_seed(0))
    for (name, _, exact), report in zip(specs, growth.reports):
        if exact:
            assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, (family, name, report)
    x = token_batch(1)[0]
    with torch.no_grad():
        expected = forward_logits(model, x)
    export_model(model, ByteTokenizer(), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(model).__name__
    with torch.no_grad():
        assert float((forward_logits(reloaded, x) - expected).abs().max()) <= 1e-4


REFUSED = [(f, op) for f in ALL_DECODER_FAMILIES for op in family_named(f).refused_ops]


@pytest.mark.parametrize("family, op", REFUSED)
def test_refused_ops_say_why_in_one_line(family, op):
    from engine.model.view import ArchView

    message = family_named(family).refusal(op)
    assert "\n" not in message and family in message and op in message
    model = _build(family)
    others = {"widen_hidden": {"op": "widen_hidden", "size": model.config.hidden_size, "init": "duplicate"},  # 2x
              "upcycle": {"op": "upcycle", "experts": 4}, "add_experts": {"op": "add_experts", "experts": 8}}
    spec = next((s for _, s, _ in GROWTH if s["op"] == op), others.get(op))
    with pytest.raises(ValueError) as error:
        apply_stage(model, ArchView(model.config, model), 0, [ExpandSpec(**spec)], token_batch(), torch.Generator())
    assert message in str(error.value)


def test_post_norm_families_insert_identity_through_their_gains():
    """OLMo-2 and Gemma normalise a sub-layer's output before the residual add: the new block's
    post-norm gains are zero (Gemma: weight = -1 for its 1 + w) and its projections keep learning."""
    from engine.model.view import ArchView

    for family, zero in (("olmo2", 0.0), ("gemma2", -1.0)):
        model = _build(family)
        view = ArchView(model.config, model)
        apply_stage(model, view, 0, [ExpandSpec(op="insert_identity", layers=[0])], token_batch(), torch.Generator())
        block = view.blocks()[1]
        for path in view.family.post_norms:
            assert torch.all(getattr(block, path).weight == zero), (family, path)
        assert block.self_attn.o_proj.weight.abs().sum() > 0


# the older families run plans in test_e2e and the Llama variants' tests
@pytest.mark.parametrize("family", [f for f in ALL_DECODER_FAMILIES if f not in ("gpt_neo", "gpt2", "gpt_neox", "llama")])
def test_a_plan_trains_the_family_from_a_local_directory(family, tiny_plan, widen_home, tmp_path):
    from engine.plan import load_plan
    from engine.train.loop import Trainer
    from widen_tui.launcher import create_run

    source = tmp_path / family
    _build(family, vocab=259).save_pretrained(source)  # 259: the byte tokenizer
    overrides = [f"model.source={source}", "stages.0.steps=2", "stages.1.steps=2", "train.eval_interval=0",
                 "stages.1.expand.0.size=8"]  # a multiple of 8: MoE experts run through grouped_mm
    run = create_run(load_plan(tiny_plan, overrides), tiny_plan, widen_home)
    Trainer(run.path).run_plan()
    results = run.results()
    assert results["state"] == "done", results
    assert results["expansions"][0]["max_abs_logit_delta"] <= 1e-4


# -- [model] family --------------------------------------------------------------------------

def _save(model_type: str, path, **fields):
    config = AutoConfig.for_model(model_type, vocab_size=61, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model)
    model.save_pretrained(path)


def test_an_unlisted_llama_shaped_type_runs_under_family_llama(tmp_path):
    _save("smollm3", tmp_path / "m", head_dim=4)
    with pytest.raises(ModelLoadError, match="model type 'smollm3' is not supported"):
        load_architecture(ModelSpec(source=str(tmp_path / "m")))
    spec = ModelSpec(source=str(tmp_path / "m"), family="llama")
    assert load_architecture(spec).family.name == "llama"
    model, view = load_model(spec, seed=0, attention="eager")
    growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_ffn", size=2), ExpandSpec(op="insert_identity")],
                         token_batch(), torch.Generator().manual_seed(0))
    assert all(r["max_abs_logit_delta"] <= 1e-4 for r in growth.reports)


def test_a_family_whose_tree_differs_is_refused_with_what_differs(tmp_path):
    _save("phi3", tmp_path / "phi3")
    with pytest.raises(ModelLoadError) as error:
        load_architecture(ModelSpec(source=str(tmp_path / "phi3"), family="llama"))
    message = str(error.value)
    assert "phi3 models do not have the llama module tree" in message
    assert "no model.layers.0.self_attn.q_proj" in message and "\n" not in message
    _save("qwen3", tmp_path / "qwen3", head_dim=4)  # llama's paths, plus q/k norms llama would ignore
    with pytest.raises(ModelLoadError, match=r"self_attn\.q_norm \(Qwen3RMSNorm\) is not in the llama description"):
        load_model(ModelSpec(source=str(tmp_path / "qwen3"), family="llama"), seed=0)


def test_an_unknown_family_name_is_a_plan_problem():
    with pytest.raises(ValueError, match="no family 'lama' — families: gpt_neo"):
        ModelSpec(source="x", family="lama")


@pytest.mark.parametrize("family, op", [(f, op) for f, op in REFUSED if op == "add_heads"])
def test_plan_check_says_a_refusal_before_any_work(family, op, tiny_plan, tmp_path):
    """The family's refusal is a plan-check problem on the op's field, before the run starts."""
    from engine.plan import apply_overrides, check_model_fields, read_toml

    source = tmp_path / family
    _build(family, vocab=259).save_pretrained(source)
    raw = apply_overrides(read_toml(tiny_plan), [f"model.source={source}", "stages.1.expand.0.op=add_heads",
                                                 "stages.1.expand.0.size=2"])
    problems = {p.path: p.message for p in check_model_fields(raw)}
    assert problems.get("stages.1.expand.0.op") == family_named(family).refusal(op), problems


def test_every_family_names_the_config_field_of_its_norms_epsilon():
    """d_model growth scales it (init = "lossless"): the fact lives in the family entry, and the
    field exists in each of its model types' configs."""
    from engine.model.families import FAMILIES

    for family in FAMILIES:
        if family.kind == "mlp":
            continue
        for model_type in family.model_types:
            config = AutoConfig.for_model(model_type)
            assert isinstance(getattr(config, family.norm_eps_field, None), float), (family.name, model_type)
