"""Run under `torchrun --nproc_per_node 2` by tests/engine/train/test_fsdp.py: engine.train.fsdp's pieces against a
plain copy of the same model. Prints one line "ok" from each rank, or fails with an assertion."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engine.model.sources import load_model
from engine.train import checkpoint, fsdp


def plain_and_sharded(tie: bool):
    model, view = load_model(SimpleNamespace(source="builtin:tiny-neo", revision=None), seed=0, attention="eager")
    if tie:  # a virtual layer: block 1 used again as block 3 (both local attention)
        model.transformer.h[3] = model.transformer.h[1]
    plain = copy.deepcopy(model)
    fsdp.shard(model, view)
    return plain, model


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    inputs = torch.randint(0, 259, (2, 24))

    for tie in (False, True):
        plain, sharded = plain_and_sharded(tie)
        # every parameter is sharded: each rank holds its rows only
        for (name, p), (_, q) in zip(plain.named_parameters(), sharded.named_parameters()):
            assert isinstance(q, DTensor) and q.shape == p.shape, name
            assert q.to_local().shape[0] == len(torch.chunk(torch.empty(p.shape[0]), size)[rank]), name
        if tie:  # the tied block stays one tensor, in the root's unit (not a unit of its own)
            assert sharded.transformer.h[1].attn.attention.q_proj.weight is \
                sharded.transformer.h[3].attn.attention.q_proj.weight
            assert not fsdp.is_sharded(sharded.transformer.h[1]) and fsdp.is_sharded(sharded.transformer.h[0])
        with torch.no_grad():
            delta = (plain(inputs, use_cache=False).logits - sharded(inputs, use_cache=False).logits).abs().max().item()
        assert delta <= 1e-5, (tie, delta)

        # whole again: the same tensors as the plain model's
        whole = fsdp.full_state_dict(sharded)
        for name, tensor in plain.state_dict().items():
            assert torch.equal(whole[name], tensor), name
        # and a checkpoint of it (tied embedding and head, 259 rows: an uneven shard) loads into a plain copy
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                saved = checkpoint.save(Path(tmp) / "latest", checkpoint.WholeWeights(whole), checkpoint.TrainerState())
                copy_of = copy.deepcopy(plain)
                torch.nn.init.zeros_(copy_of.transformer.wte.weight)
                checkpoint.load_weights(copy_of, saved)
                assert all(torch.equal(a, b) for a, b in zip(copy_of.state_dict().values(), plain.state_dict().values()))

        # one AdamW step each; the gathered moments equal the plain model's
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, sharded)]
        for model, opt in zip((plain, sharded), opts):
            model(inputs, labels=inputs, use_cache=False).loss.backward()
            opt.step()
        full = fsdp.full_optimizer_state(opts[1])
        reference = opts[0].state_dict()
        for key, entry in reference["state"].items():
            for k, v in entry.items():
                assert torch.allclose(full["state"][key][k], v, atol=1e-6), (key, k)
        # and scattered back into a fresh optimizer over the shards, gathered again: unchanged
        fresh = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
        fsdp.load_optimizer_state(fresh, full)
        again = fsdp.full_optimizer_state(fresh)
        for key, entry in full["state"].items():
            for k, v in entry.items():
                assert torch.equal(again["state"][key][k], v), (key, k)
    print(f"rank {rank}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
