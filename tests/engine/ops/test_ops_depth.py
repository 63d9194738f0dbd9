"""Depth operators over random tiny models of every decoder family, through ``apply_stage`` (the
reports are the real ones): identity insertion and the identity mapping are exact, splits and
re-mappings are measured; after every change the model still decodes with a KV cache, its config
describes it (a fresh model built from the config with the same weights gives the same logits),
and GPT-Neo blocks keep their local/global attention. Virtual layers really share their tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from engine.grow.apply import Freezer, apply_stage
from engine.model.view import count_params, get_submodule
from engine.ops.depth import layer_kinds
from engine.ops.params import MapLayersParams
from engine.plan import ExpandSpec, validate_file
from tests.tiny_models import ALL_DECODER_FAMILIES, build, token_batch

examples = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def grow(model, view, *specs, stage=0, seed=0):
    return apply_stage(model, view, stage, [ExpandSpec(**s) for s in specs], token_batch(seed),
                       torch.Generator().manual_seed(seed)).reports


def logits(model, seed=0, **kwargs):
    with torch.no_grad():
        return model(input_ids=token_batch(seed)[0], **kwargs).logits


def loss(model, seed=0):
    x, y = token_batch(seed)
    return torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())


def depth_field(model, view):
    return getattr(model.config, view.family.num_layers_field)


def block_params(block) -> int:
    return sum(p.numel() for p in block.parameters())


def assert_decodes_with_cache(model):
    """Decoding the last token from a KV cache gives the logits of a full forward pass: every
    block writes its own cache slot (layer indices renumbered, cache sized by the config)."""
    x = token_batch(7)[0]
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits[:, -1]
        prefix = model(input_ids=x[:, :-1], use_cache=True)
        step = model(input_ids=x[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert float((full - step).abs().max()) <= 1e-4
    out = model.generate(x[:, :4], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (x.shape[0], 6)


def assert_config_describes_model(model):
    """A fresh model built from the grown config, given the grown weights, computes the same
    function: depth field, per-layer fields (GPT-Neo attention_layers / attention_types) right."""
    config = type(model.config).from_dict(model.config.to_dict())
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert float((logits(fresh) - logits(model)).abs().max()) <= 1e-5


def attention_kinds(model, view) -> list[str] | None:
    """GPT-Neo: each block's local/global attention, as its module computes it."""
    if view.family.name != "gpt_neo":
        return None
    return [block.attn.attention_type for block in view.blocks()]


def assert_depth_bookkeeping(model, view, sources: list[int], kinds_before):
    """Depth field, per-layer config entries and attention kinds follow block i <- sources[i]."""
    assert len(view.blocks()) == depth_field(model, view) == len(sources)
    if kinds_before is not None:
        expected = [kinds_before[s] for s in sources]
        assert attention_kinds(model, view) == expected
        assert model.config.attention_layers == expected
        assert [b.attn.layer_id for b in view.blocks()] == list(range(len(sources)))


# random tiny configs: family, depth, heads, head_dim, ffn width, weights seed
tiny_models = st.tuples(st.sampled_from(ALL_DECODER_FAMILIES), st.integers(2, 4), st.integers(1, 3),
                        st.sampled_from([4, 8]), st.integers(4, 16), st.integers(0, 10_000))


# ---------------------------------------------------------------------------------------------
# exact and measured depth changes (property tests)


