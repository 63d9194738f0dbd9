"""Mixtures of experts under torchrun (2 CPU processes, gloo), DDP and FSDP2: the same figures as
one process with the same global batch — a native Mixtral (FSDP shards each fused expert tensor
on its expert axis), and the built-in Llama upcycled mid-run then given more experts mid-run
(FSDP gathers it whole for the upcycle, grows it as one process would, and shards it again).

The load-balancing loss is a product of two batch means (f_e · P_e); each rank's f_e counts every
rank's tokens (engine.train.moe.load_balancing_loss), so the ranks' averaged gradients are one
process's. Measured here: step losses within 1e-6 relative of one process."""

from __future__ import annotations

import textwrap

import pytest

from engine.plan import load_plan
from engine.runs.events import read_all
from engine.runs.rundir import RunDir
from engine.train.session import run as run_worker
from tests.conftest import wait_for, widen
from tests.engine.train.test_moe_training import save_tiny
from widen_tui.launcher import create_run

pytestmark = pytest.mark.slow

STRATEGIES = ("ddp", "fsdp")

NATIVE = textwrap.dedent("""
    name = "moe-native"
    seed = 1
    [model]
    source = "{source}"
    [tasks.prose]
    source = "builtin:pydoc"
    max_docs = 30
    eval_fraction = 0.2
    [train]
    batch_size = 4
    seq_len = 16
    lr = 3e-3
    eval_interval = 3
    eval_batches = 2
    log_interval = 1
    device = "cpu"
    [[stages]]
    task = "prose"
    steps = 6
""")

# dense for 3 steps; upcycled mid-stage (Drop-Upcycling, a random router), then 4 -> 8 experts
# mid-stage: each growth carries the AdamW moments (engine.grow.growth.carry_optimizer_state)
UPCYCLED = textwrap.dedent("""
    name = "moe-upcycled"
    seed = 2
    [model]
    source = "builtin:tiny-llama"
    [tasks.prose]
    source = "builtin:pydoc"
    max_docs = 30
    [train]
    batch_size = 4
    seq_len = 32
    lr = 3e-3
    eval_interval = 4
    eval_batches = 2
    log_interval = 1
    device = "cpu"
    router_aux_loss_coef = 0.01
    [[stages]]
    task = "prose"
    steps = 3
    [[stages]]
    task = "prose"
    steps = 5
    [stages.grow]
    trigger = "at"
    at_steps = [2]
    [[stages.grow.expand]]
    op = "upcycle"
    experts = 4
    top_k = 2
    init = "drop"
    [[stages]]
    task = "prose"
    steps = 4
    [stages.grow]
    trigger = "at"
    at_steps = [2]
    [[stages.grow.expand]]
    op = "add_experts"
    experts = 8
""")


def one_and_two(tmp_path, text: str, strategy: str) -> tuple[RunDir, RunDir]:
    """The plan `text` in one process, and under torchrun in two with `strategy`."""
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(text)
    single = create_run(load_plan(plan_path), plan_path, tmp_path / "one")
    assert run_worker(single.path) == 0
    root = tmp_path / "two"
    out = widen("run", str(plan_path), "--nproc", "2", "--detach", "--set",
                f"train.distributed.strategy={strategy}", env_home=root, check=True)
    double = RunDir(root / out.stdout.strip())
    assert wait_for(double, timeout=240) == "done", double.status()
    return single, double


def assert_trained_alike(single: RunDir, double: RunDir, steps: int) -> None:
    """The same steps, losses (the language model's and the one trained on) within 1e-5, the same
    evaluation matrix, the same tokens routed per layer."""
    events = [read_all(r.events) for r in (single, double)]
    runs = [[e for e in stream if e.type == "step"] for stream in events]
    assert len(runs[0]) == len(runs[1]) == steps
    for a, b in zip(*runs):
        assert (a.stage, a.step) == (b.stage, b.step)
        assert b.loss == pytest.approx(a.loss, rel=1e-5), (a.stage, a.step)
        assert (a.total_loss is None) == (b.total_loss is None)
        if a.total_loss is not None:
            assert b.total_loss == pytest.approx(a.total_loss, rel=1e-5), (a.stage, a.step)
    windows = [[e for e in stream if e.type == "experts"] for stream in events]
    assert [(w.stage, w.step) for w in windows[0]] == [(w.stage, w.step) for w in windows[1]] != []
    for a, b in zip(*windows):
        assert [r.tokens for r in b.layers] == [r.tokens for r in a.layers]
        assert b.aux_loss == pytest.approx(a.aux_loss, rel=1e-5)
    for a, b in zip(single.results()["matrix"]["loss"], double.results()["matrix"]["loss"]):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_native_mixtral_trains_like_one_process(tmp_path, strategy):
    save_tiny("mixtral", tmp_path / "mixtral", router_aux_loss_coef=0.05)
    single, double = one_and_two(tmp_path, NATIVE.format(source=tmp_path / "mixtral"), strategy)
    assert_trained_alike(single, double, steps=6)
    # the first step's window: the same weights, the same global batch, so the same routing
    first = [next(e for e in read_all(r.events) if e.type == "experts") for r in (single, double)]
    for a, b in zip(first[0].layers, first[1].layers):
        assert b.tokens == a.tokens == 4 * 16 and b.dead == a.dead
        assert b.load == pytest.approx(a.load, abs=1e-6) and b.entropy == pytest.approx(a.entropy, rel=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_upcycled_mid_run_then_more_experts_trains_like_one_process(tmp_path, strategy):
    single, double = one_and_two(tmp_path, UPCYCLED, strategy)
    assert_trained_alike(single, double, steps=12)
    expands = [[e for e in read_all(r.events) if e.type == "expand"] for r in (single, double)]
    ffn = 3 * 128 * 344   # one of tiny-llama's 4 dense FFNs: one expert
    assert [(e.stage, e.op, e.trigger, e.params_added) for e in expands[1]] == \
        [(e.stage, e.op, e.trigger, e.params_added) for e in expands[0]] == \
        [(1, "upcycle", "at", 4 * (3 * ffn + 4 * 128)), (2, "add_experts", "at", 4 * 4 * (ffn + 128))]
    for a, b in zip(*expands):
        assert b.max_abs_logit_delta == pytest.approx(a.max_abs_logit_delta, rel=1e-4, abs=1e-6)
    # 8 experts, top 4 after add_experts (m·k keeps it exact): a token goes through 4 of the 8
    summaries = [r.results()["summary"] for r in (single, double)]
    assert summaries[0]["params"] == summaries[1]["params"] == 759_296 + 4 * (7 * ffn + 8 * 128)
    assert summaries[0]["active_params"] == summaries[1]["active_params"] == 759_296 + 4 * (3 * ffn + 8 * 128)
