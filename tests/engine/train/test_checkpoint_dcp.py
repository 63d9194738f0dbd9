"""Sharded (DCP) checkpoints: what an FSDP run writes (every rank its own shards, nothing gathered),
loaded without unrestricted pickle into any model — whole or sharded, one process, DDP or FSDP —
so a resume may change the number of processes and the strategy; kill -9 of a rank in the
middle of a sharded save leaves the previous checkpoint as `latest`.

The unit tests write DCP checkpoints in one process (DCP needs no process group); the torchrun
ones (marked slow) run 2 CPU processes on gloo."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine.train import checkpoint, prefix_cache
from engine.train.checkpoint import CheckpointError
from engine.train.distributed import World

ROOT = Path(__file__).resolve().parents[3]


def tiny_model(seed: int = 0, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 4))
    return model


def trained(model: torch.nn.Module, steps: int = 2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def sharded_checkpoint(directory: Path, model: torch.nn.Module, optimizer=None) -> Path:
    """A sharded checkpoint as a one-process world writes it (plain tensors: DCP needs no group)."""
    moments = checkpoint.sharded_moments(model, optimizer) if optimizer is not None else None
    state = checkpoint.TrainerState(optimizer=moments, rng=checkpoint.capture_rng())
    return checkpoint.save_sharded(directory, World(), checkpoint.sharded_weights(model), state,
                                   {"prose": {"w": torch.ones(2)}})


# ---------------------------------------------------------------------------------------------
# one process


def test_a_sharded_checkpoint_loads_into_a_whole_model_and_optimizer(tmp_path):
    model = tiny_model()
    optimizer = trained(model)
    latest = sharded_checkpoint(tmp_path / "checkpoints" / "latest", model, optimizer)
    assert sorted(p.name for p in (latest / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    assert not (latest / checkpoint.WEIGHTS_FILE).exists() and checkpoint.exists(latest)
    assert sorted(p.name for p in latest.iterdir()) == ["dcp", "state.safetensors", "tasks", "trainer.json"]
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest"]  # the temporary one is swapped in
    doc = json.loads((latest / "trainer.json").read_text())
    assert doc["optimizer"]["dcp"] is True and "0.weight" in doc["optimizer"]["state"]

    copy = tiny_model(seed=1)
    checkpoint.load_weights(copy, latest)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))
    state = checkpoint.load_state(latest)
    assert isinstance(state.optimizer, checkpoint.ShardedMoments) and state.optimizer.directory == latest / "dcp"
    fresh = torch.optim.AdamW(copy.parameters(), lr=1e-2)
    checkpoint.load_sharded_moments(copy, fresh, state.optimizer)
    for p, q in zip(model.parameters(), copy.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, fresh.state[q][key]), key
    # and both go on alike
    torch.manual_seed(5)
    batch = torch.randn(3, 4)
    for m, o in ((model, optimizer), (copy, fresh)):
        m(batch).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))


def test_an_optimizer_without_state_is_saved_without_state(tmp_path):
    """No zero-gradient step to make one up (get_optimizer_state_dict would): a cancel before a
    stage's first step resumes as if nothing had been saved."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    latest = sharded_checkpoint(tmp_path / "latest", model, optimizer)
    assert not optimizer.state
    state = checkpoint.load_state(latest)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    checkpoint.load_sharded_moments(model, fresh, state.optimizer)
    assert not fresh.state and fresh.param_groups[0]["lr"] == 1e-2


def test_a_sharded_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    latest = sharded_checkpoint(tmp_path / "latest", tiny_model())
    with pytest.raises(CheckpointError, match="does not fit") as error:
        checkpoint.load_weights(tiny_model(width=16), latest)
    assert len(str(error.value).splitlines()) == 1 and str(latest / "dcp") in str(error.value)
    with pytest.raises(CheckpointError, match="lacks"):  # an entry the rebuilt model has not
        checkpoint.load_weights(torch.nn.Sequential(torch.nn.Linear(4, 8)), latest)


def test_the_prefix_cache_copies_the_dcp_folder_and_only_its_files(tmp_path):
    model = tiny_model()
    latest = sharded_checkpoint(tmp_path / "run" / "checkpoints" / "latest", model, trained(model))
    (latest / "dcp" / "planted.py").write_text("print('no')")
    os.symlink(latest / "trainer.json", latest / "dcp" / "__9_0.distcp")
    root = tmp_path / "runs"
    prefix_cache.publish(root, "k", latest, [], {"run": "r"})
    entry = prefix_cache.lookup(root, "k")
    assert entry is not None
    assert sorted(p.name for p in (entry / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    target = tmp_path / "other" / "checkpoints" / "latest"
    target.parent.mkdir(parents=True)
    prefix_cache.restore(entry, target)
    copy = tiny_model(seed=1)
    checkpoint.load_weights(copy, target)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))
    assert checkpoint.load_state(target).optimizer.directory == target / "dcp"


