"""A run on several machines: `widen run --nnodes N --rdzv-endpoint HOST:PORT` starts the first
machine's torchrun, `widen join RUN` each other machine's, and they meet at a c10d rendezvous.

Two "machines" on localhost here: two torchrun agents with the same endpoint. Both think they
host the rendezvous store (127.0.0.1 is this machine); the second finds the port taken and is a
client of the first's store — torch's c10d backend falls back so, which this test relies on."""

from __future__ import annotations

import json
import socket
import time

import pytest

from engine.plan import PlanError, load_plan
from engine.runs.events import read_all
from engine.runs.rundir import RunDir
from engine.train.loop import Trainer
from engine.train.session import run as run_worker
from tests.conftest import TINY_PLAN, run_until_cancelled, wait_for, widen
from widen_tui import launcher
from widen_tui.launcher import create_run, worker_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(run: RunDir) -> list[tuple[int, int, float]]:
    return [(e.stage, e.step, e.loss) for e in read_all(run.events) if e.type == "step"]


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory):
    """(one process, 1 process on each of two "machines") of the tiny plan, and the seconds the
    two-machine run took from `widen run` to done."""
    home = tmp_path_factory.mktemp("multinode")
    plan_path = home / "tiny.toml"
    plan_path.write_text(TINY_PLAN)
    root = home / "runs"
    single = create_run(load_plan(plan_path), plan_path, root)
    assert run_worker(single.path) == 0
    began = time.monotonic()
    out = widen("run", str(plan_path), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint",
                f"127.0.0.1:{free_port()}", "--detach", env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    assert f"widen join {run.id}" in out.stderr and "--rdzv-backend=c10d" in out.stderr
    assert run.status()["state"] == "queued"  # waiting for the other machine, not stale nor lost
    joined = widen("join", run.id, "--detach", env_home=root, check=True)
    assert wait_for(run, timeout=120) == "done", run.status()
    return single, run, joined, time.monotonic() - began


@pytest.mark.slow
def test_two_machines_train_like_one_process(two_machines):
    single, double, _, took = two_machines
    starts = [e for e in read_all(double.events) if e.type == "start"]
    assert len(starts) == 1 and starts[0].world_size == 2  # rank 0 alone writes the run
    assert json.loads(double.status_json.read_text())["world_size"] == 2
    losses = [step_losses(single), step_losses(double)]
    assert len(losses[0]) == len(losses[1]) == 12
    assert [x[:2] for x in losses[0]] == [x[:2] for x in losses[1]]
    rel = [abs(a[2] - b[2]) / abs(a[2]) for a, b in zip(*losses)]
    assert rel[0] <= 1e-4 and max(rel) <= 1e-3, rel
    for a, b in zip(single.results()["matrix"]["loss"], double.results()["matrix"]["loss"]):
        assert b == pytest.approx(a, rel=1e-4)
    # each logged step, every rank's memory, gathered over both machines
    ranks = [e for e in read_all(double.events) if e.type == "ranks"]
    assert ranks and not [e for e in read_all(single.events) if e.type == "ranks"]
    assert all([r.rank for r in e.ranks] == [0, 1] for e in ranks)
    assert all(r.rss_mb > 0 and r.gpu_mem_mb is None for e in ranks for r in e.ranks)
    print(f"two-machine run: {took:.1f} s from `widen run` to done")


@pytest.mark.slow
def test_join_writes_only_its_own_log_and_a_done_run_is_not_joined(two_machines):
    _, double, joined, _ = two_machines
    log = double.path / joined.stdout.strip().rsplit("/", 1)[-1]
    assert joined.stdout.strip() == str(log) and log.name.startswith("stderr-") and log.is_file()
    assert str(log) in joined.stderr
    assert not list(double.path.glob(".stderr-*"))  # renamed to the agent's pid once it started
    refused = widen("join", double.id, env_home=double.path.parent)
    assert refused.returncode == 1 and f"run {double.id} is done — nothing to join" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_run_resumed_on_two_machines_finishes_like_a_straight_run(two_machines, tmp_path, tiny_plan):
    """Cancelled on one process, resumed on two machines: `widen join` continues from the
    checkpoint too (it reads from the status that the run was started as a resume)."""
    single = two_machines[0]
    root = tmp_path / "runs"
    run = create_run(load_plan(tiny_plan), tiny_plan, root)
    run_until_cancelled(Trainer(run.path), lambda kind, e: kind == "step" and e["stage"] == 1 and e["step"] == 2)
    assert run.status()["state"] == "cancelled"
    out = widen("resume", run.id, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", env_home=root,
                check=True)
    assert f"widen join {run.id}" in out.stderr and f"{run.path} --resume" in out.stderr
    assert run.status()["resume"] is True
    widen("join", run.id, "--detach", env_home=root, check=True)
    assert wait_for(run, timeout=120) == "done", run.status()
    events = read_all(run.events)
    assert [e.world_size for e in events if e.type == "start"][-1] == 2
    assert any(e.type == "resume" for e in events)
    for a, b in zip(single.results()["matrix"]["loss"], run.results()["matrix"]["loss"]):
        assert b == pytest.approx(a, rel=1e-4)


def test_the_command_on_several_machines(tmp_path, tiny_plan):
    plan = load_plan(tiny_plan, ["train.batch_size=12", "train.distributed.nproc=2", "train.distributed.nnodes=3",
                                 'train.distributed.rdzv_endpoint="node0:29500"'])
    run = create_run(plan, tiny_plan, tmp_path / "runs")
    args = worker_command(run, resume=True)
    assert args[1:] == ["-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=2", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=node0:29500", f"--rdzv-id={run.id}", "-m", "engine.train.worker",
                        str(run.path), "--resume"]
    join, torchrun = launcher.join_lines(run)
    assert join == f"widen join {run.id}" and torchrun.startswith("python -m torch.distributed.run --nnodes=3")
    # one machine stays as it was
    single = create_run(load_plan(tiny_plan, ["train.distributed.nproc=2"]), tiny_plan, tmp_path / "runs")
    assert worker_command(single)[3:5] == ["--standalone", "--nproc_per_node=2"]


def test_an_endpoint_override_is_a_string(tmp_path, tiny_plan):
    """What `--rdzv-endpoint` becomes: a quoted TOML string (an IPv6 [::1]:29500 is no TOML array)."""
    from widen_tui.launcher import distributed_overrides

    for endpoint in ("127.0.0.1:29500", "[::1]:29500", "node0:29500"):
        overrides = distributed_overrides(None, 2, endpoint)
        assert overrides == ["train.distributed.nnodes=2", f'train.distributed.rdzv_endpoint="{endpoint}"']
        assert load_plan(tiny_plan, overrides).train.distributed.rdzv_endpoint == endpoint


def test_a_resume_may_change_processes_machines_and_strategy(tmp_path, tiny_plan):
    run = create_run(load_plan(tiny_plan), tiny_plan, tmp_path / "runs")
    launcher._apply_resume_overrides(run, ["train.distributed.nnodes=2", "train.distributed.nproc=2",
                                           'train.distributed.rdzv_endpoint="10.0.0.1:29500"',
                                           'train.distributed.strategy="fsdp"'])
    spec = load_plan(run.plan).train.distributed
    assert (spec.nnodes, spec.nproc, spec.rdzv_endpoint, spec.strategy) == (2, 2, "10.0.0.1:29500", "fsdp")
    with pytest.raises(PlanError) as refused:
        launcher._apply_resume_overrides(run, ["model.source=builtin:tiny-llama"])
    assert "train.distributed.nnodes" in str(refused.value) and "train.distributed.strategy" in str(refused.value)


def test_join_of_a_run_on_one_machine_is_refused(tmp_path, tiny_plan):
    root = tmp_path / "runs"
    run = create_run(load_plan(tiny_plan), tiny_plan, root)
    out = widen("join", run.id, env_home=root)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "trains on one machine (train.distributed.nnodes is 1) — nothing to join" in out.stderr
    assert not list(run.path.glob("*stderr-*")) and not run.status_json.exists()


def test_several_machines_need_a_rendezvous_endpoint(tmp_path, tiny_plan):
    root = tmp_path / "runs"
    out = widen("plan", "check", str(tiny_plan), "--set", "train.distributed.nnodes=2", env_home=root)
    assert out.returncode == 1 and "train.distributed.rdzv_endpoint" in out.stderr and "--rdzv-endpoint" in out.stderr
    out = widen("run", str(tiny_plan), "--nnodes", "2", "--detach", env_home=root)
    assert out.returncode == 1 and "train.distributed.rdzv_endpoint" in out.stderr
    assert not root.exists() or not [p for p in root.iterdir() if p.is_dir()]  # no run made
    out = widen("run", str(tiny_plan), "--nnodes", "2", "--rdzv-endpoint", "node0", env_home=root)
    assert out.returncode == 1 and "is not host:port" in out.stderr


def test_a_group_on_several_machines_is_refused(tmp_path, tiny_plan):
    root = tmp_path / "runs"
    out = widen("run", str(tiny_plan), "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500", "--seeds", "0,1",
                "--detach", env_home=root)
    assert out.returncode == 1 and "runs as one run" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not root.exists() or not [p for p in root.iterdir() if p.is_dir()]


def test_cancel_before_every_machine_joined(tmp_path, tiny_plan):
    """No rank exists yet to record the ending: cancel stops this machine's torchrun and records it."""
    root = tmp_path / "runs"
    out = widen("run", str(tiny_plan), "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--detach",
                env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    status = run.status()
    assert status["state"] == "queued" and status["rendezvous"] and status["resume"] is False
    out = widen("cancel", run.id, env_home=root, check=True)
    assert "cancelled before every machine had joined" in out.stdout
    assert run.status()["state"] == "cancelled"
    import psutil

    deadline = time.time() + 30
    while psutil.pid_exists(status["pid"]) and psutil.Process(status["pid"]).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the first machine's torchrun is still there"
        time.sleep(0.1)
    refused = widen("join", run.id, env_home=root)
    assert refused.returncode == 1 and f"is cancelled — `widen resume {run.id}` on the first machine" in refused.stderr
