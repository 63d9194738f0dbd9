"""widen_hidden's exact routes on random tiny models of every family with a residual stream (the
family list comes from the registry, so a new family is tested here as soon as it is added):

- duplicate (size = (k - 1) x d_model, HyperCloning) at k = 2, 3, 4 and lossless (LEMON: pads at
  the stream's mean for LayerNorm, zeros for RMSNorm; gains x sqrt(s), epsilon x s) at sizes that
  are no multiple: max |Δlogits| <= 1e-4, and the export reloads with plain from_pretrained to
  the same logits, its config's epsilon s x the old one and its head counts consistent;
- symmetry = split / noise: the new units are no twins (health figures), symmetry = none: they are;
- what cannot be done exactly is refused in one line naming family and reason.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from engine.exports.hf_directory import export_model
from engine.grow.apply import apply_stage
from engine.model.families import family_named
from engine.model.view import FAMILIES, ArchView, get_submodule
from engine.ops.expert_units import grouped_mm_multiple
from engine.ops.health import similarity_report
from engine.ops.hidden import _eps_field
from engine.plan import ExpandSpec
from engine.train.data import ByteTokenizer
from tests import tiny_models
from tests.tiny_models import VOCAB, token_batch, train_steps

EXACT = 1e-4
FEW = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# every family with one residual stream (decoder-only); the Llama entry also serves other model types
STREAM_FAMILIES = [f for f in FAMILIES if f.kind == "causal_lm" and not f.stacks]


def _refusal(family) -> str | None:
    refusal = getattr(family, "refusal", None)
    return refusal("widen_hidden") if callable(refusal) else None


GROWN = [f.name for f in STREAM_FAMILIES if _refusal(f) is None]
REFUSED = [f.name for f in STREAM_FAMILIES if _refusal(f) is not None]


def _pads_form_joint_normed_heads(family) -> bool:
    """head_dim derived from d_model and one q/k norm over all heads (OLMoE): pads would form new
    heads that rescale the old ones, so only whole copies (duplicate) are exact."""
    att = family.attention
    return att.width_follows_hidden and bool(att.qk_norms) and not att.qk_norm_per_head


PADDED = [f.name for f in STREAM_FAMILIES if _refusal(f) is None and not _pads_form_joint_normed_heads(f)]
COPIES_ONLY = [f.name for f in STREAM_FAMILIES if _refusal(f) is None and _pads_form_joint_normed_heads(f)]
# model types beyond a family's first (mistral, qwen2 share the Llama description)
OTHER_TYPES = [t for f in STREAM_FAMILIES if _refusal(f) is None for t in f.model_types[1:]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a loaded machine
    yield
    torch.set_num_threads(threads)


def _config(name: str, layers: int, heads: int, head_dim: int, tied: bool | None):
    if name in GROWN or name in REFUSED:
        config = tiny_models.tiny_config(name, layers, heads, head_dim, 16)
    else:  # another model type of the Llama description
        config = AutoConfig.for_model(name, vocab_size=VOCAB, hidden_size=heads * head_dim, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=1 if heads % 2 else heads // 2,
                                      head_dim=head_dim, intermediate_size=16, max_position_embeddings=64)
    if tied is not None:
        config.tie_word_embeddings = tied
    return config


def build(name, layers=2, heads=2, head_dim=4, tied=None, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name, layers, heads, head_dim, tied),
                                             attn_implementation="eager").eval()
    for p in model.parameters():  # random weights, not the default init, so no path hides
        torch.nn.init.normal_(p, std=0.2)
    return model, ArchView(model.config, model)


def widen(model, view, seed=0, **spec):
    growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_hidden", **spec)], token_batch(seed),
                         torch.Generator().manual_seed(seed))
    return growth, growth.reports[0]


def logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs).logits.float()


def export_reload(model, tmp_path):
    """Export with engine.exports.hf_directory, reload with plain transformers (no widen code)."""
    export_model(model, ByteTokenizer(), tmp_path)
    return AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()


def pad_unit(view, copies: int) -> int:
    """The smallest number of pads this model takes beside `copies` copies: whole heads where
    head_dim derives from the hidden size, and a hidden size the head count divides (LlamaConfig
    checks that; it is harmless elsewhere)."""
    layout = view.family.attention
    heads_unit = _head_dim(view) * (view.num_heads // view.num_kv_heads) if layout.width_follows_hidden else 1
    # MoE families: d_model must keep the experts kernel's 16-byte strides (4 in float32)
    return math.lcm(heads_unit, copies * view.num_heads, (grouped_mm_multiple(view) if view.moe else None) or 1)


def _head_dim(view) -> int:
    stated = getattr(view.config, view.family.attention.head_dim_field, None)
    return int(stated) if stated and not view.family.attention.width_follows_hidden else \
        view.hidden_size // view.num_heads


def check_grown(model, view, report, tmp_path, old, copies: int, pads: int, head_repeats: int | None = None) -> float:
    """Exact, heads repeated (`head_repeats`, default `copies` times) with head_dim kept, epsilon x
    s; the export reloads the same. Returns the export's max |Δlogits|."""
    hidden, heads, kv_heads, head_dim, eps_field, eps = old
    repeats = copies if head_repeats is None else head_repeats
    assert report["exact"] and report["max_abs_logit_delta"] <= EXACT, report
    assert view.hidden_size == copies * hidden + pads
    assert view.num_heads * head_dim == repeats * heads * head_dim + (
        pads if view.family.attention.width_follows_hidden else 0)
    assert view.num_kv_heads >= repeats * kv_heads and _head_dim(view) == head_dim
    x = token_batch(1)[0]
    expected = logits(model, x)
    tied = model.lm_head.weight is get_submodule(model, view.family.embeddings).weight
    reloaded = export_reload(model, tmp_path)
    delta = float((logits(reloaded, x) - expected).abs().max())
    assert delta <= EXACT
    s = copies * hidden / (copies * hidden + pads)
    assert getattr(reloaded.config, eps_field) == pytest.approx(s * eps, rel=1e-6)
    assert (reloaded.config.num_attention_heads, ArchView(reloaded.config).num_kv_heads) == \
        (view.num_heads, view.num_kv_heads)
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == tied
    return delta


