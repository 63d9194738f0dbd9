"""The model a run trains, with what belongs to it: its ArchView, what the current stage added
(freezing and unit health read it), the freezing, the task-specific modules, and where its
parameters live — whole on every rank (one process, DDP) or sharded (FSDP2, ``engine.train.fsdp``).

A sharded model changes shape without being gathered where its operators allow: they grow it
one block at a time (``unit_by_unit``, engine.train.unit_growth), carrying each block's AdamW
moments as it goes. What that refuses — several depth operators in one stage, task-specific
modules, multi-stack models — gathers it whole first (``gather``: the weights and the optimizer
state, into a plain model rebuilt on placeholders, the way a resume rebuilds it), grows it as one
process would, and shards it again (``shard``).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext

import torch

from engine.grow.apply import Freezer, StageGrowth, apply_stage, op_generator
from engine.grow.growth import combine_growth, grow_model, growth_generator
from engine.grow.task_modules import TaskModules
from engine.plan import Plan
from engine.train import depth_scaling, fsdp, moe, speed, unit_growth
from engine.train.build import Prepared, replay_expansions
from engine.train.checkpoint import ShardedMoments, load_sharded_moments, sharded_moments, sharded_weights
from engine.train.distributed import World
from engine.train.optim import make_optimizer


class TrainedModel:
    def __init__(self, plan: Plan, prepared: Prepared, world: World):
        self.plan, self.world, self.device = plan, world, prepared.device
        self.module, self.view = prepared.model, prepared.view
        self.growth = StageGrowth()      # what the current stage added (its operators and growths)
        self.freezer = Freezer()
        self.task_modules = TaskModules() if plan.task_modules else None
        self.active_task: str | None = None
        self.fsdp = world.distributed and plan.train.strategy == "fsdp"
        self.sharded = fsdp.is_sharded(self.module)   # FSDP loads it sharded (engine.train.fsdp.load_sharded)
        self.stage_index, self.policy = 0, "none"
        self.restarts: list[int] = []   # stage steps where the lr schedule went back to its peak (rewarm)
        self._trains: tuple[weakref.ref, list] | None = None  # (optimizer, its parameters that train)
        self.carried: dict[str, dict] | None = None  # a unit-by-unit growth's moments, by name (load_carried)
        # the sparse blocks' routers, hooked for their losses and statistics (none for a dense model)
        self.routers = moe.Routers(plan.train.router_aux_loss_coef, plan.train.router_z_loss_coef, world)
        # depth scaling (engine.train.depth_scaling): the base depth, read off the model as loaded
        # (before any operator; a resume loads it again, so it gets the same), and depth-µP's
        # start folded in once. A resume or a prefix-cache start then loads its checkpoint's
        # (already folded) weights over every tensor, the folded ones included.
        self.base_depth: int | None = None
        if plan.train.residual_scaling == "depth_mup":
            depth_scaling.check_supported(self.view)
            self.base_depth = depth_scaling.base_depth(plan.train, self.view)
            depth_scaling.fold_initial_scale(self.module, self.view, self.base_depth)
        if plan.train.checkpointing:
            speed.enable_checkpointing(self.module, self.view)

    # ------------------------------------------------------------------ task modules
    def activate(self, task: str | None) -> None:
        """With task-specific modules, switch the model to `task`'s own modules."""
        if self.task_modules is not None and task != self.active_task:
            self.task_modules.activate(self.module, task)
            self.active_task = task

    def _claim(self, task: str, growth: StageGrowth) -> None:
        """What a stage (or a growth) added belongs to its task; the first stage shapes the base."""
        if self.task_modules is not None:
            self.task_modules.claim(task, self.module, growth, allow_shared=self.stage_index == 0)
            self.active_task = None  # the new modules are on: switch again
            self.activate(task)

    # ------------------------------------------------------------------ shape (whole model only)
    def expand(self, index: int, probe, growths: list[dict]) -> list[dict]:
        """Apply stage `index`'s operators, measured on `probe`; returns their reports. A sharded
        model is gathered whole first when the stage has operators (`growths`: the run's so far)."""
        stage = self.plan.stages[index]
        applier = self.unit_by_unit(stage.expand, index, growths)
        if stage.expand and self.sharded and applier is None:
            self.gather(index, growths)
        self.stage_index = index
        self.activate(stage.task)  # expansions are measured on the task's own model
        self.growth = apply_stage(self.module, self.view, index, stage.expand, probe, op_generator(self.plan.seed, index),
                                  applier=applier)
        if applier is not None:
            self.module, self.view = applier.module, applier.view
        self._after_shape_change(stage.task, self.growth)
        self.freeze(index)
        return self.growth.reports

    def grows_by_units(self, specs) -> bool:
        """Whether `specs` grow this model one unit at a time (sharded, and they all allow it)."""
        return self.sharded and self.task_modules is None and unit_growth.applies(specs, self.view)

    def unit_by_unit(self, specs, index: int, growths: list[dict], optimizer=None):
        """A sharded model's operators, one unit at a time (engine.train.unit_growth), when they all
        allow it; None when the model must be gathered whole for them (or is not sharded). The
        model's shape before them: the first `index` stages' operators with `growths` — under
        `optimizer`, mid-stage, the current stage's as well."""
        if not self.grows_by_units(specs):
            return None
        from engine.model.sources import load_model

        shape, shape_view = load_model(self.plan.model, self.plan.seed, attention=self.plan.train.attention,
                                       skeleton=True)
        stages = index + 1 if optimizer is not None else index
        replay_expansions(shape, shape_view, self.plan, stages, growths)
        return unit_growth.UnitByUnit(self.module, self.view, shape, shape_view, self.device, optimizer)

    def grow(self, index: int, k: int, probe, growths: list[dict] | None = None,
             optimizer=None) -> tuple[StageGrowth, dict]:
        """Growth number `k` of stage `index`; returns it and the parameters before it. A sharded
        model (with its `optimizer` and the run's `growths` so far) grows one unit at a time; its
        carried moments are then in `self.carried` (``load_carried``)."""
        stage = self.plan.stages[index]
        before = dict(self.module.named_parameters())
        applier = self.unit_by_unit(stage.grow.expand, index, growths or [], optimizer) if optimizer else None
        growth = grow_model(self.module, self.view, stage.grow.expand, index, k, probe,
                            growth_generator(self.plan.seed, index, k), applier=applier)
        self.carried = None
        if applier is not None:
            self.module, self.view, self.carried = applier.module, applier.view, applier.moments
            # the root's parameters were re-sharded with the same values: the same tensors, anew
            before = {name: applier.rehoused.get(id(p), p) for name, p in before.items()}
            self.growth = self.growth.replaced(applier.rehoused)
        self._after_shape_change(stage.task, growth)
        self.growth = combine_growth(self.growth, growth, before, self.module)
        self.freeze(index)
        return growth, before

    def _after_shape_change(self, task: str, growth: StageGrowth) -> None:
        self.module.to(self.device)
        self._claim(task, growth)
        if self.plan.train.checkpointing:
            speed.enable_checkpointing(self.module, self.view)  # new blocks too

    def freeze(self, index: int) -> None:
        self.stage_index, self.policy = index, self.plan.stages[index].freeze
        self.freezer.apply(self.module, self.policy, self.growth, cut=fsdp.shard_like if self.sharded else None)

    def rebuild(self, stages: int, growths: list[dict], weights: dict | None = None,
                task_modules: dict | None = None) -> None:
        """A plain model of the shape the first `stages` stages (and `growths`) gave, with `weights`
        (or, when None, the caller loads them): a resume's model, or an FSDP run's gathered one."""
        if self.sharded or weights is not None:  # a fresh module: the sharded one cannot be unsharded
            from engine.model.sources import load_model, placeholder_model

            if weights is None and self.fsdp and self.task_modules is None:
                # an FSDP resume: the shape on the meta device, sharded before it has values (``shard``)
                self.module, self.view = load_model(self.plan.model, self.plan.seed,
                                                    attention=self.plan.train.attention, skeleton=True)
            else:
                self.module, self.view = placeholder_model(self.plan.model, self.plan.seed,
                                                           attention=self.plan.train.attention)
            self.sharded = False
        self.growth = replay_expansions(self.module, self.view, self.plan, stages, growths)
        if self.task_modules is not None and task_modules:
            self.task_modules = TaskModules.from_json(task_modules, self.module)
            self.active_task = None
        if not any(p.is_meta for p in self.module.parameters()):
            self.module.to(self.device)
        if weights is not None:
            self.module.load_state_dict(weights)
        if self.plan.train.checkpointing:
            speed.enable_checkpointing(self.module, self.view)

    def load_carried(self, optimizer) -> None:
        """Give `optimizer` (new, over the sharded model grown unit by unit) the moments carried
        then (``self.carried``, by name); entries whose gradient is masked get zero moments, as
        ``carry_optimizer_state`` gives them."""
        from engine.grow.growth import _fit_group, zero_masked_moments

        params = dict(self.module.named_parameters())
        for group in optimizer.param_groups:
            trains = {id(p) for p in group["params"]}
            for name, p in params.items():
                state = (self.carried or {}).get(name)
                if id(p) in trains and state:
                    optimizer.state[p] = _fit_group(dict(state), group, p)
        zero_masked_moments(optimizer, self.freezer.masked)
        self.carried = None

    # ------------------------------------------------------------------ placement
    def make_optimizer(self, stage):
        return make_optimizer(self.module, self.freezer.masked, self.plan.train, stage, self.restarts,
                              view=self.view, base_depth=self.base_depth)

    def shard(self, optimizer=None, scheduler=None):
        """FSDP: shard the whole model (and move `optimizer`'s state, if given, to a new optimizer
        over the shards). Otherwise nothing. Returns the optimizer and schedule to go on with."""
        if not self.fsdp or self.sharded:
            return optimizer, scheduler
        state = optimizer.state_dict() if optimizer is not None else None
        schedule = scheduler.state_dict() if scheduler is not None else None
        masks = self.freezer.masks_by_name(self.module)
        names = {id(p): name for name, p in self.module.named_parameters(remove_duplicate=False)}
        fsdp.shard(self.module, self.view)
        if any(p.is_meta for p in self.module.parameters()):  # a resume's shape: each rank's shards get memory
            from engine.model.sources import materialize_skeleton

            materialize_skeleton(self.module, self.device)
        self.sharded = True
        self.growth = self.growth.moved(names, dict(self.module.named_parameters(remove_duplicate=False)))
        self.freezer.remask(self.module, masks, fsdp.shard_like)
        if optimizer is None:
            return None, None
        optimizer, scheduler = self.make_optimizer(self.plan.stages[self.stage_index])
        fsdp.load_optimizer_state(optimizer, state)
        scheduler.load_state_dict(schedule)
        return optimizer, scheduler

    def gather(self, stages: int, growths: list[dict], optimizer=None, scheduler=None):
        """FSDP: the model whole again, on every rank (rebuilt, with the gathered weights); with
        `optimizer`, a new one over the whole model carrying its gathered state. Otherwise nothing."""
        if not self.sharded:
            return optimizer, scheduler
        weights = fsdp.full_state_dict(self.module)
        state = fsdp.full_optimizer_state(optimizer) if optimizer is not None else None
        schedule = scheduler.state_dict() if scheduler is not None else None
        self.rebuild(stages, growths, weights, self.task_modules.to_json() if self.task_modules else None)
        self.freeze(self.stage_index)
        if optimizer is None:
            return None, None
        optimizer, scheduler = self.make_optimizer(self.plan.stages[self.stage_index])
        optimizer.load_state_dict(state)
        scheduler.load_state_dict(schedule)
        return optimizer, scheduler

    def trainee(self) -> torch.nn.Module:
        """What the steps run through: DDP over the model (re-made after each shape change: DDP
        hooks the parameters it was built with), the sharded model itself, compiled if asked.
        The routers the model has now are hooked (an upcycle or a rebuild changes them)."""
        self.routers.sync(self.module, self.view)
        module = self.module if self.fsdp else self.world.wrap(self.module)
        return speed.compiled(module, self.plan.train)

    def no_sync(self, trainee, last: bool):
        """Gradient accumulation: no gradient exchange but at the last micro-batch of a step."""
        if last or not self.world.distributed:
            return nullcontext()
        if self.fsdp:
            return _without_gradient_sync(self.module)
        return trainee.no_sync() if hasattr(trainee, "no_sync") else nullcontext()

    def forward_backward(self, trainee, batch, precision, optimizer, trainable: int):
        """Forward and backward of this rank's rows of a step, in `grad_accum` micro-batches (the
        gradients exchanged once, at the last); returns this rank's mean language-model loss, the
        gradient norm (clipped to `grad_clip`) and the vocabulary size. A mixture of experts trains
        on that loss plus its routers' weighted losses (``self.routers``: their window keeps them)."""
        from engine.model.forward import batch_to, forward_logits, loss_of

        train, scaler = self.plan.train, precision.scaler
        accum, losses, grad_norm = train.grad_accum, [], None
        for i, micro in enumerate(speed.micro_batches(batch, accum)):
            inputs, targets = batch_to(micro, self.device)
            with self.no_sync(trainee, last=i == accum - 1):
                with precision.autocast(), self.routers.capture():
                    logits = forward_logits(trainee, inputs)
                loss = loss_of(logits, targets)
                routed = self.routers.loss()   # None for a dense model
                total = loss if routed is None else loss + routed
                if trainable:
                    scaler.scale(total / accum if accum > 1 else total).backward()
            losses.append(loss.detach())
        self.routers.end_step()
        if trainable:
            self.freezer.mask_gradients(self.module)
            grads = self.training_parameters(optimizer)
            if train.grad_clip:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(grads, train.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads if p.grad is not None])
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss = losses[0] if accum == 1 else torch.stack(losses).mean()
        return loss, grad_norm, logits.shape[-1]

    def training_parameters(self, optimizer) -> list:
        """The parameters that train, in module order (the gradient norm sums in this order).
        Walking the module tree costs about half a millisecond a step on the built-in model
        (benchmarks/loop_overhead.py), so the list is kept per optimizer: every change of shape or
        of freezing builds a new optimizer."""
        if self._trains is None or self._trains[0]() is not optimizer:
            self._trains = (weakref.ref(optimizer), [p for p in self.module.parameters() if p.requires_grad])
        return self._trains[1]

    # ------------------------------------------------------------------ checkpoint contents
    def weights(self):
        """What a checkpoint saves: the model, or (sharded) this rank's shards of its state dict
        (``checkpoint.ShardedWeights``: written by every rank into DCP, never gathered)."""
        return sharded_weights(self.module) if self.sharded else self.module

    def optimizer_state(self, optimizer) -> dict | ShardedMoments:
        """torch's state_dict(), or (sharded) this rank's shards of it keyed by FQN."""
        return sharded_moments(self.module, optimizer) if self.sharded else optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict | ShardedMoments) -> None:
        """A checkpoint's optimizer state into `optimizer`, whichever layout saved it and however
        the model is placed now: DCP moments are read as each parameter is laid out (sharded:
        its slices, a collective); whole moments are cut to the shards, or loaded as they are."""
        if isinstance(state, ShardedMoments):
            load_sharded_moments(self.module, optimizer, state)
        elif self.sharded:
            fsdp.load_optimizer_state(optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def task_tensors(self) -> dict | None:
        """Each task's own tensors (whole: gathered under FSDP), for the checkpoint's tasks/ files."""
        if self.task_modules is None:
            return None
        memo: dict = {}
        return {task: {k: fsdp.whole(v, memo).detach() for k, v in self.task_modules.state_dict(task, self.module).items()}
                for task in self.task_modules.tasks()}


@contextmanager
def _without_gradient_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
