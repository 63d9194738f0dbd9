"""Growing a sharded (FSDP2) model one unit at a time: no rank ever holds the whole model.

An operator whose descriptor says ``per_block`` (applied to layers [a, b, ...] it does what it
does to [a], then to [b], with the same generator) runs here block by block:

1. the model's current shape is rebuilt on the meta device (the base model's config, the run's
   operators and growths replayed without values: no memory);
2. for each chosen block, in layer order: its values are gathered from its FSDP unit (one block,
   whole), the operator is applied to that block alone (``layers = [j]``), the block's AdamW
   moments are gathered and carried onto the grown block by the rules of a single process
   (``engine.grow.growth.carry_optimizer_state``), then the block is sharded (``fully_shard``)
   and its carried moments cut as its new shards are;
3. the other blocks, and the root's own parameters (embeddings, final norm, head: one unit),
   are gathered into the new model one unit at a time and sharded again with the same values and
   moments (an FSDP unit stays bound to the root it first ran under, so none is reused).

The values are those of the single process: the same operator code, the same generator, the
same draws in the same order (tests/engine/train/test_unit_growth.py compares them). The
operator's config changes and note come from the operator applied to all its layers at once on
the meta shape (values are never drawn there).

Two other kinds of operator are grown without the whole model too (their descriptors say so):
``block_list`` ones (depth and mapping: every new block a draw-free copy of one old block) run
once per source block with that block alone given its values (``_rearrange``); ``in_order`` ones
(widen_hidden: the root, one walk over the blocks, the root again) run once while each block is
given its values as the walk reaches it and sharded as it leaves it (``_walk``).

What ``applies`` refuses — several block-list operators in one stage, a model with weight-tied
blocks under a block-list or walking operator, task-specific modules, several stacks (T5) — the
loop gathers whole (``TrainedModel.gather``).
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

from engine.grow.apply import StageGrowth
from engine.grow.growth import carry_optimizer_state
from engine.model.view import ArchView, get_submodule
from engine.ops.params import OPS
from engine.ops.registry import apply_operator
from engine.train import fsdp


def applies(specs, view: ArchView) -> bool:
    """Whether these operators can grow the sharded model of `view` one unit at a time."""
    try:
        single_stack = len(view.stacks()) == 1 and getattr(view.stacks()[0], "stack", None) is None
        view.blocks()
    except (RuntimeError, AttributeError):
        return False
    if not specs or not single_stack:
        return False
    if all(OPS[spec.op].per_block for spec in specs):
        return True
    if len(specs) == 1 and OPS[specs[0].op].in_order:  # one walk over the blocks, alone in its stage
        return len(fsdp.own_blocks(view.model, view)) == len(list(view.blocks()))
    # a block-list operator (its new blocks copies of one old block each), last, on a model whose
    # blocks share nothing (a weight-tied twin would come out of two rebuilds untied)
    *first, last = specs
    blocks = list(view.blocks())
    return (OPS[last.op].block_list and all(OPS[spec.op].per_block for spec in first)
            and len(fsdp.own_blocks(view.model, view)) == len(blocks))


def _whole(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class UnitByUnit:
    """One stage's (or growth's) operators applied unit by unit; pass it as ``apply_stage``'s
    `applier`. `module` and `view` are the sharded model as it is after each operator;
    `moments` (name -> AdamW state, cut as the parameter is) what the new optimizer starts from;
    `rehoused` (old parameter id -> new one): what kept its values but is a new tensor (the root's
    parameters, re-sharded; a grown block's parameters its operator left as they were)."""

    def __init__(self, module, view: ArchView, shape, shape_view: ArchView, device: torch.device, optimizer=None):
        self.module, self.view = module, view
        self.shape, self.shape_view = shape, shape_view       # the same model on the meta device
        self.device = device
        named = dict(module.named_parameters(remove_duplicate=False))
        self.moments: dict[str, dict] | None = None
        if optimizer is not None:
            self.moments = {name: dict(optimizer.state[p]) for name, p in named.items() if optimizer.state.get(p)}
        self.hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} if optimizer else {}
        self.optimizer = optimizer
        self.rehoused: dict[int, torch.nn.Parameter] = {}   # since the start
        self.remade: dict[int, torch.nn.Parameter] = {}     # by the last operator

    def __call__(self, params, generator: torch.Generator):
        """Apply one operator (its OpParams) unit by unit; returns its OpResult over the new
        sharded parameters."""
        if OPS[params.op].block_list:
            return self._rearrange(params, generator)
        if OPS[params.op].in_order:
            return self._walk(params, generator)
        old_named = dict(self.module.named_parameters(remove_duplicate=False))
        outline = copy.deepcopy(self.shape)   # the operator on all its layers, on meta: config changes, note
        outline_view = ArchView(outline.config, outline)
        outline_view.stage_index = getattr(self.view, "stage_index", None)
        whole_result = apply_operator(outline_view, params, torch.Generator().manual_seed(0))
        for key, value in whole_result.config_changes.items():
            setattr(outline.config, key, value)

        target, target_view = self.shape, self.shape_view
        target_view.stage_index = getattr(self.view, "stage_index", None)
        blocks_path = target_view.family.blocks
        old_blocks, new_blocks = list(self.view.blocks()), target_view.blocks()
        layers = params.layer_indices(target_view.num_layers)
        names: dict[int, str] = {}
        moments: dict[str, dict] = {}
        rehoused: dict[int, torch.nn.Parameter] = {}
        results = []
        for j in layers:
            prefix = f"{blocks_path}.{j}."
            block = new_blocks[j]
            _fill(block, old_blocks[j])
            before = dict(block.named_parameters(remove_duplicate=False))
            result = apply_operator(target_view, params.model_copy(update={"layers": [j]}), generator)
            carried = self._carry(block, before, result, {id(p) for p in block.parameters()},
                                  prefix) if self.moments is not None else {}
            plain = {name: p for name, p in block.named_parameters(remove_duplicate=False)}
            names.update({id(p): prefix + name for name, p in plain.items()})
            was = {id(p): name for name, p in before.items()}
            kept = {name: was[id(p)] for name, p in plain.items() if id(p) in was}  # left as it was (maybe wrapped)
            from torch.distributed.fsdp import fully_shard

            fully_shard(block)
            sharded = dict(block.named_parameters(remove_duplicate=False))
            rehoused.update({id(old_named[prefix + old]): sharded[name] for name, old in kept.items()})
            for name, p in plain.items():
                state = carried.get(id(p))
                if state:
                    moments[prefix + name] = {k: fsdp.shard_like(v, sharded[name]) if isinstance(v, torch.Tensor)
                                              and v.shape == sharded[name].shape else v for k, v in state.items()}
            results.append(result)
            self._release(old_blocks[j], prefix, old_named)
        for j, block in enumerate(old_blocks):  # the others: the same values in a unit of the new root
            if j not in layers:  # (an FSDP unit belongs to the root it first ran under: not reused)
                prefix = f"{blocks_path}.{j}."
                _fill(new_blocks[j], block)
                kept = list(dict(new_blocks[j].named_parameters(remove_duplicate=False)))
                from torch.distributed.fsdp import fully_shard

                fully_shard(new_blocks[j])
                sharded = dict(new_blocks[j].named_parameters(remove_duplicate=False))
                names.update({id(p): prefix + name for name, p in sharded.items()})
                rehoused.update({id(old_named[prefix + name]): sharded[name] for name in kept})
                for name in kept:  # the same shards: the same moments
                    if self.moments is not None and self.moments.get(prefix + name):
                        moments[prefix + name] = self.moments[prefix + name]
                self._release(block, prefix, old_named)
        self._rehouse_root(target, blocks_path, old_named)
        fsdp.shard_root(target)
        new_named = dict(target.named_parameters(remove_duplicate=False))
        if self.moments is not None:
            for name, p in new_named.items():
                if name in moments:
                    continue
                old = old_named.get(name)
                if old is not None and self.moments.get(name) and tuple(old.shape) == tuple(p.shape):
                    moments[name] = self.moments[name]
            self.moments = moments
        names.update({id(p): name for name, p in new_named.items() if id(p) not in names})
        merged = _merge(results, whole_result)
        moved = StageGrowth([merged]).moved(names, new_named).results[0]
        rehoused.update({id(old_named[n]): new_named[n] for n in new_named if n in old_named
                         and old_named[n] is not new_named[n] and not n.startswith(blocks_path + ".")})
        self.remade = rehoused
        self.rehoused = {k: rehoused.get(id(v), v) for k, v in self.rehoused.items()}  # an earlier operator's
        self.rehoused.update(rehoused)
        self.module, self.view = target, ArchView(target.config, target)
        self.view.stage_index = target_view.stage_index
        self.shape, self.shape_view = outline, outline_view  # the shape after this operator, for the next
        return moved

    def _rearrange(self, params, generator: torch.Generator):
        """A block-list operator (depth, mapping): every new block is a copy of one old block,
        transformed alone (scaled outputs, a zero-init twin) and with no draw. The operator runs
        on the meta shape once for the new list, then once per source block with that block alone
        given its values: its descendants come out whole, are carried their moments (as one
        process carries them), sharded, and the old block freed."""
        old_named = dict(self.module.named_parameters(remove_duplicate=False))
        old_blocks = list(self.view.blocks())
        stage_index = getattr(self.view, "stage_index", None)
        base, blocks_path = self.shape, self.shape_view.family.blocks
        for j, block in enumerate(self.shape_view.blocks()):
            block._widen_source = j  # deepcopy keeps it: which old block each new one came from
        outline = copy.deepcopy(base)
        outline_view = ArchView(outline.config, outline)
        outline_view.stage_index = stage_index
        whole_result = apply_operator(outline_view, params, generator)
        for key, value in whole_result.config_changes.items():
            setattr(outline.config, key, value)
        final = outline_view.blocks()
        sources = [block._widen_source for block in final]
        next_shape = copy.deepcopy(outline)  # the shape after this operator, for the next one
        names: dict[int, str] = {}
        moments: dict[str, dict] = {}
        rehoused: dict[int, torch.nn.Parameter] = {}
        results = []
        for s in sorted(set(sources)):
            mini = copy.deepcopy(base)
            mini_view = ArchView(mini.config, mini)
            mini_view.stage_index = stage_index
            _fill(mini_view.blocks()[s], old_blocks[s])
            before = dict(mini.named_parameters(remove_duplicate=False))
            was = {id(p): name for name, p in before.items() if not p.is_meta}
            result = apply_operator(mini_view, params, generator)
            built = mini_view.blocks()
            mine = [i for i, source in enumerate(sources) if source == s]
            params_of = {id(p) for i in mine for p in built[i].parameters()}
            carried = self._carry(mini, before, result, params_of) if self.moments is not None else {}
            shared = _shared_blocks(built, mine)
            for i in mine:
                block, prefix = built[i], f"{blocks_path}.{i}."
                plain = dict(block.named_parameters(remove_duplicate=False))
                names.update({id(p): prefix + name for name, p in plain.items()})
                kept = {name: was[id(p)] for name, p in plain.items() if id(p) in was}
                if i not in shared:
                    from torch.distributed.fsdp import fully_shard

                    fully_shard(block)
                now = dict(block.named_parameters(remove_duplicate=False))
                rehoused.update({id(old_named[old]): now[name] for name, old in kept.items()})
                for name, p in plain.items():
                    state = carried.get(id(p))
                    if state:
                        moments[prefix + name] = {k: fsdp.shard_like(v, now[name]) if isinstance(v, torch.Tensor)
                                                  and v.shape == now[name].shape else v for k, v in state.items()}
                del block._widen_source
                for module in block.modules():  # the model's config, not the rebuild's copy of it
                    if getattr(module, "config", None) is mini.config:
                        module.config = outline.config
                final[i] = block
            results.append(dataclasses.replace(
                result, new_params=[p for p in result.new_params if id(p) in params_of],
                copies=[(c, src) for c, src in result.copies if id(c) in params_of]))
            self._release(old_blocks[s], f"{blocks_path}.{s}.", old_named)
        for j, block in enumerate(old_blocks):  # blocks the mapping dropped
            if j not in sources:
                self._release(block, f"{blocks_path}.{j}.", old_named)
        for block in next_shape.modules():
            block.__dict__.pop("_widen_source", None)
        self._rehouse_root(outline, blocks_path, old_named)
        fsdp.shard_root(outline)
        new_named = dict(outline.named_parameters(remove_duplicate=False))
        if self.moments is not None:
            for name in new_named:
                if name not in moments and not name.startswith(blocks_path + ".") and self.moments.get(name):
                    moments[name] = self.moments[name]
            self.moments = moments
        names.update({id(p): name for name, p in new_named.items() if id(p) not in names})
        merged = _merge(results, whole_result)
        moved = StageGrowth([merged]).replaced({i: new_named[n] for i, n in names.items() if n in new_named})
        rehoused.update({id(old_named[n]): new_named[n] for n in new_named if n in old_named
                         and old_named[n] is not new_named[n] and not n.startswith(blocks_path + ".")})
        self.remade = rehoused
        self.rehoused = {k: rehoused.get(id(v), v) for k, v in self.rehoused.items()}
        self.rehoused.update(rehoused)
        self.module, self.view = outline, ArchView(outline.config, outline)
        self.view.stage_index = stage_index
        self.shape, self.shape_view = next_shape, ArchView(next_shape.config, next_shape)
        return moved.results[0]

    def _walk(self, params, generator: torch.Generator):
        """An operator that changes the root, then walks the blocks once in order touching only
        the current one, then the root again (widen_hidden): the root is given its values (one
        unit), the operator runs once on the meta shape, and each block is given its values as
        the walk reaches it and sharded as it leaves it. The moments are carried afterwards, one
        tensor at a time."""
        old_named = dict(self.module.named_parameters(remove_duplicate=False))
        old_blocks = list(self.view.blocks())
        stage_index = getattr(self.view, "stage_index", None)
        outline = copy.deepcopy(self.shape)  # the shape after the operator, for the next one
        outline_view = ArchView(outline.config, outline)
        outline_view.stage_index = stage_index
        outline_result = apply_operator(outline_view, params, torch.Generator().manual_seed(0))
        for key, value in outline_result.config_changes.items():
            setattr(outline.config, key, value)
        target, view = self.shape, self.shape_view
        view.stage_index = stage_index
        blocks_path = view.family.blocks
        parent_path, _, list_name = blocks_path.rpartition(".")
        parent = get_submodule(target, parent_path) if parent_path else target
        names: dict[int, str] = {}
        rehoused: dict[int, torch.nn.Parameter] = {}
        befores: dict[int, dict] = {}

        # The operator knows tensors by id while it runs (widen_hidden grows each one once): the
        # tensors a block had and got stay alive, emptied, so no id is reused by a later block's.
        emptied: list[torch.Tensor] = []

        def enter(j, block):
            _fill(block, old_blocks[j])
            befores[j] = {id(p): name for name, p in block.named_parameters(remove_duplicate=False)}
            emptied.extend(block.parameters())

        def leave(j, block):
            from torch.distributed.fsdp import fully_shard

            prefix = f"{blocks_path}.{j}."
            plain = dict(block.named_parameters(remove_duplicate=False))
            names.update({id(p): prefix + name for name, p in plain.items()})
            kept = {name: befores[j][id(p)] for name, p in plain.items() if id(p) in befores[j]}
            emptied.extend(plain.values())
            fully_shard(block)
            with torch.no_grad():
                for p in emptied:
                    if not isinstance(p, DTensor) and p.numel():
                        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            now = dict(block.named_parameters(remove_duplicate=False))
            rehoused.update({id(old_named[prefix + old]): now[name] for name, old in kept.items()})
            self._release(old_blocks[j], prefix, old_named, keep_moments=True)

        self._rehouse_root(target, blocks_path, old_named)
        root_before = {id(p): name for name, p in target.named_parameters(remove_duplicate=False)
                       if not name.startswith(blocks_path + ".")}
        walked = _WalkedBlocks(list(getattr(parent, list_name)), enter, leave)
        setattr(parent, list_name, walked)
        try:
            result = apply_operator(view, params, generator)
        finally:
            setattr(parent, list_name, torch.nn.ModuleList(walked.modules_in_order()))
        for key, value in result.config_changes.items():
            setattr(target.config, key, value)
        plain_root = {id(p): name for name, p in target.named_parameters(remove_duplicate=False)
                      if not name.startswith(blocks_path + ".")}
        fsdp.shard_root(target)
        new_named = dict(target.named_parameters(remove_duplicate=False))
        names.update({i: n for i, n in plain_root.items()})
        rehoused.update({id(old_named[root_before[i]]): new_named[n] for i, n in plain_root.items() if i in root_before})
        growth = StageGrowth([result])
        moved = growth.replaced({i: new_named[n] for i, n in names.items() if n in new_named}).results[0]
        if self.moments is not None:
            self.moments = self._carry_each(moved, new_named, old_named)
        self.remade = rehoused
        self.rehoused = {k: rehoused.get(id(v), v) for k, v in self.rehoused.items()}
        self.rehoused.update(rehoused)
        self.module, self.view = target, ArchView(target.config, target)
        self.view.stage_index = stage_index
        self.shape, self.shape_view = outline, outline_view
        return moved

    def _carry_each(self, result, new_named: dict, old_named: dict) -> dict[str, dict]:
        """Every parameter's AdamW state after an in-order operator, one tensor whole at a time:
        the same tensor keeps its state, a grown one gets its old moments at its old entries
        (``engine.grow.growth`` rules), a new one none."""
        from engine.grow.growth import carried_state

        masks = {id(p): m for p, m in result.grown}
        moments: dict[str, dict] = {}
        for name, p in new_named.items():
            state = self.moments.get(name)
            old = old_named.get(name)
            if not state or old is None:
                continue
            if old is p or tuple(old.shape) == tuple(p.shape) and id(p) not in masks:
                moments[name] = state
                continue
            like = torch.empty(tuple(p.shape), dtype=p.dtype, device=p.to_local().device if hasattr(p, "to_local") else p.device)
            whole = {k: _whole(v) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in state.items()}
            carried = carried_state(whole, like, None, masks.get(id(p)))
            if carried is not None:
                moments[name] = {k: fsdp.shard_like(v, p) if isinstance(v, torch.Tensor) and v.dim() else v
                                 for k, v in carried.items()}
        return moments

    def _carry(self, model, before: dict, result, grown: set[int], prefix: str = "") -> dict[int, dict]:
        """The AdamW state (whole tensors, by parameter id) of `model`'s parameters in `grown`, as
        ``carry_optimizer_state`` gives it in one process. `before` names the parameters before
        the operator as `model` names them (`prefix` + name: the run's model's name); those with
        values (the block being grown, not the meta rest) have their old moments gathered."""
        old_state = {}
        for name, p in before.items():
            state = self.moments.get(prefix + name) if not p.is_meta else None
            if state:
                old_state[p] = {k: _whole(v) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in state.items()}
        params = [p for p in model.parameters() if id(p) in grown]
        new = SimpleNamespace(param_groups=[{**self.hyper, "params": params}], state={})
        carry_optimizer_state(SimpleNamespace(state=old_state), new, before, model, StageGrowth([result]))
        return {id(p): state for p, state in new.state.items()}

    def _release(self, old_block, prefix: str, old_named: dict, keep_moments: bool = False) -> None:
        """Once a block is in the new model: its old shards and old moments go (the old model is
        not used again), so a growth holds two copies of one block's state, not of the model's.
        `keep_moments`: the moments are carried later (sharded until then)."""
        for name, p in old_block.named_parameters(remove_duplicate=False):
            if self.optimizer is not None:
                self.optimizer.state.pop(old_named.get(prefix + name, p), None)
            if self.moments is not None and prefix + name in self.moments and not keep_moments:
                self.moments[prefix + name] = {}
        old_block.to_empty(device="meta")

    def _rehouse_root(self, target, blocks_path: str, old_named: dict) -> None:
        """The root's own parameters (outside the blocks), gathered whole into `target` (on meta
        until now); a tied parameter stays one tensor."""
        made: dict[int, torch.nn.Parameter] = {}
        for module_name, module in target.named_modules(remove_duplicate=False):
            if module_name == blocks_path or module_name.startswith(blocks_path + "."):
                continue
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                old = old_named[full]
                if id(old) not in made:
                    made[id(old)] = torch.nn.Parameter(_whole(old.detach()).to(self.device).clone(),
                                                       requires_grad=old.requires_grad)
                module._parameters[name] = made[id(old)]
        for module_name, module in target.named_modules(remove_duplicate=False):  # real buffers
            if module_name == blocks_path or module_name.startswith(blocks_path + "."):
                continue
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    raise RuntimeError(f"{module_name}.{name}: a buffer without values")


