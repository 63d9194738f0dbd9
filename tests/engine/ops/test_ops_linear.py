"""widen_mlp on nn.Sequential MLPs (with the failure modes of each init), concat_linear and
parallel_linear on MLPs and on every transformer family: preservation measured on a probe batch,
materialize() exact, the new tensors alone trainable under freeze = "base", clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.exports.hf_directory import _materialize_modules
from engine.grow.apply import Freezer, apply_stage, new_unit_health, probe
from engine.model.forward import forward_logits
from engine.model.view import ArchView, UnsupportedArchitecture, count_params, family_for
from engine.ops.health import similarity_report
from engine.ops.linear import ConcatLinear, ParallelLinear, WiderInputLinear
from engine.plan import ExpandSpec
from tests.tiny_models import build, build_t5, families_for, token_batch

quick = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def make_mlp(widths: list[int], act: str = "relu", seed: int = 0) -> nn.Sequential:
    """Linear(widths[0], widths[1]), act, Linear(...), ..., Linear(..., widths[-1])."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


def float_batch(widths, seed=0, rows=16):
    """Regression targets (float: mean squared error)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, widths[0], generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)).expand(rows, widths[-1]).contiguous()


def grow(model, view, batch, *specs, seed=0):
    return apply_stage(model, view, 0, [ExpandSpec(**s) for s in specs], batch, torch.Generator().manual_seed(seed))


def materialized_delta(model, inputs) -> float:
    """max |Δoutput| between the grown model and its materialized (plain) form."""
    with torch.no_grad():
        before = forward_logits(model, inputs)
        _materialize_modules(model)
        after = forward_logits(model, inputs)
    return float((after - before).abs().max())


def plain_modules_only(model) -> bool:
    return not any(isinstance(m, (ConcatLinear, WiderInputLinear, ParallelLinear)) for m in model.modules())


mlp_widths = st.lists(st.integers(3, 16), min_size=3, max_size=5)  # 2 to 4 Linears
PRESERVING = [("zero_out", "parallel"), ("zeros", "parallel"), ("constant", "parallel"), ("zero_out", "inplace"),
              ("zeros", "inplace"), ("constant", "inplace"), ("net2net", "inplace"), ("copy_halve", "inplace")]


# ---------------------------------------------------------------------------------------------
# the MLP view


def test_a_sequential_gets_the_mlp_view_from_the_family_data():
    model = make_mlp([2, 8, 8, 1])
    for view in (ArchView.of(model), ArchView(None, model)):
        assert view.family.kind == "mlp" and view.family is family_for("sequential")
        assert (view.num_linears, view.num_layers) == (3, 2) and view.linear(1) is model[2]
    assert family_for("gpt2").blocks == "transformer.h" and family_for("gpt2").kind == "causal_lm"
    with pytest.raises(UnsupportedArchitecture, match="nn.Sequential MLP — got Linear"):
        ArchView.of(nn.Linear(2, 3))
    with pytest.raises(ValueError, match="model type 'bert' is not supported — supported: gpt_neo") as error:
        family_for("bert")
    assert "sequential" not in str(error.value)  # no config can name it


# ---------------------------------------------------------------------------------------------
# widen_mlp


@quick
@given(widths=mlp_widths, act=st.sampled_from(list(ACTIVATIONS)), init_mode=st.sampled_from(PRESERVING),
       size=st.integers(1, 3), seed=st.integers(0, 500))
def test_widen_mlp_preserving_inits_keep_outputs(widths, act, init_mode, size, seed):
    init, mode = init_mode
    model = make_mlp(widths, act, seed)
    view, batch = ArchView.of(model), float_batch(widths, seed)
    report = grow(model, view, batch, {"op": "widen_mlp", "size": size, "init": init, "mode": mode}, seed=seed).reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    hidden = len(widths) - 2
    # new incoming rows (a Linear after a widened layer reads its new units too), biases, outgoing columns
    added = sum(size * (widths[i] + (size if i else 0) + 1 + widths[i + 2]) for i in range(hidden))
    assert report["params_added"] == added == count_params(model) - report["params_before"]
    assert materialized_delta(model, batch[0]) <= 1e-5
    assert plain_modules_only(model) and [m.out_features for m in model if isinstance(m, nn.Linear)] == \
        [w + size for w in widths[1:-1]] + [widths[-1]]


@quick
@given(widths=mlp_widths, size=st.integers(1, 3), seed=st.integers(0, 500), mode=st.sampled_from(["parallel", "inplace"]))
def test_widen_mlp_random_init_is_reported_inexact(widths, size, seed, mode):
    model = make_mlp(widths, "tanh", seed)
    report = grow(model, ArchView.of(model), float_batch(widths, seed), {"op": "widen_mlp", "size": size, "init": "random",
                                                                     "mode": mode}).reports[0]
    assert not report["exact"] and 0 < report["max_abs_logit_delta"] < float("inf")


def test_widen_mlp_on_classes_with_int_targets():
    """Integer targets are classes (cross-entropy); the report holds loss, params and health."""
    model = make_mlp([4, 8, 8, 3], "gelu")
    view = ArchView.of(model)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    y = x.argmax(1) % 3
    _, loss = probe(model, x, y)
    report = grow(model, view, (x, y), {"op": "widen_mlp", "size": 4, "layers": [1]}).reports[0]
    assert report["loss_before"] == pytest.approx(loss) and report["loss_after"] == pytest.approx(loss, abs=1e-6)
    assert report["params_added"] == 4 * (8 + 1 + 3) == report["params_after"] - report["params_before"]
    assert report["new_grad_norm"] > 0 and report["dead_share"] == 0.0
    assert report["max_pairwise_cosine"] < 0.99 and report["max_twin_cosine"] is None
    assert isinstance(model[2], ConcatLinear) and isinstance(model[4], WiderInputLinear)


def train(model, batch, steps=30, lr=0.05):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


FAILURE_MODES = [("zeros", "parallel", "dead"), ("zeros", "inplace", "dead"), ("constant", "parallel", "identical"),
                 ("constant", "inplace", "identical"), ("copy_halve", "inplace", "twins"), ("net2net", "inplace", "twins"),
                 ("zero_out", "parallel", "learns"), ("zero_out", "inplace", "learns")]


@pytest.mark.parametrize("init, mode, expect", FAILURE_MODES)
def test_failure_modes_on_the_small_mlp(init, mode, expect):
    """The on-the-fly-expansion note's MLP (2 -> 8 -> 8 -> 1), hidden layer 0 widened by 4 units,
    then trained 30 steps: the note's failure modes happen, and zero_out escapes them."""
    widths = [2, 8, 8, 1]
    model = make_mlp(widths, "relu", 0)
    view = ArchView.of(model)
    batch = float_batch(widths, rows=64)
    growth = grow(model, view, batch, {"op": "widen_mlp", "size": 4, "init": init, "mode": mode, "layers": [0]})
    report = growth.reports[0]
    # twins stay equal to their sources only when the sources train too
    Freezer().apply(model, "none" if expect == "twins" else "base", growth)
    train(model, batch)
    result = growth.results[0]
    units = result.units[0]
    after = similarity_report(result.units)
    health = new_unit_health(model, result, *batch)  # gradients again, after training
    if expect == "dead":
        assert report["new_grad_norm"] == 0 and report["dead_share"] == 1.0
        assert health["new_grad_norm"] == 0 and health["dead_share"] == 1.0
        assert torch.count_nonzero(units.vectors()) == 0  # nothing moved
    elif expect == "identical":
        vectors = units.vectors()
        assert after["max_pairwise_cosine"] > 0.9999
        assert torch.allclose(vectors, vectors[:1].expand_as(vectors), atol=1e-6)
        assert report["new_grad_norm"] > 0 and vectors[:, 2:].abs().max() > 0  # they learn, all alike
    elif expect == "twins":
        assert after["max_twin_cosine"] > 0.9999
        assert torch.allclose(units.vectors(), units.source_vectors(), atol=1e-5)
    else:
        assert report["new_grad_norm"] > 0 and report["dead_share"] == 0.0
        assert health["new_grad_norm"] > 0 and health["dead_share"] < 1.0
        assert after["max_pairwise_cosine"] < 0.99


