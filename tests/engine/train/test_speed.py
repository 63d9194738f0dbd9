"""engine.train.speed and train.attention: the speed settings change how fast, never what is computed.

Every check runs on the CPU; the same checks run on CUDA where there is a GPU (skipped here)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from engine.model.forward import forward_logits, loss_of
from engine.model.sources import load_model
from engine.model.view import FAMILIES, ArchView
from engine.plan import ModelSpec
from engine.train import speed
from engine.train.optim import Precision
from tests import tiny_models

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the same check runs on CPU)")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]
# fused kernels sum in another order; on CUDA fp32 matmuls may also differ a little
CLOSE = {"cpu": 1e-5, "cuda": 1e-4}
GRADS_CLOSE = {"cpu": 1e-6, "cuda": 1e-5}


# -- micro_batches ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 7), st.booleans())
def test_micro_batches_concatenate_to_the_batch(grad_accum, per_slice, width, nested_list):
    rows = grad_accum * per_slice
    rng = np.random.default_rng(rows * 31 + width)
    x, y, z = (rng.integers(0, 99, (rows, width)) for _ in range(3))
    batch = (x, [y, z]) if nested_list else (x, (y, z))
    slices = speed.micro_batches(batch, grad_accum)
    assert len(slices) == grad_accum
    for part in slices:  # same nesting and types, equal rows
        assert type(part) is tuple and type(part[1]) is type(batch[1])
        assert all(len(a) == per_slice for a in (part[0], *part[1]))
    np.testing.assert_array_equal(np.concatenate([p[0] for p in slices]), x)
    np.testing.assert_array_equal(np.concatenate([p[1][0] for p in slices]), y)
    np.testing.assert_array_equal(np.concatenate([p[1][1] for p in slices]), z)


def test_micro_batches_of_one_is_the_batch_and_uneven_rows_are_refused():
    batch = (np.zeros((6, 3)), np.ones((6, 3)))
    assert speed.micro_batches(batch, 1)[0] is batch
    assert [len(p) for p in speed.micro_batches(np.arange(6), 3)] == [2, 2, 2]
    with pytest.raises(speed.SpeedError, match="train.grad_accum"):
        speed.micro_batches(batch, 4)


# -- attention ----------------------------------------------------------------------------------

def _tiny_config(model_type: str):
    """A tiny config of every model type the registry serves (tests/tiny_models where it has one)."""
    family = next(f for f in FAMILIES if model_type in f.model_types)
    if family.kind == "causal_lm" and model_type == family.model_types[0]:  # the family's own tiny config
        config = tiny_models.tiny_config(family.name, layers=2, heads=2, head_dim=8, ffn=24)
    elif model_type == "t5":
        config = tiny_models.build_t5()[0].config
    else:  # the other Llama-layout types (mistral, qwen2)
        config = AutoConfig.for_model(model_type, vocab_size=tiny_models.VOCAB, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=24,
                                      max_position_embeddings=64)
    for field in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout_rate", "attention_dropout",
                  "hidden_dropout", "resid_dropout", "embed_dropout"):
        if hasattr(config, field):
            setattr(config, field, 0.0)  # dropout would make train-mode comparisons random
    return config


MODEL_TYPES = [t for family in FAMILIES if family.kind != "mlp" for t in family.model_types]


def _auto(config):
    return AutoModelForSeq2SeqLM if config.model_type == "t5" else AutoModelForCausalLM


def _saved(tmp_path, model_type: str) -> str:
    """A tiny random model of `model_type` saved as a local directory (load_model's hub path)."""
    config = _tiny_config(model_type)
    torch.manual_seed(0)
    model = _auto(config).from_config(config, attn_implementation="eager")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(tmp_path / model_type)
    return str(tmp_path / model_type)


def _inputs(model, device, rows=2, length=12):
    x = torch.randint(2, tiny_models.VOCAB, (rows, length), generator=torch.Generator().manual_seed(1)).to(device)
    return (x, x) if ArchView.of(model).family.kind == "seq2seq" else x


def test_the_cases_cover_every_family_in_the_registry():
    assert {"gpt_neo", "gpt2", "gpt_neox", "llama", "t5"} <= set(MODEL_TYPES)
    for model_type in MODEL_TYPES:
        assert _tiny_config(model_type).model_type == model_type


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_family_with_sdpa_gets_it_and_agrees_with_eager(tmp_path, model_type, device):
    source = _saved(tmp_path, model_type)
    model_class = _auto(_tiny_config(model_type))._model_mapping[type(_tiny_config(model_type))]
    sdpa, _ = load_model(ModelSpec(source=source), seed=0, attention="sdpa")
    eager, _ = load_model(ModelSpec(source=source), seed=0, attention="eager")
    assert speed.attention_of(eager) == "eager" and eager.attention_fallback is None
    if model_class._supports_sdpa:
        assert speed.attention_of(sdpa) == "sdpa" and sdpa.attention_fallback is None
    else:  # kept eager, and says so in one line
        assert speed.attention_of(sdpa) == "eager"
        assert "train.attention" in sdpa.attention_fallback and "\n" not in sdpa.attention_fallback
    sdpa, eager = sdpa.to(device).eval(), eager.to(device).eval()
    inputs = _inputs(sdpa, device)
    with torch.no_grad():
        delta = (forward_logits(sdpa, inputs) - forward_logits(eager, inputs)).abs().max().item()
    assert delta <= CLOSE[device], f"{model_type}: sdpa vs eager max |Δlogits| {delta:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_the_builtin_model_keeps_eager_and_says_why(device):
    # transformers' GPT-Neo has eager and flash-attention-2 kernels only, no sdpa
    model, _ = load_model(ModelSpec(source="builtin:tiny-neo"), seed=0, attention="sdpa")
    reference, _ = load_model(ModelSpec(source="builtin:tiny-neo"), seed=0, attention="eager")
    assert speed.attention_of(model) == "eager"
    assert "GPTNeo" in model.attention_fallback and "train.attention" in model.attention_fallback
    model, reference = model.to(device).eval(), reference.to(device).eval()
    x = _inputs(model, device)
    with torch.no_grad():
        assert (forward_logits(model, x) - forward_logits(reference, x)).abs().max().item() <= CLOSE[device]
    mlp, _ = load_model(ModelSpec(source="builtin:mlp"), seed=0)
    assert speed.attention_of(mlp) == "none"


# -- activation checkpointing -------------------------------------------------------------------

def _loss_and_grads(model, inputs, targets):
    model.zero_grad(set_to_none=True)
    loss = loss_of(forward_logits(model, inputs), targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", ["builtin:tiny-neo", "llama", "t5"])
def test_checkpointing_gives_the_same_loss_and_gradients(tmp_path, model_type, device):
    source = model_type if model_type.startswith("builtin:") else _saved(tmp_path, model_type)
    model, view = load_model(ModelSpec(source=source), seed=0)
    model = model.to(device).train()
    inputs = _inputs(model, device)
    targets = torch.roll(inputs[0] if isinstance(inputs, tuple) else inputs, -1, 1)
    loss, grads = _loss_and_grads(model, inputs, targets)
    speed.enable_checkpointing(model, view)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    speed.enable_checkpointing(model, view)  # twice is once: no hook stacked on the embeddings
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    blocks = [b for v in view.stacks() for b in v.blocks()]
    assert blocks and all(b.gradient_checkpointing for b in blocks)
    checkpointed_loss, checkpointed = _loss_and_grads(model, inputs, targets)
    assert abs(loss - checkpointed_loss).item() <= GRADS_CLOSE[device]
    assert grads.keys() == checkpointed.keys()
    worst = max((grads[n] - checkpointed[n]).abs().max().item() for n in grads)
    assert worst <= GRADS_CLOSE[device], f"max |Δgrad| {worst:.2e}"


def test_checkpointing_covers_a_block_added_later_once_called_again():
    model, view = load_model(ModelSpec(source="builtin:tiny-neo"), seed=0)
    speed.enable_checkpointing(model, view)
    blocks = view.blocks()
    blocks.append(type(blocks[0])(model.config, layer_id=0))  # built afresh, as a growth may
    assert not blocks[-1].gradient_checkpointing
    speed.enable_checkpointing(model, view)
    assert all(b.gradient_checkpointing for b in blocks)


def test_checkpointing_the_mlp_is_refused_in_one_line():
    model, view = load_model(ModelSpec(source="builtin:mlp"), seed=0)
    with pytest.raises(speed.SpeedError, match="train.checkpointing.*set train.checkpointing = false"):
        speed.enable_checkpointing(model, view)


# -- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_compiled_is_the_module_itself_unless_asked_and_computes_the_same(device):
    model, _ = load_model(ModelSpec(source="builtin:mlp"), seed=0)
    model = model.to(device)
    assert speed.compiled(model, SimpleNamespace(compile=False)) is model
    x = torch.arange(8, device=device)
    try:
        wrapped = speed.compiled(model, SimpleNamespace(compile=True))
        out = wrapped(x)
    except (RuntimeError, torch._dynamo.exc.BackendCompilerFailed) as e:  # no C++ compiler, unsupported Python
        pytest.skip(f"torch.compile does not work on this machine: {str(e).splitlines()[0][:120]}")
    assert wrapped is not model and wrapped._orig_mod is model
    assert (out - model(x)).abs().max().item() <= CLOSE[device]
    assert speed.attention_of(wrapped) == "none"


# -- reduced precision --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, device", [("bfloat16", "cpu"), pytest.param("bfloat16", "cuda", marks=NO_CUDA),
                                           pytest.param("float16", "cuda", marks=NO_CUDA)])
