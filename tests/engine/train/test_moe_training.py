"""Mixture-of-experts training (engine/train/moe.py): the routers' losses against transformers' own,
for native MoE models and for a dense model upcycled into one; what the routers did, per window;
the plan's coefficients; and real tiny runs whose step and experts events read back."""

from __future__ import annotations

import importlib
import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.model.families import FAMILIES
from engine.model.forward import forward_logits, loss_of
from engine.ops.experts import as_moe_class
from engine.ops.params import UpcycleParams
from engine.ops.registry import apply_operator
from engine.runs.events import read_all
from engine.train.moe import Routers, load_balancing_loss, router_z_loss, sparse_routers
from tests.tiny_models import build, tiny_config, token_batch

MOE_FAMILIES = [f.name for f in FAMILIES if f.moe is not None]


def transformers_loss(model, view, inputs):
    """transformers' own load-balancing loss of `model` on `inputs`: its family's
    load_balancing_loss_func over the router logits it records, and the aux_loss it returns."""
    module = importlib.import_module(type(model).__module__)
    out = model(input_ids=inputs, output_router_logits=True)
    return module.load_balancing_loss_func(out.router_logits, view.num_experts, view.top_k), out.aux_loss


def routed_terms(model, view, inputs, **coefs):
    """(LM loss, the routers' weighted terms, the unweighted [aux, z]) of one captured forward."""
    routers = Routers(**coefs)
    routers.sync(model, view)
    targets = torch.roll(inputs, -1, 1)
    with routers.capture():
        logits = forward_logits(model, inputs)
    lm = loss_of(logits, targets)
    terms = routers.loss()
    return lm, terms, routers._step_terms[-1], routers


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_aux_loss_is_transformers_load_balancing_loss(family):
    model, view = build(family, layers=3, heads=2, head_dim=8, ffn=16, seed=0)
    model.train()
    inputs = token_batch(rows=2, length=12)[0]
    lm, terms, (aux, z), routers = routed_terms(model, view, inputs)
    theirs, returned = transformers_loss(model, view, inputs)
    theirs, returned = float(theirs.detach()), float(returned.detach())
    assert float(aux) == pytest.approx(theirs, rel=1e-6) and theirs == pytest.approx(returned)
    coef = float(getattr(model.config, view.moe.aux_loss_field))
    assert routers.aux_coef == coef > 0 and routers.z_coef == 0.0  # the config's own; no family has a z-loss
    assert float((lm + terms).detach()) == pytest.approx(float(lm.detach()) + coef * theirs, rel=1e-6)
    assert terms.requires_grad  # it trains the routers