def test_widen_mlp_in_place_over_a_parallel_path_merges_it():
    model = make_mlp([3, 6, 5, 2], "tanh")
    view, batch = ArchView.of(model), float_batch([3, 6, 5, 2])
    reports = grow(model, view, batch, {"op": "widen_mlp", "size": 2, "layers": [0]},
                   {"op": "widen_mlp", "size": 3, "init": "net2net", "mode": "inplace"}).reports
    assert all(r["exact"] and r["max_abs_logit_delta"] <= 1e-5 for r in reports)
    assert "Linear 0, Linear 1 held tensors added before" in reports[1]["note"]
    assert plain_modules_only(model) and [model[0].out_features, model[2].out_features] == [6 + 2 + 3, 5 + 3]


# ---------------------------------------------------------------------------------------------
# concat_linear and parallel_linear on MLPs


def new_column_gradient(model, hidden: int, batch) -> float:
    """The gradient norm the columns concat_linear added to the reader of hidden layer `hidden`
    should get, computed by hand: (d loss / d reader output)ᵀ · new features. (The new incoming
    weights get none yet: the columns that read them are zero.) It is zero when the new features
    are dead ReLUs, or when ReLUs after the reader are all dead on the batch, or both on
    different rows — small batches of narrow nets do that (e.g. widths 3, size 1, seed 0)."""
    inputs, targets = batch
    with torch.no_grad():
        features = model[:2 * hidden + 2](inputs)              # the concatenated hidden layer
    new = features[:, -model[2 * hidden].expansion.out_features:]
    reader_out = model[2 * hidden + 2](features).requires_grad_(True)
    loss = torch.nn.functional.mse_loss(model[2 * hidden + 3:](reader_out), targets)
    (upstream,) = torch.autograd.grad(loss, reader_out)
    return float((upstream.T @ new).norm())