def facts(view):
    eps_field = _eps_field(view)
    return (view.hidden_size, view.num_heads, view.num_kv_heads, _head_dim(view), eps_field,
            float(getattr(view.config, eps_field)))


# ---------------------------------------------------------------------------------------------
# duplicate: k copies, any integer multiple


@pytest.mark.parametrize("name", GROWN + OTHER_TYPES)
@FEW
@given(copies=st.sampled_from([2, 3, 4]), heads=st.sampled_from([1, 2, 4]), layers=st.integers(1, 2),
       tied=st.booleans(), symmetry=st.sampled_from(["none", "split", "noise"]), seed=st.integers(0, 1000))
def test_duplicate_is_exact_at_every_multiple_and_exports(tmp_path_factory, name, copies, heads, layers, tied,
                                                          symmetry, seed):
    model, view = build(name, layers, heads, 4, tied, seed)
    old = facts(view)
    _, report = widen(model, view, seed, size=(copies - 1) * view.hidden_size, init="duplicate", symmetry=symmetry)
    assert view.num_heads == copies * heads and view.num_kv_heads == copies * old[2]
    check_grown(model, view, report, tmp_path_factory.mktemp("export"), old, copies, 0)


# ---------------------------------------------------------------------------------------------
# lossless: any size that keeps whole heads


@pytest.mark.parametrize("name", PADDED + OTHER_TYPES)
@FEW
@given(copies=st.sampled_from([1, 2]), heads=st.sampled_from([2, 4]), head_dim=st.sampled_from([4, 8]),
       tied=st.booleans(), symmetry=st.sampled_from(["none", "noise"]), seed=st.integers(0, 1000))
def test_lossless_is_exact_at_other_sizes_and_exports(tmp_path_factory, name, copies, heads, head_dim, tied,
                                                      symmetry, seed):
    model, view = build(name, 2, heads, head_dim, tied, seed)
    old = facts(view)
    pads = pad_unit(view, copies)
    if pads >= view.hidden_size:
        return  # no whole-head size between the multiples of this model
    size = (copies - 1) * view.hidden_size + pads
    _, report = widen(model, view, seed, size=size, init="lossless", symmetry=symmetry)
    assert "exports as is" in report["note"]
    check_grown(model, view, report, tmp_path_factory.mktemp("export"), old, copies, pads)


@pytest.mark.parametrize("name", [t for t in OTHER_TYPES if t in ("mistral", "qwen2")])
def test_llama_layouts_without_the_head_count_check_take_any_size(tmp_path, name):
    """Mistral and Qwen2 configs state head_dim and check nothing else: 8 -> 11 works."""
    model, view = build(name, 2, 2, 4)
    old = facts(view)
    _, report = widen(model, view, size=3, init="lossless")
    check_grown(model, view, report, tmp_path, old, 1, 3)


