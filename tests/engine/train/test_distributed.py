"""DDP and FSDP2 under torchrun, 2 CPU processes on gloo: the same figures as one process with
the same global batch, a stage's expansion and a plateau growth applied alike on every rank (DDP:
unwrap, grow, re-wrap; FSDP: gather whole, grow, re-shard), the run's files written by rank 0
alone, kill -9 of a rank then resume ending as a straight run does."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from engine.plan import load_plan
from engine.runs.events import read_all
from engine.runs.rundir import RunDir
from engine.train.session import run as run_worker
from tests.conftest import wait_for, widen
from widen_tui.launcher import create_run

pytestmark = pytest.mark.slow

PLAN = textwrap.dedent("""
    name = "ddp"
    seed = 3
    [model]
    source = "builtin:tiny-neo"
    [tasks.prose]
    source = "builtin:pydoc"
    max_docs = 30
    [tasks.python]
    source = "builtin:stdlib-python"
    max_docs = 30
    [train]
    batch_size = 4
    seq_len = 32
    lr = 3e-3
    eval_interval = 10
    eval_batches = 3
    log_interval = 1
    device = "cpu"
    [[stages]]
    task = "prose"
    steps = 8
    [[stages]]
    task = "python"
    steps = 30
    freeze = "base"
    [[stages.expand]]
    op = "widen_ffn"
    layers = "all"
    size = 16
    [stages.grow]
    patience = 1
    threshold = 0.5
    check_interval = 2
    warmup_checks = 1
    cooldown = 0
    max_growths = 1
    [[stages.grow.expand]]
    op = "widen_ffn"
    size = 16
    init = "net2net"
    mode = "inplace"
""")


STRATEGIES = ("ddp", "fsdp")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The plan in one process (the strategy means nothing there)."""
    home = tmp_path_factory.mktemp("single")
    plan_path = home / "plan.toml"
    plan_path.write_text(PLAN)
    run = create_run(load_plan(plan_path), plan_path, home / "runs")
    assert run_worker(run.path) == 0
    return run


@pytest.fixture(scope="module", params=STRATEGIES)
def runs(request, single, tmp_path_factory):
    """(one process, two processes under torchrun with the strategy, each rank's rows in two
    micro-batches) of the same plan."""
    home = tmp_path_factory.mktemp(request.param)
    plan_path = home / "plan.toml"
    plan_path.write_text(PLAN)
    root = home / "runs"
    # two micro-batches per rank: DDP's no_sync / FSDP's deferred reduce-scatter, then one exchange
    out = widen("run", str(plan_path), "--nproc", "2", "--detach", "--set", "train.grad_accum=2", "--set",
                f"train.distributed.strategy={request.param}", env_home=root, check=True)
    double = RunDir(root / out.stdout.strip())
    assert wait_for(double, timeout=180) == "done", double.status()
    return single, double


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    single, double = runs
    losses = [[(e.stage, e.step, e.loss) for e in read_all(r.events) if e.type == "step"]
              for r in runs]
    assert len(losses[0]) == len(losses[1]) == 38
    assert [x[:2] for x in losses[0]] == [x[:2] for x in losses[1]]
    rel = [abs(a[2] - b[2]) / abs(a[2]) for a, b in zip(*losses)]
    assert rel[0] <= 1e-4 and max(rel) <= 1e-3, rel
    # evaluation is sharded by batch and its sums all-reduced: the same matrix
    for a, b in zip(single.results()["matrix"]["loss"], double.results()["matrix"]["loss"]):
        assert b == pytest.approx(a, rel=1e-4)


def test_expansions_and_growth_happen_alike_and_stay_exact(runs):
    single, double = runs
    expands = [[e for e in read_all(r.events) if e.type == "expand"] for r in runs]
    assert [(e.op, e.trigger, e.params_added) for e in expands[0]] == \
           [(e.op, e.trigger, e.params_added) for e in expands[1]]
    assert any(e.trigger == "plateau" for e in expands[1])
    assert max(e.max_abs_logit_delta for e in expands[1]) <= 1e-4


def test_rank_0_alone_writes_the_run(runs):
    _, double = runs
    events = read_all(double.events)
    starts = [e for e in events if e.type == "start"]
    assert len(starts) == 1 and starts[0].world_size == 2
    assert starts[0].strategy == load_plan(double.plan).train.strategy
    assert sum(e.type == "status" for e in events) == 1
    steps = [(e.stage, e.step) for e in events if e.type == "step"]
    assert len(steps) == len(set(steps))
    assert json.loads(double.status_json.read_text())["world_size"] == 2


