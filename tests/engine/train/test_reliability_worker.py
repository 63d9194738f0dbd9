"""What a run promises when things go wrong on the worker's side (docs/reliability.md):
no code runs from run files, divergence and full disks end in a recorded state with the last
good checkpoint kept, one worker per run, leftovers of interrupted saves are cleaned up, and a
resume says where it continues from."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.plan import load_plan
from engine.runs.events import latest_segment, read_all
from engine.runs.rundir import RunDir
from engine.train import checkpoint
from engine.train.session import run as run_engine
from tests.conftest import ROOT, wait_for, widen
from widen_tui.launcher import create_run, create_runs

pytestmark = pytest.mark.slow

# Two short stages: the first with its own (sane) learning rate, so `--set train.lr=1e4` makes
# only the second diverge, after the first stage's checkpoint.
PLAN = textwrap.dedent("""
    name = "reliable"
    seed = 1
    [model]
    source = "builtin:tiny-neo"
    [tasks.prose]
    source = "builtin:pydoc"
    max_docs = 30
    [train]
    batch_size = 2
    seq_len = 16
    lr = 1e-3
    eval_interval = 0
    eval_batches = 1
    log_interval = 1
    device = "cpu"
    [[stages]]
    task = "prose"
    steps = 3
    lr = 1e-3
    [[stages]]
    task = "prose"
    steps = 6
""")

VARIANTS = PLAN + textwrap.dedent("""
    [[variants]]
    name = "a"
    [[variants.stages]]
    task = "prose"
    steps = 1
    [[variants]]
    name = "b"
    [[variants.stages]]
    task = "prose"
    steps = 1