class _Planted:
    """Runs `touch MARKER` when unpickled (if ever)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_global_in_the_dcp_metadata_is_refused_and_never_runs(tmp_path):
    latest = sharded_checkpoint(tmp_path / "latest", tiny_model())
    marker = tmp_path / "ran"
    metadata = latest / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Planted(marker)))
    for load in (lambda: checkpoint.load_weights(tiny_model(), latest),
                 lambda: checkpoint.read_dcp_metadata(latest / "dcp")):
        with pytest.raises(CheckpointError, match="refused") as error:
            load()
        message = str(error.value)
        assert len(message.splitlines()) == 1 and str(metadata) in message and "system" in message
    assert not marker.exists()
    # hidden inside real metadata: the same
    original = pickle.loads(pickle.dumps(checkpoint.read_dcp_metadata(
        sharded_checkpoint(tmp_path / "again", tiny_model()) / "dcp")))
    original.planner_data = _Planted(marker)
    (tmp_path / "again" / "dcp" / ".metadata").write_bytes(pickle.dumps(original))
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load_weights(tiny_model(), tmp_path / "again")
    assert not marker.exists()


def test_dcp_metadata_cannot_change_torch_through_an_allowed_global(tmp_path):
    """BUILD on an allowed function or class would set its attributes (torch's global state):
    only instances of DCP's metadata classes may be built."""
    import torch.serialization

    latest = sharded_checkpoint(tmp_path / "latest", tiny_model())
    # _get_layout.__dict__.update({"cache": {"x": 1}}), then the layout cache would be poisoned
    poison = (b"\x80\x02ctorch.serialization\n_get_layout\n}X\x05\x00\x00\x00cache}X\x01\x00\x00\x00x"
              b"K\x01ssb.")
    (latest / "dcp" / ".metadata").write_bytes(poison)
    with pytest.raises(CheckpointError, match="refused.*function"):
        checkpoint.load_weights(tiny_model(), latest)
    assert "x" not in torch.serialization._get_layout.cache


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not metadata", "bytes entry",
                                    "outside path", "transformed", "shard truncated", "shard missing",
                                    "planted shard"])
def test_a_damaged_dcp_checkpoint_is_one_checkpoint_error(tmp_path, damage):
    import torch.distributed.checkpoint as dcp

    model = tiny_model()
    latest = sharded_checkpoint(tmp_path / "latest", model)
    metadata_path = latest / "dcp" / ".metadata"
    shard = latest / "dcp" / "__0_0.distcp"
    metadata = checkpoint.read_dcp_metadata(latest / "dcp")
    if damage == "truncated":
        metadata_path.write_bytes(metadata_path.read_bytes()[:200])
    elif damage == "empty":
        metadata_path.write_bytes(b"")
    elif damage == "garbage":
        metadata_path.write_bytes(os.urandom(500))
    elif damage == "not metadata":
        metadata_path.write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    elif damage == "bytes entry":  # DCP reads a bytes entry with torch.load(weights_only=False)
        other = tmp_path / "bytes"
        dcp.save({"model.x": torch.ones(1), "extra": {"a": 1}}, storage_writer=dcp.FileSystemWriter(other))
        shutil.rmtree(latest / "dcp")
        shutil.copytree(other, latest / "dcp")
    elif damage == "outside path":
        for info in metadata.storage_data.values():
            info.relative_path = "../trainer.json"
        metadata_path.write_bytes(pickle.dumps(metadata))
    elif damage == "transformed":
        for info in metadata.storage_data.values():
            info.transform_descriptors = ["zstd/1"]
        metadata_path.write_bytes(pickle.dumps(metadata))
    elif damage == "shard truncated":
        shard.write_bytes(shard.read_bytes()[:300])
    elif damage == "shard missing":
        shard.unlink()
    elif damage == "planted shard":  # read by torch.load(weights_only=True): refused, never run
        payload = pickle.dumps(_Planted(tmp_path / "ran"))
        shard.write_bytes(payload)
        for info in metadata.storage_data.values():
            info.offset, info.length = 0, len(payload)
        metadata_path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="damaged") as error:
        checkpoint.load_weights(tiny_model(), latest)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert str(latest / "dcp") in message
    assert not (tmp_path / "ran").exists()