def test_a_batch_that_does_not_divide_is_refused_at_check_time(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    out = widen("plan", "check", str(plan), "--set", "train.distributed.nproc=3", env_home=tmp_path / "runs")
    assert out.returncode == 1 and "train.batch_size" in out.stderr and "nproc 3" in out.stderr


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cancel_reaches_every_rank_and_resume_continues(tmp_path, strategy):
    root = tmp_path / "runs"
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    out = widen("run", str(plan), "--nproc", "2", "--detach", "--set", "stages.1.steps=2000",
                "--set", "train.eval_interval=0", "--set", f"train.distributed.strategy={strategy}",
                env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    deadline = time.time() + 120
    while not any(e.type == "step" and e.stage == 1 for e in read_all(run.events)):
        assert time.time() < deadline and run.status()["state"] in ("queued", "running"), run.stderr.read_text()[-2000:]
        time.sleep(0.2)
    widen("cancel", run.id, env_home=root, check=True)
    assert wait_for(run, timeout=60) == "cancelled", run.status()
    deadline = time.time() + 30
    while psutil_children_of_run(run):  # every rank exits (the status is written just before)
        assert time.time() < deadline, psutil_children_of_run(run)
        time.sleep(0.2)
    # a checkpoint (FSDP's sharded: DCP, each rank its own shards) loads on any N, either strategy
    widen("resume", run.id, "--nproc", "1", env_home=root, check=True)
    deadline = time.time() + 60
    while not any(e.type == "resume" for e in read_all(run.events)):
        assert time.time() < deadline, run.stderr.read_text()[-2000:]
        time.sleep(0.2)
    widen("cancel", run.id, env_home=root, check=True)
    assert wait_for(run, timeout=60) == "cancelled"


def psutil_children_of_run(run: RunDir) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "engine.train.worker" in cmdline and str(run.path) in cmdline:
            found.append(proc)
    return found


def test_kill_9_of_one_rank_fails_the_run_naming_it_and_resume_finishes_like_a_straight_run(runs, tmp_path):
    single, double = runs
    root = tmp_path / "runs"
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    out = widen("run", str(plan), "--nproc", "2", "--detach", "--set", "train.checkpoint_interval=4", "--set",
                f"train.distributed.strategy={load_plan(double.plan).train.strategy}", env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    deadline = time.time() + 120
    while not any(e.type == "checkpoint" and e.stage == 1 for e in read_all(run.events)):
        assert time.time() < deadline and run.status()["state"] in ("queued", "running"), run.stderr.read_text()[-2000:]
        time.sleep(0.05)
    (rank1,) = [p for p in psutil_children_of_run(run) if p.environ().get("RANK") == "1"]
    rank1.kill()
    assert wait_for(run, timeout=90) == "failed"
    error = run.status()["error"]
    assert "rank 1" in error and "widen resume" in error and len(error.splitlines()) == 1
    deadline = time.time() + 30
    while psutil_children_of_run(run):
        assert time.time() < deadline
        time.sleep(0.2)
    sharded = load_plan(run.plan).train.strategy == "fsdp"  # FSDP: each rank wrote its shards (DCP)
    assert (run.checkpoints / "latest" / "dcp" / ".metadata").exists() == sharded
    assert (run.checkpoints / "latest" / "model.safetensors").exists() != sharded
    widen("resume", run.id, env_home=root, check=True)
    assert wait_for(run, timeout=180) == "done", run.status()
    for a, b in zip(single.results()["matrix"]["loss"], run.results()["matrix"]["loss"]):
        assert b == pytest.approx(a, rel=1e-4)


def test_watch_shows_the_world_size(runs):
    from rich.console import Console

    from engine.runs.progress import RunProgress
    from widen_tui.views.report import live_view

    _, double = runs
    progress = RunProgress()
    for event in read_all(double.events):
        progress.update(event)
    assert progress.world_size == 2
    console = Console(width=120, record=True)
    console.print(live_view(progress))
    assert "cpu × 2 processes" in console.export_text()


def test_task_modules_and_a_lora_train_alike_under_fsdp(tmp_path):
    """Per-task parallel FFN paths and a LoRA adapter switched on and off over a sharded model,
    with evaluations and checkpoints mid-stage (taken from the shards): the same matrix."""
    from test_task_modules_run import PLAN as TASK_PLAN

    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(TASK_PLAN.replace("eval_interval = 0", "eval_interval = 2\ncheckpoint_interval = 3"))
    root = tmp_path / "runs"
    single = create_run(load_plan(plan_path), plan_path, root)
    assert run_worker(single.path) == 0
    out = widen("run", str(plan_path), "--nproc", "2", "--detach", "--set", "train.distributed.strategy=fsdp",
                env_home=root, check=True)
    sharded = RunDir(root / out.stdout.strip())
    assert wait_for(sharded, timeout=180) == "done", sharded.status()
    assert sum(e.type == "checkpoint" and e.reason == "interval" for e in read_all(sharded.events)) >= 3
    for a, b in zip(single.results()["matrix"]["loss"], sharded.results()["matrix"]["loss"]):
        assert b == pytest.approx(a, rel=1e-4)