""")


class Payload:
    """Unpickling this touches `marker`: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_plan(tmp_path: Path, text: str = PLAN, name: str = "plan.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def finished_run(tmp_path: Path, root: Path, overrides: list[str] | None = None) -> RunDir:
    run = create_run(load_plan(write_plan(tmp_path), overrides or []), None, root=root)
    run_engine(run.path)
    return run


def plant(path: Path, marker: Path) -> None:
    torch.save(Payload(marker), path)  # a torch.load(weights_only=False) of this runs the command


# -- 1. no code runs from run files ---------------------------------------------------------------


def test_a_planted_pickle_never_runs_on_resume_export_or_a_cached_variant(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("WIDEN_HOME", str(root))
    marker = tmp_path / "PWNED"

    # resume: a legacy trainer.pt planted beside a good checkpoint is never read
    run = finished_run(tmp_path, root)
    latest = run.checkpoints / "latest"
    plant(latest / "trainer.pt", marker)
    status = json.loads(run.status_json.read_text())
    run.status_json.write_text(json.dumps({**status, "state": "cancelled"}))
    assert run_engine(run.path, resume=True) == 0
    assert run.status()["state"] == "done" and not marker.exists()

    # export through the CLI: the same checkpoint exports; then every file replaced by the payload
    out = widen("export", run.id, str(tmp_path / "out"), env_home=root)
    assert out.returncode == 0, out.stderr
    files = [p for p in latest.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "state.safetensors", "trainer.json", "trainer.pt"}
    for path in files:
        plant(path, marker)
    for verb in (["export", run.id, str(tmp_path / "out2")], ["resume", run.id]):
        if verb[0] == "resume":
            status = json.loads(run.status_json.read_text())
            run.status_json.write_text(json.dumps({**status, "state": "cancelled"}))
        proc = widen(*verb, env_home=root)
        if verb[0] == "resume":  # the worker starts, fails on the damaged checkpoint, says so
            wait_for(run, timeout=60)
            status = run.status()
            assert status["state"] == "failed" and "damaged" in status["error"], status
            assert len(status["error"].splitlines()) == 1
        else:
            assert proc.returncode == 1 and "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()

    # a planted prefix-cache entry: a plain variant run loads it as a checkpoint, never unpickles
    plan_path = write_plan(tmp_path, VARIANTS, "variants.toml")
    first, second = create_runs(load_plan(plan_path), plan_path, root=root)
    assert run_engine(first.path) == 0
    entries = list((root / ".cache" / "prefix").iterdir())
    assert len(entries) == 1
    for path in entries[0].glob("*.safetensors"):
        plant(path, marker)
    plant(entries[0] / "trainer.pt", marker)
    assert run_engine(second.path) == 1
    status = second.status()
    assert status["state"] == "failed" and "damaged" in status["error"]
    assert not marker.exists()


# -- 5. divergence --------------------------------------------------------------------------------


def test_divergence_ends_diverged_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(tmp_path):
    root = tmp_path / "runs"
    run = finished_run(tmp_path, root, ["train.lr=1e4"])
    status = run.status()
    assert status["state"] == "diverged", status
    assert "stage 1 step" in status["error"] and "train.lr" in status["error"]
    assert len(status["error"].splitlines()) == 1
    # the checkpoint is the one from the end of stage 0, and finite
    state = checkpoint.load_state(run.checkpoints / "latest")
    assert (state.position.stage, state.position.step) == (1, 0)
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(run.checkpoints / "latest" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    # results.json is strict JSON (no NaN literals) and says diverged
    results = json.loads(run.results_json.read_text(), parse_constant=pytest.fail)
    assert results["state"] == "diverged"
    events = read_all(run.events)
    assert events[-1].type == "status" and events[-1].state == "diverged"

    # resume with a lower learning rate: continues from stage 1 and finishes
    proc = widen("resume", run.id, "--set", "train.lr=1e-3", env_home=root)
    assert proc.returncode == 0, proc.stderr
    assert wait_for(run, timeout=90) == "done", run.status()
    assert load_plan(run.plan).train.lr == 1e-3
    resumed = [e for e in read_all(run.events) if e.type == "resume"]
    assert resumed and (resumed[-1].stage, resumed[-1].step) == (1, 0)
    final = json.loads(run.results_json.read_text(), parse_constant=pytest.fail)
    assert all(math.isfinite(v) for v in final["summary"]["final_ppl"].values())


def test_a_resume_may_change_only_what_the_checkpoint_does_not_depend_on(tmp_path):
    root = tmp_path / "runs"
    run = finished_run(tmp_path, root, ["train.lr=1e4"])
    proc = widen("resume", run.id, "--set", "train.seq_len=64", env_home=root)
    assert proc.returncode == 1 and "train.seq_len" in proc.stderr and "Traceback" not in proc.stderr
    assert run.status()["state"] == "diverged"  # nothing started, nothing changed
    assert load_plan(run.plan).train.seq_len == 16


# -- 6. a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MiB tmpfs: room for the run's files and corpus cache, not for them and a checkpoint
    (3.6 MB of tiny-neo weights at a stage end)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_recorded_cleaned_up_and_listing_still_works(tmp_path, small_tmpfs, monkeypatch):
    root = small_tmpfs / "runs"
    monkeypatch.setenv("WIDEN_HOME", str(root))
    run = create_run(load_plan(write_plan(tmp_path)), None, root=root)
    code = run_engine(run.path)
    assert code == 1
    status = run.status()
    assert status["state"] == "failed", status
    assert "No space left on device" in status["error"] and len(status["error"].splitlines()) == 1
    assert not list(run.checkpoints.glob(".tmp-*")), "the partial checkpoint must be removed"
    for verb in (["runs"], ["runs", "--json"], ["show", run.id], ["db", "rebuild"]):
        proc = widen(*verb, env_home=root)
        assert "Traceback" not in proc.stderr and "OSError" not in proc.stderr, (verb, proc.stderr)
        assert proc.returncode == 0 or len(proc.stderr.strip().splitlines()) == 1, (verb, proc.stderr)
    listed = widen("runs", "--json", env_home=root)
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["state"] == "failed"


# -- 7. one worker per run ------------------------------------------------------------------------


def test_a_second_worker_on_a_run_is_refused_before_it_touches_anything(tmp_path):
    from filelock import FileLock

    from engine.errors import RunStateError
    from engine.train.worker import BUSY_EXIT, LOCK_FILE
    from widen_tui.launcher import start_worker

    root = tmp_path / "runs"
    run = create_run(load_plan(write_plan(tmp_path)), None, root=root)
    before = run.status_json.read_bytes() if run.status_json.exists() else None
    with FileLock(run.path / LOCK_FILE):
        proc = subprocess.run([sys.executable, "-m", "engine.train.worker", str(run.path)], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == BUSY_EXIT and "already has a worker" in proc.stderr
        with pytest.raises(RunStateError, match="already has a worker"):
            start_worker(run)
    after = run.status_json.read_bytes() if run.status_json.exists() else None
    assert before == after and not run.events.exists()


def test_two_resumes_at_once_start_one_worker(tmp_path):
    root = tmp_path / "runs"
    run = create_run(load_plan(write_plan(tmp_path), ["stages.1.steps=400"]), None, root=root)
    assert widen("resume", "--help", env_home=root).returncode == 0
    # a cancelled run with a checkpoint, as `widen cancel` leaves it
    run_engine(run.path)  # finishes; mark it cancelled to be resumable (its checkpoint is the last stage's)
    status = json.loads(run.status_json.read_text())
    run.status_json.write_text(json.dumps({**status, "state": "cancelled"}))
    env = dict(os.environ, WIDEN_HOME=str(root))
    procs = [subprocess.Popen([sys.executable, "-m", "widen_tui.cli", "resume", run.id], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    started = [err for code, err in outcomes if code == 0]
    refused = [err for code, err in outcomes if code != 0]
    assert len(started) == 1 and len(refused) == 1, outcomes
    assert len(refused[0].strip().splitlines()) == 1 and "Traceback" not in refused[0]
    assert "already has a worker" in refused[0] or "still" in refused[0]
    widen("cancel", run.id, env_home=root)
    wait_for(run, timeout=60)
    # one worker trained after the resume: no step twice in the segment it wrote
    steps = [(e.stage, e.step) for e in latest_segment(read_all(run.events)) if e.type == "step"]
    assert len(steps) == len(set(steps))
    resumes = [e for e in read_all(run.events) if e.type == "resume"]
    assert len(resumes) == 1


# -- 8. leftovers of interrupted checkpoint writes ------------------------------------------------


def test_leftover_temporary_checkpoints_are_removed_at_start(tmp_path):
    root = tmp_path / "runs"
    run = finished_run(tmp_path, root)
    junk = run.checkpoints / ".tmp-424242"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\0" * 1024)
    (run.checkpoints / ".cache-77").mkdir()
    status = json.loads(run.status_json.read_text())
    run.status_json.write_text(json.dumps({**status, "state": "lost"}))
    assert run_engine(run.path, resume=True) == 0
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest"]


def test_a_swap_killed_half_way_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "runs"
    run = finished_run(tmp_path, root)
    (run.checkpoints / "latest").rename(run.checkpoints / ".old")  # killed between the two renames
    assert checkpoint.remove_leftovers(run.checkpoints) == []
    assert checkpoint.exists(run.checkpoints / "latest")


# -- errors from inside the engine ----------------------------------------------------------------


def test_an_unexpected_engine_error_is_one_line_with_stage_and_step(tmp_path, monkeypatch, capsys):
    import engine.train.loop as train  # the loop calls its own task_train_batch

    root = tmp_path / "runs"
    run = create_run(load_plan(write_plan(tmp_path)), None, root=root)
    real = train.task_train_batch

    def flaky(data, spec, seed, stage, step):
        if stage == 1 and step == 2:
            raise RuntimeError("boom\nsecond line")
        return real(data, spec, seed, stage, step)

    monkeypatch.setattr(train, "task_train_batch", flaky)
    assert run_engine(run.path) == 1
    status = run.status()
    assert status["state"] == "failed"
    assert status["error"] == "stage 1 step 2: RuntimeError: boom"
    assert "Traceback" in capsys.readouterr().err  # the worker's stderr is stderr.log


# -- 4. modes follow the umask --------------------------------------------------------------------


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        run = finished_run(tmp_path, tmp_path / "runs")
    finally:
        os.umask(old)
    latest = run.checkpoints / "latest"
    assert latest.stat().st_mode & 0o777 == 0o775
    for path in latest.iterdir():
        assert path.stat().st_mode & 0o777 == 0o664, path
    for name in ("status.json", "results.json", "run.json"):
        assert (run.path / name).stat().st_mode & 0o777 == 0o664, name


# -- 2. names never become paths outside the run --------------------------------------------------


def test_a_traversal_task_name_in_a_run_plan_writes_nothing_outside(tmp_path):
    """plan check refuses the name (tests/engine/plan/test_plan_bounds.py); a plan.toml edited inside a run
    dir skips that check, and the worker still writes nothing outside the run directory."""
    root = tmp_path / "a" / "b" / "c" / "runs"
    plan = load_plan(write_plan(tmp_path), ["stages.1.steps=1"])
    run = create_run(plan, None, root=root)
    evil = "../../../../../../x"
    text = run.plan.read_text().replace('[tasks.prose]', f'[tasks."{evil}"]').replace('task = "prose"',
                                                                                        f'task = "{evil}"')
    run.plan.write_text(text.replace("task_modules = false", "") + "\ntask_modules = true\n"
                        if "task_modules" not in text else text)
    assert run_engine(run.path) == 1
    status = run.status()
    assert status["state"] == "failed" and len(status["error"].splitlines()) == 1
    assert not list(tmp_path.rglob("x.safetensors")) and not Path("/x.safetensors").exists()


def test_checkpoint_task_files_stay_inside_the_checkpoint(tmp_path):
    from engine.errors import UnsafeName

    model = torch.nn.Linear(2, 2)
    with pytest.raises(UnsafeName):
        checkpoint.save(tmp_path / "latest", model, checkpoint.TrainerState(),
                        {"../../x": {"w": torch.zeros(1)}})
    assert not (tmp_path.parent / "x.safetensors").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", [
    lambda doc: doc["position"].update(stage=-1),
    lambda doc: doc["history"]["growths"].append({"stage": "0"}),
    lambda doc: doc["history"].update(matrix="rows"),
    lambda doc: doc.update(optimizer={"state": {"x": {}}, "param_groups": []}),
    lambda doc: doc.update(format=1),
    lambda doc: doc["rng"].pop("numpy"),
])
def test_a_damaged_trainer_json_is_one_checkpoint_error(tmp_path, damage):
    run = finished_run(tmp_path, tmp_path / "runs")
    path = run.checkpoints / "latest" / "trainer.json"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load_state(run.checkpoints / "latest")