@examples
@given(config=tiny_models, data=st.data())
def test_insert_identity_is_exact(config, data):
    model, view = build(*config)
    n = config[1]
    after = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)))
    kinds_before = attention_kinds(model, view)
    expected_new = sum(block_params(view.blocks()[i]) for i in after)
    report = grow(model, view, {"op": "insert_identity", "layers": after}, seed=config[-1])[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    assert report["loss_before"] == pytest.approx(report["loss_after"], abs=1e-5)
    assert report["params_added"] == expected_new
    sources = [s for i in range(n) for s in ([i, i] if i in after else [i])]
    assert_depth_bookkeeping(model, view, sources, kinds_before)
    assert_decodes_with_cache(model)
    assert_config_describes_model(model)


@examples
@given(config=tiny_models, kinds=st.sampled_from([None, "real", "virtual"]))
def test_identity_mapping_is_exact(config, kinds):
    model, view = build(*config)
    n = config[1]
    spec = {"op": "map_layers", "mapping": list(range(n))}
    if kinds:
        spec["kinds"] = kinds
    report = grow(model, view, spec)[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    assert report["params_added"] == 0
    assert depth_field(model, view) == n
    assert_decodes_with_cache(model)


@examples
@given(config=tiny_models, data=st.data())
def test_remapping_is_measured_and_keeps_bookkeeping(config, data):
    model, view = build(*config)
    n = config[1]
    mapping = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n + 3)
                        .filter(lambda m: m != list(range(n))))
    kinds = data.draw(st.one_of(st.none(), st.sampled_from(["real", "virtual"]),
                                st.lists(st.sampled_from(["real", "virtual"]), min_size=len(mapping),
                                         max_size=len(mapping))))
    scale = data.draw(st.sampled_from([None, 0.7071])) if kinds in (None, "real") else None
    spec = {"op": "map_layers", "mapping": mapping, "kinds": kinds, "scale": scale}
    kinds_before = attention_kinds(model, view)
    sizes = [block_params(b) for b in view.blocks()]
    report = grow(model, view, spec)[0]
    assert not report["exact"]
    assert math.isfinite(report["max_abs_logit_delta"]) and math.isfinite(report["loss_after"])
    resolved = MapLayersParams(**spec).resolve_kinds(mapping)
    repeats = [i for i, s in enumerate(mapping) if s in mapping[:i]]
    real_repeats = [i for i in repeats if resolved[i] == "real"]
    dropped = set(range(n)) - set(mapping)
    assert report["params_added"] == sum(sizes[mapping[i]] for i in real_repeats) - sum(sizes[i] for i in dropped)
    assert [i for i, k in enumerate(layer_kinds(view)) if k == "virtual"] == \
        [i for i in repeats if resolved[i] == "virtual"]
    assert_depth_bookkeeping(model, view, mapping, kinds_before)
    assert_decodes_with_cache(model)
    assert_config_describes_model(model)


@examples
@given(config=tiny_models, k=st.integers(2, 3), data=st.data())
def test_split_residual_is_measured(config, k, data):
    model, view = build(*config)
    n = config[1]
    chosen = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)))
    kinds_before = attention_kinds(model, view)
    report = grow(model, view, {"op": "split_residual", "layers": chosen, "k": k})[0]
    assert not report["exact"]
    assert 0 < report["max_abs_logit_delta"] < float("inf")  # k steps of F(x)/k are not one of F(x)
    sources = [s for i in range(n) for s in ([i] * k if i in chosen else [i])]
    assert_depth_bookkeeping(model, view, sources, kinds_before)
    assert_decodes_with_cache(model)
    assert_config_describes_model(model)


def test_split_residual_scales_every_copy():
    """The block stays (scaled in place) and is followed by k - 1 copies: each adds F(x)/k."""
    model, view = build("llama", 2, 2, 4, 12, 0)
    block = view.blocks()[1]
    o_before = block.self_attn.o_proj.weight.detach().clone()
    grow(model, view, {"op": "split_residual", "layers": [1], "k": 4})
    for copy in view.blocks()[1:5]:
        assert torch.allclose(copy.self_attn.o_proj.weight, o_before / 4)
    assert view.blocks()[1] is block  # the original block stays, scaled in place


# ---------------------------------------------------------------------------------------------
# GPT-Neo local/global attention


