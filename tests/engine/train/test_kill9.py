"""kill -9 at any point after the first checkpoint: the resumed run ends with exactly the figures
of a run that was never interrupted, and nothing an interrupted save left survives the resume."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.runs.events import read_all
from engine.runs.rundir import RunDir
from tests.conftest import wait_for, widen

pytestmark = pytest.mark.slow

SETTINGS = ["--set", "stages.0.steps=12", "--set", "stages.1.steps=12", "--set", "train.checkpoint_interval=1",
            "--set", "train.eval_interval=0"]


def start(tiny_plan, home) -> RunDir:
    out = widen("run", str(tiny_plan), "--detach", *SETTINGS, env_home=home, check=True)
    return RunDir(home / out.stdout.strip())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> RunDir:
    """The uninterrupted run, through the same detached worker."""
    from conftest import TINY_PLAN

    home = tmp_path_factory.mktemp("straight")
    plan = home / "tiny.toml"
    plan.write_text(TINY_PLAN)
    run = start(plan, home / "runs")
    assert wait_for(run, ("done", "failed")) == "done"
    return run


@pytest.mark.parametrize("kill_after_checkpoints", [2, 15])
def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_plan, widen_home, straight, kill_after_checkpoints):
    killed = start(tiny_plan, widen_home)
    deadline = time.time() + 120
    while sum(e.type == "checkpoint" for e in read_all(killed.events)) < kill_after_checkpoints:
        assert time.time() < deadline and killed.status()["state"] in ("queued", "running")
        time.sleep(0.01)
    os.kill(int(killed.status()["pid"]), signal.SIGKILL)  # mid-step or mid-save: whatever it was doing
    assert wait_for(killed, ("lost",), timeout=20) == "lost"

    widen("resume", killed.id, env_home=widen_home, check=True)
    assert wait_for(killed, ("done", "failed")) == "done", killed.status()
    assert killed.results()["matrix"] == straight.results()["matrix"]
    assert sorted(p.name for p in killed.checkpoints.iterdir()) == ["latest"]
    resume = [e for e in read_all(killed.events) if e.type == "resume"]
    assert len(resume) == 1 and resume[0].global_step >= kill_after_checkpoints - 1
