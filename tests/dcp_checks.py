"""Run under `torchrun --nproc_per_node 2` by tests/engine/train/test_checkpoint_dcp.py: a sharded
(DCP) checkpoint of an FSDP2 model and its AdamW state, written by both ranks, read back into a
sharded model, into a whole one (one rank alone, as a DDP rank or a single process does), and a
whole checkpoint read into a sharded model. Prints one line "ok" from each rank, or fails with an
assertion. argv[1]: a directory both ranks see. With argv[2] "kill": rank 1 kills itself (SIGKILL)
in the middle of the second of two sharded saves — its shards written, .metadata not — and the
test reads what is left on disk."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engine.model.sources import load_model
from engine.train import checkpoint, fsdp
from engine.train.distributed import World


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def fresh_model(tie: bool):
    model, view = load_model(SimpleNamespace(source="builtin:tiny-neo", revision=None), seed=1, attention="eager")
    if tie:  # a virtual layer: block 1 used again as block 3
        model.transformer.h[3] = model.transformer.h[1]
    return model, view


def kill_during_a_save(root: Path, world: World) -> None:
    import os
    import signal

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    model, view = fresh_model(False)
    fsdp.shard(model, view)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = torch.randint(0, 259, (2, 24))

    def step_and_save(step: int):
        model(inputs, labels=inputs, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state = checkpoint.TrainerState(position=checkpoint.Position(step=step),
                                        optimizer=checkpoint.sharded_moments(model, optimizer))
        checkpoint.save_sharded(root / "checkpoints" / "latest", world, checkpoint.sharded_weights(model), state)

    step_and_save(1)
    whole = {name: t.clone() for name, t in fsdp.full_state_dict(model).items()}
    if world.rank == 0:
        save_file(whole, str(root / "reference.safetensors"))
        print("rank 0: saved the first", flush=True)
    dist.barrier()
    if world.rank == 1:
        write = dcp.FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            future = write(self, plan, planner)
            future.wait()
            os.kill(os.getpid(), signal.SIGKILL)

        dcp.FileSystemWriter.write_data = write_then_die
    step_and_save(2)
    raise AssertionError("the second save went through")


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    world = World(rank, size)
    root = Path(sys.argv[1])
    torch.manual_seed(0)
    if sys.argv[2:] == ["kill"]:
        kill_during_a_save(root, world)
        return
    inputs = torch.randint(0, 259, (2, 24))

    for tie in (False, True):
        where = root / f"tie{int(tie)}" / "checkpoints"
        model, view = fresh_model(tie)
        plain = copy.deepcopy(model)
        fsdp.shard(model, view)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            model(inputs, labels=inputs, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        whole = fsdp.full_state_dict(model)
        whole_moments = copy.deepcopy(fsdp.full_optimizer_state(optimizer))  # steps change in place

        # the save: every rank its shards, nothing gathered
        weights = checkpoint.sharded_weights(model)
        assert all(isinstance(v, DTensor) for v in weights.tensors.values())
        state = checkpoint.TrainerState(optimizer=checkpoint.sharded_moments(model, optimizer),
                                        rng=checkpoint.capture_rng())
        latest = checkpoint.save_sharded(where / "latest", world, weights, state)
        dist.barrier()
        names = sorted(p.name for p in (latest / checkpoint.DCP_DIR).iterdir())
        assert names == [".metadata"] + [f"__{r}_0.distcp" for r in range(size)], names
        assert not (latest / checkpoint.WEIGHTS_FILE).exists() and checkpoint.exists(latest)
        assert sorted(p.name for p in where.iterdir()) == ["latest"]
        saved = checkpoint.load_state(latest)
        assert isinstance(saved.optimizer, checkpoint.ShardedMoments)

        # into a sharded model and optimizer (a collective): the same shards
        again, view2 = fresh_model(tie)
        fsdp.shard(again, view2)
        checkpoint.load_weights(again, latest)
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(local(a), local(b)), name
        if tie:
            assert again.transformer.h[1].attn.attention.q_proj.weight is again.transformer.h[3].attn.attention.q_proj.weight
        opt2 = torch.optim.AdamW(again.parameters(), lr=1e-3)
        checkpoint.load_sharded_moments(again, opt2, saved.optimizer)
        for p, q in zip(model.parameters(), again.parameters()):
            for key, value in optimizer.state[p].items():
                assert torch.equal(local(value), local(opt2.state[q][key])), key
        # one more step of each: the same weights
        for m, o in ((model, optimizer), (again, opt2)):
            m(inputs, labels=inputs, use_cache=False).loss.backward()
            o.step()
            o.zero_grad()
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(local(a), local(b)), name

        # into a whole model and optimizer on rank 0 alone (a DDP rank, one process): no collective
        if rank == 0:
            copy_of = copy.deepcopy(plain)
            torch.nn.init.zeros_(copy_of.transformer.wte.weight)
            checkpoint.load_weights(copy_of, latest)
            for name, tensor in copy_of.state_dict().items():
                assert torch.equal(whole[name], tensor), name
            opt3 = torch.optim.AdamW(copy_of.parameters(), lr=1e-3)
            checkpoint.load_sharded_moments(copy_of, opt3, saved.optimizer)
            reference = opt3.state_dict()
            for key, entry in whole_moments["state"].items():
                for k, v in entry.items():
                    assert torch.equal(reference["state"][key][k], v), (key, k)
            assert reference["param_groups"][0]["lr"] == whole_moments["param_groups"][0]["lr"]

        # a whole checkpoint (rank 0 writes it) into a sharded model: tensor by tensor, no collective
        if rank == 0:
            checkpoint.save(where / "whole", checkpoint.WholeWeights(whole), checkpoint.TrainerState())
        dist.barrier()
        third, view3 = fresh_model(tie)
        fsdp.shard(third, view3)
        checkpoint.load_weights(third, where / "whole")
        for name, value in third.state_dict().items():
            expect = torch.chunk(whole[name], size)[rank] if isinstance(value, DTensor) else whole[name]
            assert torch.equal(local(value), expect), name
        dist.barrier()
    print(f"rank {rank}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