def test_gpt_neo_attention_types_follow_the_mapping():
    # global, local, global, local: the TinyStories-33M pattern; window 8 < 12 tokens, so local
    # and global attention really differ on the probe batch
    model, view = build("gpt_neo", 4, 2, 4, 12, 0)
    assert model.config.attention_layers == ["global", "local", "global", "local"]
    masks = [b.attn.attention.bias.clone() for b in view.blocks()]
    mapping = [0, 1, 1, 1, 2, 2, 2, 3]
    grow(model, view, {"op": "map_layers", "mapping": mapping, "kinds": ["real"] * 4 + ["virtual"] * 4})
    expected = ["global", "local", "local", "local", "global", "global", "global", "local"]
    assert model.config.attention_layers == expected
    assert model.config.attention_types == [[["global"], 1], [["local"], 3], [["global"], 3], [["local"], 1]]
    assert [b.attn.attention_type for b in view.blocks()] == expected
    assert [b.attn.layer_id for b in view.blocks()] == list(range(8))
    for block, source in zip(view.blocks(), mapping):  # each block masks like its source
        assert torch.equal(block.attn.attention.bias, masks[source])
    assert_config_describes_model(model)
    assert_decodes_with_cache(model)

    # the check above can fail: a config that kept the old pattern describes another function
    wrong = type(model.config).from_dict({**model.config.to_dict(), "attention_types": [[["global", "local"], 4]],
                                          "attention_layers": ["global", "local"] * 4})
    other = AutoModelForCausalLM.from_config(wrong, attn_implementation="eager").eval()
    other.load_state_dict(model.state_dict())
    assert float((logits(other) - logits(model)).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# virtual layers


@pytest.mark.parametrize("family", ALL_DECODER_FAMILIES)
def test_virtual_layers_share_storage_and_gradients(family):
    model, view = build(family, 2, 2, 4, 12, 0)
    real, real_view = build(family, 2, 2, 4, 12, 0)
    before = count_params(model)
    report = grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "virtual"})[0]
    grow(real, real_view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "real"})
    assert report["params_added"] == 0 and count_params(model) == before
    assert count_params(real) == before + block_params(real_view.blocks()[1])
    assert layer_kinds(view) == ["real", "real", "virtual"] and layer_kinds(real_view) == ["real"] * 3

    a, b = view.blocks()[1], view.blocks()[2]
    assert a is not b  # two modules (own layer index, own adapters later) ...
    names = [n for n, _ in a.named_parameters()]
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa is pb and pa.data_ptr() == pb.data_ptr(), name  # ... one tensor each
    assert torch.equal(logits(model), logits(real))

    # one backward: the shared tensor gets the sum of both uses' gradients
    loss(model).backward()
    loss(real).backward()
    real_a, real_b = dict(real_view.blocks()[1].named_parameters()), dict(real_view.blocks()[2].named_parameters())
    for name, p in a.named_parameters():
        summed = real_a[name].grad + real_b[name].grad
        assert torch.allclose(p.grad, summed, rtol=1e-4, atol=1e-6), name
        assert float(real_a[name].grad.abs().max()) > 0 and float(real_b[name].grad.abs().max()) > 0, name

    # unshare: separate tensors, same function
    model.zero_grad()
    reports = grow(model, view, {"op": "unshare", "layers": [2]}, stage=1)
    assert reports[0]["exact"] and reports[0]["max_abs_logit_delta"] <= 1e-6
    assert reports[0]["params_added"] == block_params(a) and count_params(model) == before + block_params(a)
    b = view.blocks()[2]
    for name in names:
        pa, pb = a.get_parameter(name), b.get_parameter(name)
        assert pa is not pb and pa.data_ptr() != pb.data_ptr() and torch.equal(pa, pb), name
    assert layer_kinds(view) == ["real", "real", "real"]
    with torch.no_grad():  # now a change to one twin leaves the other alone
        b.get_parameter(names[0]).add_(1.0)
    assert not torch.equal(a.get_parameter(names[0]), b.get_parameter(names[0]))


def test_virtual_repeat_trains_once_under_an_optimizer():
    """Optimizers see the shared tensor once (model.parameters() de-duplicates)."""
    model, view = build("llama", 2, 2, 4, 12, 0)
    grow(model, view, {"op": "map_layers", "mapping": [0, 1, 0, 1]})
    assert layer_kinds(view) == ["real", "real", "virtual", "virtual"]
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss(model).backward()
    optimizer.step()
    assert view.blocks()[0].mlp.up_proj.weight is view.blocks()[2].mlp.up_proj.weight


def test_split_of_a_virtual_twin_leaves_its_source_alone():
    model, view = build("gpt2", 2, 2, 4, 12, 0)
    grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "kinds": "virtual"})
    source = view.blocks()[1]
    c_proj = source.attn.c_proj.weight
    saved = c_proj.detach().clone()
    report = grow(model, view, {"op": "split_residual", "layers": [2]}, stage=1)[0]
    assert "own copy" in report["note"]
    assert source.attn.c_proj.weight is c_proj and torch.equal(c_proj, saved)
    assert torch.allclose(view.blocks()[2].attn.c_proj.weight, saved / 2)
    assert layer_kinds(view) == ["real"] * 4