@quick
@given(widths=mlp_widths, size=st.integers(1, 4), seed=st.integers(0, 500), act=st.sampled_from(list(ACTIVATIONS)),
       delta_init=st.sampled_from(["zeros", "random"]), data=st.data())
def test_concat_and_parallel_linear_on_mlps(widths, size, seed, act, delta_init, data):
    model = make_mlp(widths, act, seed)
    view, batch = ArchView.of(model), float_batch(widths, seed)
    hidden = data.draw(st.integers(0, len(widths) - 3))  # a Linear that another one reads
    targets = data.draw(st.lists(st.integers(0, len(widths) - 2), min_size=1, max_size=2, unique=True))
    parallel = {"op": "parallel_linear", "modules": targets, "init": delta_init}
    reports = grow(model, view, batch, {"op": "concat_linear", "modules": [hidden], "size": size}, seed=seed).reports
    assert reports[0]["exact"] and reports[0]["max_abs_logit_delta"] <= 1e-5
    assert reports[0]["params_added"] == size * (widths[hidden] + 1) + widths[hidden + 2] * size
    # the zero reading columns get the gradient they should (usually > 0, see new_column_gradient)
    assert reports[0]["new_grad_norm"] == pytest.approx(new_column_gradient(model, hidden, batch), rel=1e-4, abs=1e-7)
    reports += grow(model, view, batch, parallel, seed=seed).reports
    assert reports[1]["exact"] == (delta_init == "zeros")
    def fan(i):  # the grown weight's element count
        return (widths[i] + (size if i == hidden + 1 else 0)) * (widths[i + 1] + (size if i == hidden else 0))

    assert reports[1]["params_added"] == sum(fan(i) for i in targets)
    if delta_init == "zeros":
        assert reports[1]["max_abs_logit_delta"] <= 1e-5
    else:
        assert 0 < reports[1]["max_abs_logit_delta"] < float("inf")
    assert materialized_delta(model, batch[0]) <= 1e-5
    assert plain_modules_only(model) and model[2 * hidden].out_features == widths[hidden + 1] + size


def test_freeze_base_trains_only_the_new_tensors():
    widths = [3, 8, 8, 2]
    model = make_mlp(widths, "relu")
    view, batch = ArchView.of(model), float_batch(widths, rows=32)
    growth = grow(model, view, batch, {"op": "concat_linear", "modules": [0], "size": 3},
                  {"op": "parallel_linear", "modules": [2], "init": "random"})
    freezer = Freezer()
    freezer.apply(model, "base", growth)
    new = {id(p) for result in growth.results for p in result.new_params}
    assert freezer.trainable(model) == sum(p.numel() for r in growth.results for p in r.new_params) \
        == 3 * 4 + 8 * 3 + 2 * 8
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, batch, steps=5)
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (id(p) in new), name


# ---------------------------------------------------------------------------------------------
# concat_linear and parallel_linear on transformer blocks


ROLES = ["q", "k", "v", "o", "up", "down"]


@settings(quick, max_examples=10)
@given(family=st.sampled_from(families_for("concat_linear")), roles=st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True),
       size=st.integers(1, 4), seed=st.integers(0, 500), layers=st.sampled_from(["all", [0], [1]]),
       by_path=st.booleans())