def _fill(block: torch.nn.Module, source: torch.nn.Module) -> None:
    """Give the meta `block` the values of `source` (an FSDP unit of the same shape), one tensor
    gathered at a time."""
    from engine.model.sources import materialize_skeleton

    values = dict(source.named_parameters(remove_duplicate=False))
    device = next(iter(values.values())).device if values else torch.device("cpu")
    materialize_skeleton(block, device)
    with torch.no_grad():
        for name, p in block.named_parameters(remove_duplicate=False):
            p.copy_(_whole(values[name].detach()))
        buffers = dict(source.named_buffers())
        for name, b in block.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])


class _WalkedBlocks(torch.nn.ModuleList):
    """A block list whose first walk gives each block its values as it is reached (`enter`) and
    shards it as it is left (`leave`); later walks see the blocks as they are."""

    def __init__(self, modules, enter=None, leave=None):
        super().__init__(modules)
        self._enter, self._leave, self._walked = enter, leave, enter is None

    def __iter__(self):
        if self._walked:
            yield from super().__iter__()
            return
        self._walked = True
        for j, block in enumerate(super().__iter__()):
            self._enter(j, block)
            yield block
            self._leave(j, block)

    def modules_in_order(self) -> list:
        return [self[j] for j in range(len(self))]


def _shared_blocks(blocks, positions: list[int]) -> set[int]:
    """Which of `positions` hold a block that shares a parameter with another one (a virtual,
    weight-tied repeat and its source): they stay in the root's unit (engine.train.fsdp)."""
    users: dict[int, int] = {}
    for i in positions:
        for p in {id(p) for p in blocks[i].parameters()}:
            users[p] = users.get(p, 0) + 1
    return {i for i in positions if any(users[id(p)] > 1 for p in blocks[i].parameters())}


def _merge(results: list, whole):
    """The per-block results as one OpResult, with the config changes, note and exactness of the
    operator applied to all its layers at once."""
    merged = copy.copy(whole)
    merged.new_params, merged.grown, merged.units, merged.splits, merged.copies = [], [], [], [], []
    for result in results:
        merged.new_params += result.new_params
        merged.grown += result.grown
        merged.units += result.units
        merged.splits += result.splits
        merged.copies += result.copies
    return merged
