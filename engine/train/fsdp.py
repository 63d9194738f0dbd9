"""FSDP2 for the loop (``strategy = "fsdp"``): load a model sharded, shard a plain one with
``fully_shard``, gather one whole again.

Every block whose parameters are its own becomes one FSDP unit, and the root holds the rest
(embeddings, the head, final norms). A block that shares a parameter with another block — a
virtual (weight-tied) layer of a stacking mapping — is not a unit of its own: it stays in the
root's unit, whose parameters are gathered for the whole forward, so the tie holds (that part of
the model is then gathered at once rather than block by block).

The model is never whole on a rank but where an operator needs it so: it loads sharded
(``load_sharded``: built on the meta device, filled unit by unit from rank 0), evaluates and
checkpoints sharded (DCP, ``engine.train.checkpoint``), and its operators grow it one block at a
time (``engine.train.unit_growth``). The few cases that module refuses gather it whole
(``full_state_dict``, ``full_optimizer_state``) into a rebuilt plain model, grow it as one
process would, and shard it again (``load_optimizer_state`` scatters the carried moments).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def own_blocks(model, view) -> list[torch.nn.Module]:
    """The blocks whose parameters appear in no other block (tied blocks stay in the root unit)."""
    try:
        blocks = list(view.blocks())
    except (RuntimeError, AttributeError):  # a model without a block stack: one unit, the root
        return []
    users: dict[int, int] = {}
    for block in blocks:
        for p in {id(p) for p in block.parameters()}:
            users[p] = users.get(p, 0) + 1
    return [block for block in blocks if all(users[id(p)] == 1 for p in block.parameters())]


def shard(model, view) -> list[torch.nn.Module]:
    """FSDP2 over `model`, in place: its own blocks one unit each, then the root. Returns the
    blocks' units (the root is the last unit)."""
    from torch.distributed.fsdp import fully_shard

    units = own_blocks(model, view)
    for block in units:
        fully_shard(block)
    shard_root(model)
    return units


def shard_root(model) -> None:
    """The root unit (its blocks already units). It reshards after every forward, as the blocks
    do: FSDP2's default keeps a root's parameters gathered after a forward without gradients (an
    evaluation), and its modules then hold those whole tensors, not the shards the optimizer,
    the freezing masks and a growth know them by."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, reshard_after_forward=True)


# ---------------------------------------------------------------------------------------------
# loading sharded


class _WeightSource:
    """Rank 0's reader of the model's initial values, a few tensors at a time: straight from the
    safetensors files of a local directory whose names are the model's (a tied parameter may be
    stored once), else — a built-in or config-only model (random, seeded), a hub name, ``.bin``
    weights — from the model loaded whole on rank 0 alone, the ordinary way."""

    def __init__(self, spec, seed: int, attention: str, skeleton: torch.nn.Module):
        from engine.model.sources import load_model, safetensors_files

        self.files: dict[str, object] = {}
        for path in safetensors_files(spec):
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt")
            self.files.update({name: handle for name in handle.keys()})
        entries = skeleton.state_dict(keep_vars=True)
        stored = {id(value) for name, value in entries.items() if name in self.files}
        self.whole = None
        if not self.files or not all(name in self.files or id(value) in stored for name, value in entries.items()):
            self.whole, _ = load_model(spec, seed, attention=attention)
            self.files = {}

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        if self.whole is not None:
            values = self.whole.state_dict()
            return {name: values[name] for name in names}
        return {name: self.files[name].get_tensor(name) for name in names if name in self.files}


def load_sharded(spec, seed: int, attention: str, device: torch.device, is_main: bool):
    """The plan's model, sharded from the start (a collective): built with its parameters on the
    meta device, sharded, then filled unit by unit — rank 0 reads a unit's tensors whole and
    ``set_model_state_dict(..., broadcast_from_rank0=True)`` hands every rank its slices. No rank
    but 0 holds a tensor it does not own longer than that one tensor's broadcast, and rank 0 reads
    one unit at a time (a model without a weight file of its own names is loaded whole on rank 0,
    ``_WeightSource``). The values equal the ordinary load's: the same files, the same seed.
    Returns (model, view)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from engine.model.sources import load_model, materialize_skeleton

    model, view = load_model(spec, seed, attention=attention, skeleton=True)
    if not any(p.is_meta for p in model.parameters()):  # a built-in MLP: built whole (it is tiny)
        shard(model, view)
        return model.to(device), view
    units = shard(model, view)
    materialize_skeleton(model, device)
    source = _WeightSource(spec, seed, attention, model) if is_main else None
    names = {id(m): n for n, m in model.named_modules()}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    in_units = set()
    for unit in units:
        prefix = names[id(unit)] + "."
        keys = list(unit.state_dict().keys())
        in_units.update(prefix + k for k in keys)
        chunk = {k.removeprefix(prefix): v for k, v in source.tensors([prefix + k for k in keys]).items()} \
            if source is not None else {}
        set_model_state_dict(unit, chunk, options=options)
    rest = [k for k in model.state_dict().keys() if k not in in_units]
    set_model_state_dict(model, source.tensors(rest) if source is not None else {}, options=options)
    return model, view


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def whole(value, memo: dict):
    """A DTensor's full value, gathered once per tensor (tied entries stay one tensor). The memo
    keeps each tensor it has seen alive: a freed tensor's id could be reused by another, which
    would then be skipped on one rank only and leave the ranks' collectives out of step."""
    if not isinstance(value, torch.Tensor):
        return value
    if id(value) not in memo:
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if full.untyped_storage().nbytes() != full.numel() * full.element_size():
            full = full.clone()  # an uneven shard's gather is a view into a padded buffer: own storage
        memo[id(value)] = (value, full)
    return memo[id(value)][1]


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors, on every rank (a collective: every rank calls it)."""
    memo: dict = {}
    return {name: whole(value, memo) for name, value in model.state_dict(keep_vars=True).items()}


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with whole tensors (a collective): the format a single process saves."""
    state = optimizer.state_dict()
    memo: dict = {}
    state["state"] = {key: {k: whole(v, memo) for k, v in entry.items()} for key, entry in state["state"].items()}
    return state


def shard_like(tensor: torch.Tensor, param) -> torch.Tensor:
    """`tensor` (whole, the same on every rank) cut as the sharded `param` is; plain params: as is."""
    if not isinstance(param, DTensor):
        return tensor
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a whole-tensor optimizer state (`full_optimizer_state`, or a checkpoint's) into the
    optimizer of the sharded model: every moment is cut as its parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut = {}
    for key, entry in state["state"].items():
        param = params[int(key)]
        cut[key] = {k: shard_like(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                    for k, v in entry.items()}
    optimizer.load_state_dict({**state, "state": cut})