def test_an_upcycled_dense_model_gets_the_same_loss():
    """A Llama whose FFNs became Mixtral blocks (its class stays LlamaForCausalLM): its routers are
    found through the layout, and the loss is transformers' on the same weights as a Mixtral."""
    model, view = build("llama", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    assert Routers().active is False and sparse_routers(model, view) == []  # dense: nothing hooked
    apply_operator(view, UpcycleParams(experts=4, top_k=2, init="noise"), torch.Generator().manual_seed(0))
    assert type(model).__name__ == "LlamaForCausalLM" and view.moe is not None
    model.train()
    inputs = token_batch(rows=2, length=12)[0]
    lm, terms, (aux, _), routers = routed_terms(model, view, inputs, aux_coef=0.25)
    assert [layer for layer, _ in routers._routers] == [0, 1]
    mixtral = as_moe_class(model)
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    theirs = float(transformers_loss(mixtral, view, inputs)[0].detach())
    assert float(aux) == pytest.approx(theirs, rel=1e-6)
    assert float((lm + terms).detach()) == pytest.approx(float(lm.detach()) + 0.25 * theirs, rel=1e-6)


def test_the_loss_trains_the_routers_and_zero_turns_it_off():
    model, view = build("mixtral", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    model.train()
    inputs = token_batch(rows=2, length=12)[0]
    router = view.moe_block(0).gate.weight

    def router_grad(coef: float | None):
        model.zero_grad(set_to_none=True)
        lm, terms, _, _ = routed_terms(model, view, inputs, aux_coef=coef or 0.0)
        (lm if coef is None else lm + terms).backward()
        return router.grad.clone()

    lm_only, off, heavy = router_grad(None), router_grad(0.0), router_grad(10.0)
    assert torch.equal(lm_only, off) and not torch.allclose(off, heavy)


def test_ranks_balancing_the_global_batch_average_to_one_process():
    """Under torchrun each rank's f_e counts every rank's tokens (``all_sum``), its P_e its own rows:
    the two ranks' mean loss and mean router gradient (what DDP averages) are one process's on the
    whole batch. With f_e per rank they are not: the loss is a product of two batch means."""
    model, view = build("mixtral", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    model.train()
    inputs = token_batch(rows=4, length=12)[0]
    routers_of = [view.moe_block(i).gate.weight for i in view.sparse_layers()]

    def captured(rows):
        routers = Routers()
        routers.sync(model, view)
        with routers.capture():
            forward_logits(model, rows)
        return routers._captured

    def loss_and_grads(losses):
        loss = sum(losses) / len(losses)
        return float(loss.detach()), torch.autograd.grad(loss, routers_of)

    whole, whole_grads = loss_and_grads([load_balancing_loss(captured(inputs))])
    halves = [captured(inputs[:2]), captured(inputs[2:])]
    packed = []
    for half in halves:  # what each rank hands the all-reduce
        load_balancing_loss(half, lambda t: packed.append(t) or t)
    summed = lambda t: packed[0] + packed[1]  # noqa: E731 — the all-reduce of the two ranks
    ranks, rank_grads = loss_and_grads([load_balancing_loss(h, summed) for h in halves])
    assert ranks == pytest.approx(whole, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(rank_grads, whole_grads))
    halves = [captured(inputs[:2]), captured(inputs[2:])]
    apart, _ = loss_and_grads([load_balancing_loss(h) for h in halves])
    assert abs(apart - whole) > 1e-4  # each rank's own f_e: not one process's loss


def test_router_z_loss_from_the_plan_or_the_layout():
    model, view = build("mixtral", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    inputs = token_batch(rows=2, length=12)[0]
    captured = []
    hooks = [view.moe_block(i).gate.register_forward_hook(lambda m, a, o: captured.append(o[0]))
             for i in view.sparse_layers()]
    lm, terms, (aux, z), routers = routed_terms(model, view, inputs, aux_coef=0.0, z_coef=0.5)
    for h in hooks:
        h.remove()
    expected = torch.cat([torch.logsumexp(x.float(), -1) ** 2 for x in captured]).mean()
    expected = float(expected.detach())
    assert float(z) == pytest.approx(expected, rel=1e-6) and float(terms.detach()) == pytest.approx(0.5 * float(z))
    # a family whose layout names the config's z-loss field: that is the default
    view.family = replace(view.family, moe=replace(view.family.moe, z_loss_field="router_z_loss_coef"))
    model.config.router_z_loss_coef = 0.125
    routers = Routers()
    routers.sync(model, view)
    assert routers.z_coef == 0.125 and Routers(z_coef=0.0).plan_z == 0.0


def test_the_window_says_load_dead_experts_and_entropy():
    """GPT-OSS routes by its logits' top-k, with a bias: a zero router weight and biases [2, 1, 0,
    -1e4] send every token to experts 0 and 1, with known probabilities."""
    model, view = build("gpt_oss", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    bias = torch.tensor([2.0, 1.0, 0.0, -1e4])
    with torch.no_grad():
        for i in view.sparse_layers():
            view.moe_block(i).router.weight.zero_()
            view.moe_block(i).router.bias.copy_(bias)
    model.train()
    routers = Routers(aux_coef=0.5)
    routers.sync(model, view)
    inputs = token_batch(rows=2, length=12)[0]
    for _ in range(3):  # three steps, the last of two micro-batches
        with routers.capture():
            forward_logits(model, inputs)
        routers.loss()
        routers.end_step()
    with routers.capture():
        forward_logits(model, inputs[:1])
    routers.loss()
    routers.end_step()
    window = routers.drain()
    p = torch.softmax(bias, 0)
    entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
    assert window.steps == 4 and window.top_k == 2 and window.aux_coef == 0.5
    assert [r["layer"] for r in window.layers] == view.sparse_layers()
    for row in window.layers:
        assert row["load"] == [0.5, 0.5, 0.0, 0.0] and row["dead"] == [2, 3] and row["tokens"] == 3 * 24 + 12
        assert row["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert window.aux_loss == pytest.approx(4 * float(p[0] + p[1]), rel=1e-5)  # E · (1·P_0 + 1·P_1)
    assert window.total_loss(2.0) == pytest.approx(2.0 + 0.5 * window.aux_loss, rel=1e-5)
    assert routers.drain() is None  # forgotten once drained


def test_checkpointed_blocks_recomputed_in_the_backward_count_once():
    """train.checkpointing runs each block's forward again in the backward, outside capture():
    the routers see the step's tokens once and the loss is the plain forward's."""
    from engine.train import speed

    model, view = build("mixtral", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    model.train()
    inputs = token_batch(rows=2, length=12)[0]
    plain_lm, plain_terms, _, _ = routed_terms(model, view, inputs)
    speed.enable_checkpointing(model, view)
    lm, terms, _, routers = routed_terms(model, view, inputs)
    (lm + terms).backward()
    routers.end_step()
    window = routers.drain()
    assert float(terms.detach()) == pytest.approx(float(plain_terms.detach()), rel=1e-6)
    assert [r["tokens"] for r in window.layers] == [24, 24] and view.moe_block(0).gate.weight.grad is not None


def test_pools_per_expert_count():
    """Layers with different expert counts pool apart, averaged by their layers."""
    torch.manual_seed(0)
    a = [(torch.randn(6, 4), torch.randint(0, 4, (6, 2))) for _ in range(2)]
    b = [(torch.randn(6, 8), torch.randint(0, 8, (6, 2)))]
    together = load_balancing_loss(a + b)
    assert float(together) == pytest.approx((2 * float(load_balancing_loss(a)) + float(load_balancing_loss(b))) / 3)
    assert float(router_z_loss([x for x, _ in a])) > 0


def test_evaluation_forwards_cost_nothing_and_keep_no_logits():
    model, view = build("qwen2_moe", layers=3, heads=2, head_dim=8, ffn=16, seed=0)
    routers = Routers()
    routers.sync(model, view)
    assert [layer for layer, _ in routers._routers] == view.sparse_layers() == [1, 2]  # block 0 is dense
    forward_logits(model, token_batch()[0])  # outside capture(): an evaluation, a probe
    assert routers.loss() is None and routers._window == {} and routers.drain() is None
    routers.close()
    assert not routers.active and not model.model.layers[1].mlp.gate._forward_hooks


# ---------------------------------------------------------------------------------------------
# real tiny runs: step and experts events


PLAN = """
name = "moe"
seed = 1

[model]
source = "{source}"

[tasks.prose]
source = "builtin:pydoc"
max_docs = 30
eval_fraction = 0.2

[train]
batch_size = 2
seq_len = 16
eval_interval = 0
eval_batches = 1
log_interval = {log}
device = "cpu"
{extra}

[[stages]]
task = "prose"
steps = 4
{stage}
"""


def save_tiny(family: str, path, **fields):
    config = tiny_config(family, layers=2, heads=2, head_dim=8, ffn=16)
    config.vocab_size = 259  # the byte tokenizer
    for key, value in fields.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def run_plan(tmp_path, source, log=1, extra="", stage=""):
    from engine.plan import load_plan
    from engine.train.loop import Trainer
    from widen_tui.launcher import create_run

    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(source=source, log=log, extra=extra, stage=stage))
    run = create_run(load_plan(plan), plan, tmp_path / "runs")
    Trainer(run.path).run_plan()
    assert run.results()["state"] == "done"
    return read_all(run.events)


def test_a_native_mixtral_run_writes_total_loss_and_experts_events(tmp_path):
    save_tiny("mixtral", tmp_path / "mixtral", router_aux_loss_coef=0.05)
    events = run_plan(tmp_path, tmp_path / "mixtral")
    steps = [e for e in events if e.type == "step"]
    experts = [e for e in events if e.type == "experts"]
    assert [e.step for e in steps] == [e.step for e in experts] == [1, 2, 3, 4]
    for step, window in zip(steps, experts):
        assert window.steps == 1 and window.aux_coef == 0.05 and window.top_k == 2 and window.z_loss is None
        assert [r.layer for r in window.layers] == [0, 1]
        assert all(sum(r.load) == pytest.approx(1.0) and r.tokens == 2 * 16 for r in window.layers)
        assert all(0 < r.entropy <= math.log(4) for r in window.layers)
        # one step per window: its total is its LM loss plus the weighted load-balancing loss
        assert step.total_loss == pytest.approx(step.loss + 0.05 * window.aux_loss, rel=1e-5)


def test_a_dense_run_upcycled_mid_stage_gets_the_losses_from_then_on(tmp_path):
    save_tiny("llama", tmp_path / "llama")
    stage = '[stages.grow]\ntrigger = "at"\nat_steps = [2]\n[[stages.grow.expand]]\nop = "upcycle"\nexperts = 4\n'
    events = run_plan(tmp_path, tmp_path / "llama", extra="router_aux_loss_coef = 0.02", stage=stage)
    steps = {e.step: e for e in events if e.type == "step"}
    experts = {e.step: e for e in events if e.type == "experts"}
    assert steps[1].total_loss is None and steps[2].total_loss is None  # dense until the growth after step 2
    assert sorted(experts) == [3, 4] and all(w.aux_coef == 0.02 and w.steps == 1 for w in experts.values())
    for k in (3, 4):
        assert steps[k].total_loss == pytest.approx(steps[k].loss + 0.02 * experts[k].aux_loss, rel=1e-5)


def test_a_window_covers_the_steps_since_the_last_log(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "qwen3_moe")
    events = run_plan(tmp_path, tmp_path / "qwen3_moe", log=3)
    windows = [(e.step, e.steps) for e in events if e.type == "experts"]
    assert windows == [(3, 3), (4, 1)]
