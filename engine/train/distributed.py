"""The run's process group, when it runs under ``torchrun`` (``[train] distributed``).

Nothing here launches processes or builds groups by hand: ``torchrun`` (``python -m
torch.distributed.run``) starts the ranks and sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR, and ``init_process_group`` joins them (nccl on CUDA, gloo on CPU). A single process
is a world of one: every helper is then a no-op, so the loop reads the same either way.

What makes a run's figures independent of how it was launched: each step's global batch is a
pure function of (seed, stage, step) and rank r trains rows [r·B/N, (r+1)·B/N) of it; DDP
averages the gradients, which for equal row counts is the gradient of the global batch's mean
loss; the logged loss is the all-reduced mean; evaluation is sharded by batch and its sums are
all-reduced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- collectives (no-ops in a world of one) -----------------------------------------------
    def _wire(self) -> torch.device:
        """Where collectives' tensors live: nccl needs them on the GPU, gloo on the CPU."""
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over the ranks (float64 on the wire)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._wire())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def mean_on_device(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over the ranks, left where it is (no read by the host: the
        step loop reads it once per log window). gloo reduces CPU tensors: a CUDA value makes the
        trip there and back on a gloo group."""
        if not self.distributed:
            return value
        wire = value.detach().float().reshape(1).to(self._wire())
        dist.all_reduce(wire)
        return (wire / self.size).to(value.device).reshape(())

    def sum_on_device(self, value: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of a tensor over the ranks (float64 on the wire), left where it is:
        no read by the host. A value that needs a gradient gives a sum that has none."""
        if not self.distributed:
            return value
        wire = value.detach().to(self._wire(), torch.float64, copy=True)
        dist.all_reduce(wire)
        return wire.to(value.device, value.dtype)

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self._wire())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- data and model -----------------------------------------------------------------------
    def shard_rows(self, batch, batch_size: int):
        """This rank's rows of a global batch (numpy arrays, possibly nested in tuples)."""
        if not self.distributed:
            return batch
        per_rank = batch_size // self.size
        start = self.rank * per_rank

        def cut(part):
            return tuple(cut(p) for p in part) if isinstance(part, (tuple, list)) else part[start:start + per_rank]

        return cut(batch)

    def shard_list(self, items: list, lockstep: bool = False) -> tuple[list, int]:
        """Rank r's items r, r+N, r+2N, ... (evaluation batches), and how many of them count.
        `lockstep` (FSDP: every forward is a collective): every rank gets as many items, the
        ranks short of one repeat their first item, which does not count."""
        if not self.distributed:
            return items, len(items)
        mine = items[self.rank::self.size]
        counted = len(mine)
        if lockstep:
            mine = mine + [items[0]] * (-(-len(items) // self.size) - counted)
        return mine, counted

    def all_gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (the same length on each), in rank order."""
        if not self.distributed:
            return [list(values)]
        tensor = torch.tensor(values, dtype=torch.float64, device=self._wire())
        rows = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(rows, tensor)
        return [row.tolist() for row in rows]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train through: DDP over `model` (parameters shared, not copied) in a
        distributed run. Call again after anything changes which parameters train (a stage's
        freezing, a growth): DDP registers its hooks on the trainable parameters it was built with."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)


def join() -> World:
    """This process's place in the run: joins torchrun's group when WORLD_SIZE > 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend)
    return world


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