def test_a_reduced_precision_step_trains(tmp_path, dtype, device):
    model, _ = load_model(ModelSpec(source=_saved(tmp_path, "llama")), seed=0)  # an sdpa model
    assert speed.attention_of(model) == "sdpa"
    model = model.to(device).train()
    precision = Precision(dtype, torch.device(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    x = _inputs(model, device)
    with precision.autocast():
        logits = forward_logits(model, x)
    assert logits.dtype == precision.dtype
    loss = loss_of(logits, torch.roll(x, -1, 1))
    precision.scaler.scale(loss).backward()
    precision.scaler.step(optimizer)
    precision.scaler.update()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# -- growth stays exact under sdpa ----------------------------------------------------------------
# tests/tiny_models builds eager models for the operator tests; the engine now gives sdpa to the
# families that have it, so the exact operators are checked on sdpa models too

SDPA_TYPES = ["gpt2", "gpt_neox", "llama", "t5"]


@pytest.mark.parametrize("op", [dict(op="widen_ffn", size=8), dict(op="add_heads", size=2),
                                dict(op="insert_identity"), dict(op="widen_hidden", size=16)],
                         ids=lambda spec: spec["op"])
@pytest.mark.parametrize("model_type", SDPA_TYPES)
def test_exact_operators_stay_exact_under_sdpa(model_type, op):
    from engine.grow.apply import apply_stage
    from engine.plan import ExpandSpec

    if op["op"] == "widen_hidden" and model_type == "t5":
        pytest.skip("widen_hidden grows decoder-only models")
    config = _tiny_config(model_type)
    torch.manual_seed(0)
    model = _auto(config).from_config(config, attn_implementation="sdpa").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, tiny_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    growth = apply_stage(model, ArchView(model.config, model), 0, [ExpandSpec(**op)], (x, torch.roll(x, -1, 1)),
                         torch.Generator().manual_seed(0))
    assert speed.attention_of(model) == "sdpa"
    report = growth.reports[0]
    assert report["exact"] and report["max_abs_logit_delta"] <= 1e-4, report


def test_gradient_accumulation_trains_like_the_whole_batch_in_the_loop(tmp_path):
    """grad_accum = 4 in a real run: each step's batch in 4 micro-batches, the gradients summed,
    one optimizer step — the same step losses as the whole batch at once (up to rounding), and
    a widening with checkpointing on still exact."""
    from engine.plan import load_plan
    from engine.runs.events import read_all
    from engine.train.loop import Trainer
    from widen_tui.launcher import create_run

    plan = tmp_path / "plan.toml"
    plan.write_text("""
name = "accum"
seed = 2
[model]
source = "builtin:tiny-neo"
[tasks.prose]
source = "builtin:pydoc"
max_docs = 20
[train]
batch_size = 8
seq_len = 32
eval_batches = 1
eval_interval = 0
log_interval = 1
device = "cpu"
[[stages]]
task = "prose"
steps = 3
[[stages]]
task = "prose"
steps = 3
[[stages.expand]]
op = "widen_ffn"
size = 16
""")
    losses = {}
    for accum, checkpointing in ((1, "false"), (4, "true")):
        run = create_run(load_plan(plan, [f"train.grad_accum={accum}", f"train.checkpointing={checkpointing}"]),
                         plan, tmp_path / "runs")
        Trainer(run.path).run_plan()
        events = read_all(run.events)
        losses[accum] = [e.loss for e in events if e.type == "step"]
        assert max(e.max_abs_logit_delta for e in events if e.type == "expand") <= 1e-4
    assert len(losses[1]) == len(losses[4]) == 6
    assert max(abs(a - b) / a for a, b in zip(losses[1], losses[4])) <= 1e-5, losses