@pytest.mark.parametrize("name", [n for n in GROWN if n in ("gpt2", "llama")])
def test_pads_hold_the_mean_or_zero(name):
    """The stream after every block: LayerNorm families' pads equal the mean of the copies,
    RMSNorm families' pads are zero, and the copies equal the old stream."""
    model, view = build(name, 2, 2, 4)
    x = token_batch(2)[0]
    with torch.no_grad():
        before = model(input_ids=x, output_hidden_states=True).hidden_states
    widen(model, view, size=12, init="lossless")  # 8 -> 2 x 8 + 4
    with torch.no_grad():
        after = model(input_ids=x, output_hidden_states=True).hidden_states
    for old, new in zip(before[:-1], after[:-1]):  # the last one is after the final norm
        assert torch.allclose(new[..., :8], old, atol=1e-5) and torch.allclose(new[..., 8:16], old, atol=1e-5)
        pads = new[..., 16:]
        target = old.mean(-1, keepdim=True).expand_as(pads) if view.family.norm_kind == "layernorm" else 0 * pads
        assert torch.allclose(pads, target, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# symmetry breaking: the new units are no twins


@pytest.mark.parametrize("name", [n for n in GROWN if n in ("gpt2", "llama")])
def test_symmetry_breaking_makes_the_copies_differ(name):
    figures = {}
    for symmetry in ("none", "split", "noise"):
        model, view = build(name, 2, 2, 4, seed=1)
        growth, report = widen(model, view, 1, size=16, init="duplicate", symmetry=symmetry)  # k = 3
        assert report["exact"] and report["max_abs_logit_delta"] <= EXACT
        at_expansion = (report["max_pairwise_cosine"], report["max_twin_cosine"])
        train_steps(model, token_batch(1), steps=5, lr=0.01)
        trained = similarity_report(growth.results[0].units)
        figures[symmetry] = at_expansion, (trained["max_pairwise_cosine"], trained["max_twin_cosine"])
    # without symmetry breaking the copies are twins, and training keeps them so
    assert min(figures["none"][0]) > 1 - 1e-6 and min(figures["none"][1]) > 1 - 1e-5
    for symmetry in ("split", "noise"):  # unequal shares / paired noise: exact, yet no twins
        for pairwise, twin in figures[symmetry]:
            assert pairwise < 1 - 1e-4 and twin < 1 - 1e-4, (symmetry, figures[symmetry])


# ---------------------------------------------------------------------------------------------
# ties, gain offsets, refusals


def test_tied_head_without_a_final_gain_is_untied_and_said():
    """A tied head reads k equal copies (k x the logits); without a final norm gain to take 1/k,
    the head is untied (and the note and config say so)."""
    model, view = build("gpt2", 2, 2, 4, tied=True)
    model.transformer.ln_f = torch.nn.LayerNorm(8, elementwise_affine=False, eps=model.config.layer_norm_epsilon)
    _, report = widen(model, view, size=8, init="duplicate")
    assert report["max_abs_logit_delta"] <= EXACT and "untied" in report["note"]
    assert model.lm_head.weight is not model.transformer.wte.weight and model.config.tie_word_embeddings is False


def test_offset_gains_scale_gamma_not_the_stored_weight():
    """A family whose norm weight stores gamma - 1 (Gemma's fact norm_offset = 1): the copies get
    sqrt(s) x gamma, stored back as sqrt(s) x (w + 1) - 1."""
    from dataclasses import replace

    from engine.ops.hidden import _grow_norm, _Grower, _plan_growth
    from engine.ops.params import WidenHiddenParams

    model, view = build("llama", 1, 2, 4)
    norm = model.model.norm
    w = norm.weight.detach().clone()
    growth = _plan_growth(view, WidenHiddenParams(size=4, init="lossless"))  # s = 8 / 12
    _grow_norm(_Grower(torch.Generator(), None), norm, growth, replace(view.family, norm_offset=1.0), exact=True)
    s = 8 / 12
    assert torch.allclose(norm.weight[:8] + 1, math.sqrt(s) * (w + 1), atol=1e-6)
    assert torch.allclose(norm.weight[8:] + 1, torch.full((4,), math.sqrt(s) * float((w + 1).mean())), atol=1e-6)


def test_sizes_that_cannot_be_exact_are_refused_in_one_line():
    model, view = build("gpt2", 1, 2, 4)
    with pytest.raises(ValueError, match=r"^stage 0: widen_hidden: size: init = \"duplicate\" makes whole copies .*"
                                         r"set size = 8 or 16, or use init = \"lossless\""):
        widen(model, view, size=12, init="duplicate")
    with pytest.raises(ValueError, match=r"^stage 0: widen_hidden: size: gpt2 derives head_dim .* size beyond 1 x 8 "
                                         r"must be a multiple of head_dim 4"):
        widen(model, view, size=10, init="lossless")
    model, view = build("llama", 1, 2, 4)
    with pytest.raises(ValueError, match=r"^stage 0: widen_hidden: size: a llama config cannot describe d_model 11 "
                                         r"with 2 heads \(transformers: .*\) — use size = 2 or 4$"):
        widen(model, view, size=3, init="lossless")
    assert view.hidden_size == 8 and model.model.embed_tokens.weight.shape == (VOCAB, 8)  # untouched


def test_encoder_decoders_are_refused_with_the_reason():
    model, view = tiny_models.build_t5()
    with pytest.raises(ValueError, match=r"widen_hidden does not apply to t5 models — T5 is an encoder-decoder"):
        apply_stage(model, view, 0, [ExpandSpec(op="widen_hidden", size=16)], token_batch(), torch.Generator())


@pytest.mark.parametrize("name", REFUSED)
def test_families_refusing_it_say_why_in_one_line(name):
    model, view = build(name, 1, 2, 4)
    with pytest.raises(ValueError, match=rf"widen_hidden does not apply to {name} models — .+") as caught:
        widen(model, view, size=view.hidden_size, init="duplicate")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", [n for n in GROWN if n in ("gpt2", "llama")])
def test_epsilon_is_scaled_where_it_matters(tmp_path, name):
    """With a large epsilon (1.0, as large as the variances here) an unscaled epsilon would show
    at once; s x epsilon keeps the logits, and the export states it."""
    model, view = build(name, 2, 2, 4)
    field = _eps_field(view)
    setattr(model.config, field, 1.0)
    for module in model.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 1.0)
    old = facts(view)
    _, report = widen(model, view, size=4, init="lossless")  # 8 -> 12, s = 2/3
    check_grown(model, view, report, tmp_path, old, 1, 4)
    assert getattr(model.config, field) == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", COPIES_ONLY)