def test_leftovers_of_a_sharded_save_are_removed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    sharded_checkpoint(checkpoints / "latest", tiny_model())
    (checkpoints / checkpoint.SHARDED_TEMP / "dcp").mkdir(parents=True)
    (checkpoints / checkpoint.SHARDED_TEMP / "dcp" / "__1_0.distcp").write_bytes(b"\0" * 64)
    assert checkpoint.remove_leftovers(checkpoints) == [checkpoint.SHARDED_TEMP]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest"]


# ---------------------------------------------------------------------------------------------
# torchrun, 2 processes


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_sharded_save_and_resharded_loads_under_torchrun(tmp_path):
    import re

    out = torchrun(str(ROOT / "tests" / "dcp_checks.py"), str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d): ok", out.stdout)) == ["0", "1"], out.stdout


@pytest.mark.slow
def test_kill_9_of_a_rank_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from engine.model.sources import load_model

    out = torchrun(str(ROOT / "tests" / "dcp_checks.py"), str(tmp_path), "kill")
    assert out.returncode != 0  # rank 1 killed itself with its shards written, before .metadata
    assert "rank 0: saved the first" in out.stdout, out.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / checkpoint.SHARDED_TEMP / "dcp" / "__1_0.distcp").exists()
    assert not (checkpoints / checkpoint.SHARDED_TEMP / "dcp" / ".metadata").exists()
    assert checkpoint.remove_leftovers(checkpoints) == [checkpoint.SHARDED_TEMP]
    # `latest` is the first save, whole and loadable in one process
    from types import SimpleNamespace

    model, _ = load_model(SimpleNamespace(source="builtin:tiny-neo", revision=None), seed=1, attention="eager")
    checkpoint.load_weights(model, checkpoints / "latest")
    reference = load_file(str(tmp_path / "reference.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(reference[name], tensor), name
    assert checkpoint.load_state(checkpoints / "latest").position.step == 1


# -- runs -------------------------------------------------------------------------------------

PLAN = textwrap.dedent("""
    name = "dcp"
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
    eval_interval = 0
    eval_batches = 2
    log_interval = 1
    checkpoint_interval = 3
    device = "cpu"
    [[stages]]
    task = "prose"
    steps = 4
    [[stages]]
    task = "python"
    steps = 24
    freeze = "base"
    [[stages.expand]]
    op = "widen_ffn"
    layers = "all"
    size = 16
""")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The plan in one process, never interrupted."""
    from engine.plan import load_plan
    from engine.train.session import run as run_worker
    from widen_tui.launcher import create_run

    home = tmp_path_factory.mktemp("straight")
    plan_path = home / "plan.toml"
    plan_path.write_text(PLAN)
    run = create_run(load_plan(plan_path), plan_path, home / "runs")
    assert run_worker(run.path) == 0
    return run


def kill_rank_after_a_checkpoint_in_stage_1(run, rank: str | None) -> None:
    """SIGKILL the run's worker of `rank` (None: the one process) once stage 1 has checkpointed."""
    from engine.runs.events import read_all
    from tests.conftest import wait_for
    from tests.engine.train.test_distributed import psutil_children_of_run

    deadline = time.time() + 120
    while not any(e.type == "checkpoint" and e.stage == 1 for e in read_all(run.events)):
        assert time.time() < deadline and run.status()["state"] in ("queued", "running"), run.stderr.read_text()[-2000:]
        time.sleep(0.05)
    workers = psutil_children_of_run(run)
    (victim,) = [p for p in workers if rank is None or p.environ().get("RANK") == rank]
    victim.kill()
    assert wait_for(run, ("failed", "lost"), timeout=90) in ("failed", "lost")
    deadline = time.time() + 30
    while psutil_children_of_run(run):
        assert time.time() < deadline
        time.sleep(0.2)


def resume_to_the_end(run, root: Path, *options: str) -> None:
    from tests.conftest import wait_for, widen

    widen("resume", run.id, *options, env_home=root, check=True)
    assert wait_for(run, timeout=180) == "done", run.status()


def assert_same_results(straight, run) -> None:
    for a, b in zip(straight.results()["matrix"]["loss"], run.results()["matrix"]["loss"]):
        assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("resume_on", [("--nproc", "1"), ("--set", "train.distributed.strategy=ddp")],
                         ids=["one-process", "ddp"])
def test_an_fsdp_run_checkpoints_sharded_and_resumes_elsewhere_like_a_straight_run(tmp_path, straight, resume_on):
    from engine.runs.events import read_all
    from engine.runs.rundir import RunDir
    from tests.conftest import widen

    root = tmp_path / "runs"
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    out = widen("run", str(plan), "--nproc", "2", "--detach", "--set", "train.distributed.strategy=fsdp",
                env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    kill_rank_after_a_checkpoint_in_stage_1(run, "1")
    latest = run.checkpoints / "latest"
    assert sorted(p.name for p in (latest / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (latest / checkpoint.WEIGHTS_FILE).exists()
    saved = checkpoint.load_state(latest)
    assert isinstance(saved.optimizer, checkpoint.ShardedMoments) and saved.position.stage == 1
    resume_to_the_end(run, root, *resume_on)
    assert_same_results(straight, run)
    resumed = [e for e in read_all(run.events) if e.type == "start"][-1]
    assert resumed.world_size == (1 if resume_on[0] == "--nproc" else 2)


@pytest.mark.slow
def test_a_whole_checkpoint_resumes_under_fsdp_like_a_straight_run(tmp_path, straight):
    """The other way: a one-process run's model.safetensors into a sharded resume (each rank
    cutting its slices tensor by tensor), its whole moments cut to the shards."""
    from engine.runs.rundir import RunDir
    from tests.conftest import widen

    root = tmp_path / "runs"
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    out = widen("run", str(plan), "--detach", env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    kill_rank_after_a_checkpoint_in_stage_1(run, None)
    assert (run.checkpoints / "latest" / checkpoint.WEIGHTS_FILE).exists()
    resume_to_the_end(run, root, "--nproc", "2", "--set", "train.distributed.strategy=fsdp")
    assert_same_results(straight, run)


@pytest.mark.slow
def test_export_of_an_fsdp_run_reads_its_sharded_checkpoint(tmp_path):
    """`widen export RUN` of a run whose latest checkpoint is DCP shards: streamed tensor by tensor
    (engine.exports.streamed, no process group), it reloads with plain transformers to the logits
    of the checkpoint's model."""
    from engine.exports.hf_directory import reference_logits, reload_delta
    from engine.runs.rundir import RunDir
    from engine.train.build import load_run_model, stage_probe
    from tests.conftest import wait_for, widen

    root = tmp_path / "runs"
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.replace("size = 16\n", 'size = 16\nmode = "inplace"\n'))  # nothing to materialize
    out = widen("run", str(plan), "--nproc", "2", "--detach", "--set", "train.distributed.strategy=fsdp",
                env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    assert wait_for(run, timeout=180) == "done", run.status()
    assert (run.checkpoints / "latest" / "dcp" / ".metadata").exists()
    printed = widen("export", run.id, str(tmp_path / "export"), env_home=root, check=True).stdout
    assert "streamed from the sharded checkpoint" in " ".join(printed.split()), printed
    manifest = json.loads((tmp_path / "export" / "widen_export.json").read_text())
    assert manifest["streamed"]["max_abs_delta"] == 0.0 and manifest["streamed"]["tensors"] > 10
    model, _, tokenizer, loaded_plan = load_run_model(run.path)
    batch = stage_probe(loaded_plan, 1, tokenizer)
    reference = reference_logits(model, batch)
    assert reload_delta(tmp_path / "export", batch[0], reference) <= 1e-4


@pytest.mark.slow
def test_four_ranks_killed_resume_on_two_like_a_straight_run(tmp_path, straight):
    """kill -9 of one of 4 FSDP ranks, then `widen resume --nproc 2`: the 4 ranks' DCP shards
    resharded onto 2 (still FSDP) end as the uninterrupted one-process run does."""
    from engine.runs.events import read_all
    from engine.runs.rundir import RunDir
    from tests.conftest import widen

    root = tmp_path / "runs"
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    out = widen("run", str(plan), "--nproc", "4", "--detach", "--set", "train.distributed.strategy=fsdp",
                env_home=root, check=True)
    run = RunDir(root / out.stdout.strip())
    kill_rank_after_a_checkpoint_in_stage_1(run, "2")
    latest = run.checkpoints / "latest"
    assert sorted(p.name for p in (latest / "dcp").iterdir()) == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    resume_to_the_end(run, root, "--nproc", "2")
    assert_same_results(straight, run)
    resumed = [e for e in read_all(run.events) if e.type == "start"][-1]
    assert resumed.world_size == 2