def test_linear_ops_on_decoder_families(family, roles, size, seed, layers, by_path):
    model, view = build(family, 2, 2, 4, 12, seed)
    ffn = view.family.ffn
    bias = int(getattr(view.ffn(0), ffn.up).bias is not None)
    concat_target = f"{ffn.module}.{ffn.up}" if by_path else "up"  # a dotted path or a role
    reports = grow(model, view, token_batch(seed),
                   {"op": "concat_linear", "size": size, "modules": [concat_target], "layers": layers},
                   {"op": "parallel_linear", "modules": roles, "layers": [1]}, seed=seed).reports
    for report in reports:
        assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
    grown_layers = 2 if layers == "all" else 1
    producers = 2 if ffn.gate else 1  # a gated FFN's gate grows with up
    assert reports[0]["params_added"] == grown_layers * size * (producers * (8 + bias) + 8)
    assert reports[0]["new_grad_norm"] > 0
    assert materialized_delta(model, token_batch(seed)[0]) <= 1e-5
    assert plain_modules_only(model)


def test_gpt2_conv1d_layout_is_kept_by_materialize():
    model, view = build("gpt2", 2, 2, 4, 12, 0)
    grow(model, view, token_batch(), {"op": "concat_linear", "size": 3},
         {"op": "parallel_linear", "modules": ["attn.c_attn", "q", "o"], "init": "random", "std": 0.05})
    block = model.transformer.h[1]
    assert isinstance(block.attn.c_attn, ParallelLinear)  # q and the dotted path name one fused module, once
    assert block.attn.c_attn.weight.shape == (8, 24)  # the Conv1D layout [in, out], for code that reads it
    _materialize_modules(model)
    assert type(block.mlp.c_fc) is Conv1D and block.mlp.c_fc.weight.shape == (8, 15)
    assert type(block.mlp.c_proj) is Conv1D and block.mlp.c_proj.weight.shape == (15, 8)
    assert type(block.attn.c_attn) is Conv1D and block.attn.c_attn.weight.shape == (8, 24)


@pytest.mark.parametrize("gated", [False, True])
def test_linear_ops_on_t5_stacks(gated):
    """T5 reads wo.weight.dtype in its FFN: the modules here show the weight of the Linear they compute."""
    model, view = build_t5(gated=gated)
    batch = token_batch()
    reports = grow(model, view, batch, {"op": "concat_linear", "size": 3},
                   {"op": "parallel_linear", "modules": ["q", "o", "down"], "layers": [0], "stack": "decoder"},
                   {"op": "parallel_linear", "modules": ["layer.0.SelfAttention.v"], "init": "random"}).reports
    assert [r["exact"] for r in reports] == [True, True, False]
    assert max(r["max_abs_logit_delta"] for r in reports[:2]) <= 1e-4 and reports[2]["max_abs_logit_delta"] > 0
    assert reports[0]["params_added"] == 5 * 3 * ((2 if gated else 1) * 16 + 16)  # 2 + 3 blocks
    assert reports[1]["params_added"] == 8 * 16 + 16 * 8 + 16 * (24 + 3)  # down reads the 3 new features too
    assert materialized_delta(model, batch[0]) <= 1e-5 and plain_modules_only(model)


def test_linear_ops_compose_with_ffn_widening():
    """concat_linear on up, then widen_ffn in place (merges the concatenation into wider matrices)
    and in parallel, then concat_linear again: every step exact; export-ready afterwards."""
    for family in ("gpt2", "llama"):
        model, view = build(family, 2, 2, 4, 8, 0)
        reports = grow(model, view, token_batch(), {"op": "concat_linear", "size": 3},
                       {"op": "widen_ffn", "size": 2, "mode": "inplace"}, {"op": "widen_ffn", "size": 2},
                       {"op": "concat_linear", "size": 1}).reports
        assert all(r["exact"] and r["max_abs_logit_delta"] <= 1e-4 for r in reports), family
        assert materialized_delta(model, token_batch()[0]) <= 1e-5 and plain_modules_only(model)
        up = view.ffn(0).up_proj if family == "llama" else view.ffn(0).c_fc
        assert up.weight.shape[1 if family == "gpt2" else 0] == 8 + 3 + 2 + 2 + 1


# ---------------------------------------------------------------------------------------------
# errors


MLP_ERRORS = [
    ({"op": "concat_linear", "modules": [2], "size": 2}, r"modules: Linear 2 is the MLP's output layer"),
    ({"op": "concat_linear", "modules": [5], "size": 2}, r"modules: Linear 5 out of range — this MLP has 3 Linears"),
    ({"op": "concat_linear", "size": 2}, r"modules: \['up'\]: an nn.Sequential has no named blocks"),
    ({"op": "parallel_linear", "modules": [0], "layers": [0]}, r"layers: an nn.Sequential has no blocks"),
    ({"op": "widen_mlp", "size": 2, "layers": [0, 2]}, r"layers: hidden layer 2 out of range — this MLP has 2 hidden"),
    ({"op": "widen_mlp", "size": 2, "layers": [1]}, r"layers: hidden layer 1 passes through LayerNorm \(child 3\)"),
    ({"op": "concat_linear", "modules": [1], "size": 2}, r"modules: hidden layer 1 passes through LayerNorm"),
    ({"op": "widen_ffn", "size": 2}, r"op: widen_ffn does not apply to mlp models — ops that do: widen_mlp, "
                                     r"concat_linear, parallel_linear"),
    ({"op": "insert_identity"}, r"op: insert_identity does not apply to mlp models"),
]