def test_pads_forming_heads_under_joint_qk_norms_are_refused_in_one_line(name):
    """OLMoE: head_dim follows d_model, so pads would be new heads inside the one q/k norm of all
    heads — lossless with pads and masked are refused (one line, naming the duplicate size)."""
    model, view = build(name, 1, 2, 4)
    for init in ("lossless", "masked"):
        with pytest.raises(ValueError, match=rf"^stage 0: widen_hidden: size: {name} derives head_dim from d_model, "
                                             r".* use init = \"duplicate\" with size = 8 \(whole copies\)$"):
            widen(model, view, size=4, init=init)
    assert view.hidden_size == 8


@pytest.mark.parametrize("name", PADDED)
@pytest.mark.parametrize("new_hidden", [80, 200])
def test_lossless_grows_64_to_sizes_that_are_no_multiple(tmp_path, name, new_hidden):
    """The issue's sizes on every family: d_model 64 (8 heads x 8, one key/value head per query head
    so whole heads fit every size) -> 80 (1 copy + 16 pads) and -> 200 (3 copies + 8 pads); exact, and
    the export reloads with plain from_pretrained to the same logits."""
    config = _config(name, 2, 8, 8, None)
    kv_field = family_named(name).attention.num_kv_heads_field
    if kv_field:
        setattr(config, kv_field, 8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    view = ArchView(model.config, model)
    assert view.hidden_size == 64
    old = facts(view)
    _, report = widen(model, view, size=new_hidden - 64, init="lossless", symmetry="noise")
    copies, pads = divmod(new_hidden, 64)
    repeats = view.num_heads // 8
    if repeats < copies:
        # only a config wanting d_model % heads == 0 (LlamaConfig, Gemma's) that cannot describe 24 heads
        # at 200: the heads repeat fewer times and each reads W/k of every copy (still exact)
        assert not view.family.attention.width_follows_hidden and new_hidden % (copies * 8)
        assert repeats >= 1 and "heads unchanged (8 x 8)" in report["note"]
    assert check_grown(model, view, report, tmp_path, old, copies, pads, repeats) <= EXACT