def test_scale_multiplies_real_repeats_only():
    model, view = build("gpt2", 2, 2, 4, 12, 0)
    source = model.transformer.h[1].mlp.c_proj.weight.detach().clone()
    attn_bias = model.transformer.h[1].attn.c_proj.bias.detach().clone()
    report = grow(model, view, {"op": "map_layers", "mapping": [0, 1, 1], "scale": 0.5})[0]
    assert layer_kinds(view) == ["real"] * 3  # scale makes default repeats real
    assert torch.equal(model.transformer.h[1].mlp.c_proj.weight, source)
    assert torch.allclose(model.transformer.h[2].mlp.c_proj.weight, source * 0.5)
    assert torch.allclose(model.transformer.h[2].attn.c_proj.bias, attn_bias * 0.5)
    assert "scaled by 0.5" in report["note"]
    with pytest.raises(ValueError, match="real"):
        MapLayersParams(mapping=[0, 1, 1], kinds="virtual", scale=0.5)


# ---------------------------------------------------------------------------------------------
# freezing


@pytest.mark.parametrize("family", ALL_DECODER_FAMILIES)
def test_only_inserted_blocks_train_under_freeze_base(family):
    model, view = build(family, 2, 2, 4, 12, 0)
    growth = apply_stage(model, view, 0, [ExpandSpec(op="insert_identity", layers=[0])], token_batch(),
                         torch.Generator().manual_seed(0))
    freezer = Freezer()
    freezer.apply(model, "base", growth)
    inserted = view.blocks()[1]  # the identity copy of block 0 sits at index 1
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in inserted.parameters()}
    assert freezer.trainable(model) == growth.reports[0]["params_added"] == block_params(inserted)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    family = view.family
    if family.post_norms:  # OLMo-2, Gemma: the post-norms' gains are zeroed (weight = -offset)
        zeroed = get_submodule(inserted, family.post_norms[0]).weight
        effective = zeroed.detach() + family.norm_offset
    else:
        zeroed = getattr(view.attention(1), family.attention.out).weight
        effective = zeroed.detach()
    assert float(effective.abs().max()) == 0
    before = logits(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss(model).backward()
    assert float(zeroed.grad.abs().max()) > 0  # the zeroed tensor can learn
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert float((logits(model) - before).abs().max()) > 0


# ---------------------------------------------------------------------------------------------
# errors, mapping helpers and the plan check


@pytest.mark.parametrize("op", ["insert_identity", "split_residual", "unshare"])
def test_out_of_range_layers_are_named(op):
    model, view = build("gpt_neox", 2, 2, 4, 12, 0)
    with pytest.raises(ValueError, match=r"layers: layer 5 out of range — the model has 2 layers"):
        grow(model, view, {"op": op, "layers": [0, 5]})
    with pytest.raises(ValueError, match=r"mapping: layer 2 out of range"):
        grow(model, view, {"op": "map_layers", "mapping": [0, 1, 2]})
    assert len(view.blocks()) == depth_field(model, view) == 2  # nothing was changed


@pytest.mark.parametrize("helper, depth, expected", [
    ({"dus": {"copies": 2, "drop": 8}}, 32, list(range(24)) + list(range(8, 32))),  # SOLAR 10.7B: 48 layers
    ({"dus": {"copies": 2, "drop": 0}}, 3, [0, 1, 2, 0, 1, 2]),
    ({"dus": {"copies": 3, "drop": 1}}, 4, [0, 1, 2, 1, 2, 1, 2, 3]),
    ({"keep_ends": {"depth": 8}}, 4, [0, 1, 1, 1, 2, 2, 2, 3]),
    ({"keep_ends": {"depth": 6}}, 6, [0, 1, 2, 3, 4, 5]),
    ({"keep_ends": {"depth": 5}}, 2, [0, 0, 0, 1, 1]),
    ({"keep_ends": {"depth": 3}}, 1, [0, 0, 0]),
    ({"repeat": 4}, 2, [0, 1, 0, 1, 0, 1, 0, 1]),                                    # G_stack ×4
    ({"stack_middle": 2}, 2, [0, 1, 0, 1]),                                          # MIDAS, step by step:
    ({"stack_middle": 2}, 4, [0, 1, 2, 1, 2, 3]),                                    # 2 -> 4 -> 6 -> 8
    ({"stack_middle": 2}, 6, [0, 1, 2, 3, 2, 3, 4, 5]),
    ({"stack_middle": 3}, 5, [0, 1, 2, 3, 1, 2, 3, 4]),
])
def test_mapping_helpers(helper, depth, expected):
    params = MapLayersParams(**helper)
    assert params.resolve(depth) == expected
    assert params.num_layers_after(depth) == len(expected)
    assert params.depth_problems(depth) == []


def test_stack_middle_is_the_midas_family_at_times_2_and_refuses_more_than_the_model():
    from engine.ops.mapping_families import FAMILIES

    midas = next(f for f in FAMILIES if f.name == "midas")
    for n, k in [(2, 2), (4, 2), (6, 2), (5, 3), (8, 4), (7, 1)]:
        assert MapLayersParams(stack_middle=k).resolve(n) == midas.mapping(n, n + k, times=2)
    [(field, message)] = MapLayersParams(stack_middle=3).depth_problems(2)
    assert field == "stack_middle" and "use stack_middle <= 2" in message


def test_dus_that_does_not_fit_is_reported():
    params = MapLayersParams(dus={"copies": 2, "drop": 4})
    with pytest.raises(ValueError, match="drop = 4 leaves no blocks"):
        params.resolve(4)
    [(field, message)] = params.depth_problems(4)
    assert field == "dus" and "use drop < 4" in message


def test_dus_applied_to_a_model():
    model, view = build("llama", 4, 2, 4, 12, 0)
    report = grow(model, view, {"op": "map_layers", "dus": {"copies": 2, "drop": 1}})[0]
    assert depth_field(model, view) == 6 and "[0, 1, 2, 1, 2, 3]" in report["note"]
    assert layer_kinds(view) == ["real", "real", "real", "virtual", "virtual", "real"]
    assert_decodes_with_cache(model)


def _plan(tmp_path, source: str, expand: str) -> str:
    from tests.conftest import TINY_PLAN

    text = TINY_PLAN.replace('source = "builtin:tiny-neo"', f'source = "{source}"')
    path = tmp_path / "plan.toml"
    path.write_text(text + '\n[[stages]]\ntask = "prose"\nsteps = 0\n' + expand)
    _, problems = validate_file(path)
    return "\n".join(map(str, problems))


def test_plan_check_reports_mapping_problems_with_their_field(tmp_path):
    text = _plan(tmp_path, "builtin:tiny-neo",  # 4 layers
                 '[[stages.expand]]\nop = "map_layers"\nmapping = [0, 1, 7]\n'
                 '[[stages.expand]]\nop = "map_layers"\ndus = {copies = 2, drop = 5}\n'
                 '[[stages.expand]]\nop = "map_layers"\nkeep_ends = {depth = 6}\nkinds = ["real", "virtual"]\n')
    assert "stages.2.expand.0.mapping: layer 7 out of range" in text
    assert "stages.2.expand.1.dus: drop = 5 leaves no blocks" in text
    assert "stages.2.expand.2.kinds: kinds has 2 entries but the mapping has 6" in text


def test_plan_check_follows_the_depth_after_solar_dus(tmp_path):
    """SOLAR: a 32-layer Llama, dus = {copies = 2, drop = 8} -> 48 layers; later ops are
    checked against 48."""
    from transformers import LlamaConfig

    source = tmp_path / "llama32"
    LlamaConfig(vocab_size=61, hidden_size=8, intermediate_size=8, num_hidden_layers=32, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(source)
    ok = _plan(tmp_path, str(source), '[[stages.expand]]\nop = "map_layers"\ndus = {copies = 2, drop = 8}\n'
               '[[stages.expand]]\nop = "lora"\nlayers = [0, 47]\n')
    assert ok == ""
    bad = _plan(tmp_path, str(source), '[[stages.expand]]\nop = "map_layers"\ndus = {copies = 2, drop = 8}\n'
                '[[stages.expand]]\nop = "lora"\nlayers = [48]\n'
                '[[stages.expand]]\nop = "map_layers"\nmapping = [0, 60]\n')
    assert "stages.2.expand.1.layers: layer 48 out of range — the model has 48 layers" in bad
    assert "stages.2.expand.2.mapping: layer 60 out of range — the model has 48 layers" in bad
