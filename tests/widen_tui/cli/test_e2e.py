"""End to end: the real CLI and worker subprocess on a tiny plan; cancel, resume, kill -9."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from engine.plan import load_plan
from engine.runs.events import read_all
from engine.runs.records import GenericEvent
from engine.runs.rundir import RunDir
from engine.train.loop import Trainer
from tests.conftest import run_until_cancelled, wait_for, widen
from widen_tui.launcher import create_run

pytestmark = pytest.mark.slow




def test_detached_run_through_the_cli(tiny_plan, widen_home):
    t0 = time.time()
    out = widen("run", str(tiny_plan), "--detach", env_home=widen_home, check=True)
    assert time.time() - t0 < 5
    run_id = out.stdout.strip()
    run = RunDir(widen_home / run_id)
    assert wait_for(run, ("done", "failed", "lost")) == "done", run.stderr.read_text()[-2000:]

    listed = json.loads(widen("runs", "--json", env_home=widen_home, check=True).stdout)
    assert [r["id"] for r in listed] == [run_id] and listed[0]["state"] == "done"
    shown = json.loads(widen("show", run_id[:12], "--json", env_home=widen_home, check=True).stdout)
    results = shown["results"]
    assert results["matrix"]["rows"] == ["initial", "after 1:prose", "after 2:python"]
    assert len(results["matrix"]["ppl"]) == 3 and len(results["matrix"]["ppl"][0]) == 2
    assert results["forgetting"]["loss"]["prose"]["definition"].startswith("max-based")
    assert results["forgetting"]["loss"]["python"] is None
    (report,) = results["expansions"]
    assert report["op"] == "widen_ffn" and report["max_abs_logit_delta"] <= 1e-4
    assert report["params_added"] == 4 * 16 * (2 * 128 + 1)
    stage2 = results["stages"][1]
    assert stage2["trainable"] == report["params_added"] and stage2["total"] == report["params_after"]

    events = read_all(run.events)
    assert [e for e in events if isinstance(e, GenericEvent)] == []  # every event of a known type
    kinds = [e.type for e in events]
    begun = kinds.index("start")  # before it (it needs the model) only loading and tokenizing reports
    assert set(kinds[:begun]) == {"progress"} and kinds[-1] == "status" and events[-1].state == "done"
    for kind in ("stage", "step", "eval", "expand", "system", "checkpoint"):
        assert kind in kinds, kind
    evals = [e for e in events if e.type == "eval"]
    assert {e.task for e in evals if e.stage == -1} == {"prose", "python"}
    assert (run.checkpoints / "latest" / "model.safetensors").exists()

    text = widen("show", run_id, env_home=widen_home, check=True).stdout
    assert "forgetting" in text and "widen_ffn" in text
    logs = widen("logs", run_id, env_home=widen_home, check=True).stdout
    assert "expand widen_ffn" in logs and "status done" in logs


def test_resume_continues_exactly(tiny_plan, widen_home):
    """Cancel in stage 2 (after the expansion), resume: same figures as an uninterrupted run."""
    overrides = ["stages.1.steps=8"]
    plan = load_plan(tiny_plan, overrides)
    straight = create_run(plan, tiny_plan, widen_home)
    Trainer(straight.path).run_plan()

    interrupted = create_run(plan, tiny_plan, widen_home)
    run_until_cancelled(Trainer(interrupted.path),
                        lambda kind, e: kind == "step" and e["stage"] == 1 and e["step"] == 3)
    assert interrupted.status()["state"] == "cancelled"
    Trainer(interrupted.path, resume=True).run_plan()

    a, b = straight.results(), interrupted.results()
    assert b["state"] == "done"
    assert a["matrix"] == b["matrix"]
    assert a["expansions"] == [{**r, "stage": r["stage"]} for r in b["expansions"]]
    def losses(run):
        return [(e.stage, e.step, e.loss) for e in read_all(run.events) if e.type == "step"]

    resumed_steps = losses(interrupted)
    assert resumed_steps[-1] == losses(straight)[-1]
    assert any(e.type == "start" and e.resumed for e in read_all(interrupted.events))


def test_cancel_then_resume_through_the_cli(tiny_plan, widen_home):
    out = widen("run", str(tiny_plan), "--detach", "--set", "stages.0.steps=400", env_home=widen_home, check=True)
    run = RunDir(widen_home / out.stdout.strip())
    deadline = time.time() + 90
    while not any(e.type == "step" for e in read_all(run.events)):
        assert time.time() < deadline, run.stderr.read_text()[-1500:]
        time.sleep(0.3)
    assert "cancel requested" in widen("cancel", run.id, env_home=widen_home, check=True).stdout
    assert wait_for(run, ("cancelled", "failed", "done")) == "cancelled"
    assert any(e.type == "checkpoint" and e.reason == "cancel" for e in read_all(run.events))
    assert run.results()["state"] == "cancelled"

    widen("resume", run.id, env_home=widen_home, check=True)
    deadline = time.time() + 20
    while run.status()["state"] == "cancelled" and time.time() < deadline:
        time.sleep(0.2)
    widen("cancel", run.id, env_home=widen_home, check=True)  # stop it again: no need to finish 400 steps
    assert wait_for(run, ("cancelled", "failed", "done")) == "cancelled"
    starts = [e for e in read_all(run.events) if e.type == "start"]
    assert [s.resumed for s in starts] == [False, True]


def test_killed_worker_shows_as_lost(tiny_plan, widen_home):
    out = widen("run", str(tiny_plan), "--detach", "--set", "stages.0.steps=400", env_home=widen_home, check=True)
    run = RunDir(widen_home / out.stdout.strip())
    assert wait_for(run, ("running",), timeout=60) == "running"
    os.kill(run.status()["pid"], signal.SIGKILL)
    assert wait_for(run, ("lost",), timeout=10) == "lost"
    listed = json.loads(widen("runs", "--json", env_home=widen_home, check=True).stdout)
    assert listed[0]["state"] == "lost"


def test_failure_is_one_clear_line(tiny_plan, widen_home, tmp_path):
    """A missing task source is refused before any run starts (the check `widen run` makes)."""
    out = widen("run", str(tiny_plan), "--set", f"tasks.python.source={tmp_path}/absent-dir",
                env_home=widen_home)
    assert out.returncode == 1
    assert f"{tmp_path}/absent-dir" in out.stderr and "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1
    assert json.loads(widen("runs", "--json", env_home=widen_home, check=True).stdout) == []


def test_a_data_failure_inside_the_worker_is_one_clear_line(tiny_plan, widen_home, tmp_path):
    """What the check cannot see (here: the file vanishes after the check) fails the run in one line."""
    source = tmp_path / "notes.txt"
    source.write_text("some text " * 50)
    out = widen("run", str(tiny_plan), "--detach", "--set", f"tasks.python.source=\"{source}\"",
                env_home=widen_home, check=True)
    source.unlink()
    run = RunDir(widen_home / out.stdout.strip())
    assert wait_for(run, ("failed", "done"), timeout=90) == "failed"
    error = run.status()["error"]
    assert "notes.txt" in error and len(error.splitlines()) == 1


def test_local_model_directory_uses_the_hub_code_path(tiny_plan, widen_home, tmp_path):
    """A local directory goes through from_pretrained exactly as a hub name would."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.plan import validate_file

    torch.manual_seed(0)
    source = tmp_path / "gpt2-local"
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(source)
    overrides = [f"model.source={source}", "stages.0.steps=2", "stages.1.steps=2", "train.eval_interval=0"]
    plan, problems = validate_file(tiny_plan, overrides + ["stages.1.expand.0.layers=[2]"])
    assert [str(p) for p in problems] == [
        'stages.1.expand.0.layers: layer 2 out of range — the model has 2 layers at this point (0..1); '
        'use those indices or "all"']
    run = create_run(load_plan(tiny_plan, overrides), tiny_plan, widen_home)
    Trainer(run.path).run_plan()
    results = run.results()
    assert results["state"] == "done"
    assert results["expansions"][0]["max_abs_logit_delta"] <= 1e-4
    assert results["expansions"][0]["params_added"] == 2 * 16 * (2 * 32 + 1)


def test_unsupported_architecture_is_named(tiny_plan, tmp_path):
    from transformers import BertConfig

    from engine.plan import validate_file

    source = tmp_path / "bert"
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(source)
    _, problems = validate_file(tiny_plan, [f"model.source={source}"])
    assert len(problems) == 1
    assert str(problems[0]).startswith("model.source: model type 'bert' is not supported — supported: gpt_neo")


def test_worker_that_dies_at_start_is_lost_at_once(widen_home, tiny_plan, monkeypatch):
    """No status from the worker yet: the pid noted at launch still tells that it died."""
    import widen_tui.launcher as launcher

    run = create_run(load_plan(tiny_plan), tiny_plan, widen_home)
    monkeypatch.setattr(launcher.sys, "executable", "/bin/false")
    launcher.start_worker(run)
    assert wait_for(run, ("lost",), timeout=10) == "lost"