@pytest.mark.parametrize("spec, message", MLP_ERRORS)
def test_clear_errors_on_mlps(spec, message):
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    before = repr(model)
    with pytest.raises(ValueError, match=message):
        grow(model, ArchView.of(model), float_batch([2, 1]), spec)
    assert repr(model) == before  # refused before anything changed


TRANSFORMER_ERRORS = [
    ({"op": "widen_mlp", "size": 2}, r"op: widen_mlp grows the hidden layers of an nn.Sequential MLP — gpt2 models "
                                     r"grow their FFNs with op = \"widen_ffn\""),
    ({"op": "concat_linear", "modules": ["q"], "size": 2}, r"modules: 'q' \(gpt2\): concat_linear needs a Linear whose "
                                                           r"outputs exactly one module reads"),
    ({"op": "concat_linear", "modules": ["mlp.c_proj"], "size": 2}, r"'mlp.c_proj' \(layer 0: transformer.h.0.mlp.c_proj\)"),
    ({"op": "parallel_linear", "modules": ["mlp.nope"]}, r"modules: no module 'mlp.nope' in layer 0 — name a role"),
    ({"op": "parallel_linear", "modules": ["ln_1"]}, r"modules: 'ln_1' in layer 0 \(transformer.h.0.ln_1\) is a "
                                                     r"LayerNorm, not a plain Linear"),
    ({"op": "parallel_linear", "modules": ["gate"]}, r"modules: role 'gate' does not exist in gpt2 models"),
    ({"op": "parallel_linear", "modules": [0]}, r"modules: \[0\]: Linear indices name the layers of an nn.Sequential"),
    ({"op": "parallel_linear", "modules": ["up"], "layers": [4]}, r"layers: layer 4 out of range — the model has 2 layers"),
]


@pytest.mark.parametrize("spec, message", TRANSFORMER_ERRORS)
def test_clear_errors_on_transformers(spec, message):
    model, view = build("gpt2", 2, 2, 4, 8, 0)
    with pytest.raises(ValueError, match=message):
        grow(model, view, token_batch(), spec)


def test_schema_errors():
    from pydantic import ValidationError

    from engine.ops.params import ParallelLinearParams, WidenMLPParams

    with pytest.raises(ValidationError, match="set mode = \"inplace\""):
        WidenMLPParams(size=2, init="net2net", mode="parallel")  # (unset, the mode follows the init)
    with pytest.raises(ValidationError, match="std sets the random delta"):
        ParallelLinearParams(modules=["q"], std=0.1)
    with pytest.raises(ValidationError, match="modules repeat"):
        ParallelLinearParams(modules=["q", "q"])


def test_plan_check_names_the_field(tmp_path):
    from engine.plan import validate_file
    from tests.conftest import ROOT

    text = (ROOT / "experiments" / "quickstart.toml").read_text()
    stage_two = text.index("[[stages.expand]]")
    path = tmp_path / "p.toml"
    path.write_text(text[:stage_two] + '[[stages.expand]]\nop = "widen_mlp"\nsize = 4\n\n'
                    '[[stages.expand]]\nop = "concat_linear"\nmodules = ["o"]\nsize = 4\n')
    _, problems = validate_file(path)
    text = "\n".join(str(p) for p in problems)
    assert 'stages.1.expand.0.op: widen_mlp grows the hidden layers of an nn.Sequential MLP — gpt_neo' in text
    assert "stages.1.expand.1.modules: 'o' (gpt_neo): concat_linear needs a Linear" in text
    assert len(problems) == 2


def test_identity_insertion_after_wrapped_output_projections_stays_exact():
    """insert_identity zeroes the copy's output projections even when they are widen wrappers."""
    from tests.tiny_models import build as build_decoder

    model, view = build_decoder("llama", 2, 2, 4, 12, 0)
    growth = apply_stage(model, view, 0, [
        ExpandSpec(op="parallel_linear", modules=["o", "down"], init="random", std=0.1),
        ExpandSpec(op="concat_linear", modules=["up"], size=2),
        ExpandSpec(op="insert_identity", layers="all")], token_batch(), torch.Generator().manual_seed(0))
    report = growth.reports[-1]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report
