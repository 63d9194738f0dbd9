"""Applying a stage's operators with measurement, and the freezing policies.

Every application is measured on a fixed probe batch: parameters before/after, the largest
change of any logit, and the loss just before and after. Preservation is a number, not a claim.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field

import torch

from engine.errors import WidenError
from engine.model.forward import forward_logits, loss_of
from engine.model.view import count_params
from engine.ops import health as health_metrics
from engine.ops.registry import OpResult, apply_operator


def op_generator(seed: int, stage: int) -> torch.Generator:
    """The generator a stage's operators draw from: the same in a run, a resume and an export.
    (Automatic growths draw from engine.grow.growth.growth_generator.)"""
    return torch.Generator().manual_seed(seed * 1000 + stage)


@torch.no_grad()
def probe(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits (float32) and mean loss on the probe batch, in eval mode."""
    was_training = model.training
    model.eval()
    logits = forward_logits(model, inputs).float()
    loss = loss_of(logits, targets).item()
    model.train(was_training)
    return logits, loss


def whole_tensor(value: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value: a sharded one (FSDP's DTensor) gathered (a collective)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def new_unit_health(model, result: OpResult, inputs, targets) -> dict:
    """At expansion: gradient norm of what the operator added (zero: the units cannot learn), the
    share of dead new units, and how alike the new units are."""
    params = list(result.new_params) + [p for p, _ in result.grown]
    if not params:  # e.g. virtual repeats: nothing new to learn, nothing to diagnose
        return {"new_grad_norm": None, "dead_share": None}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    loss_of(forward_logits(model, inputs), targets).backward()
    total = 0.0
    for p in result.new_params:
        if p.grad is not None:
            total += float(whole_tensor(p.grad).float().pow(2).sum())
    for p, mask in result.grown:
        if p.grad is not None:
            total += float((whole_tensor(p.grad).float() * mask).pow(2).sum())
    health = {"new_grad_norm": math.sqrt(total), "dead_share": health_metrics.dead_share(result.units),
              **health_metrics.similarity_report(result.units)}
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(saved[id(p)])
    return health


@dataclass
class StageGrowth:
    """What a stage's operators added: the freezing policy `base` trains exactly this."""

    results: list[OpResult] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)

    def moved(self, names: dict[int, str], params: dict[str, torch.nn.Parameter]) -> "StageGrowth":
        """The same growth over the model's new parameter objects (FSDP's shards replace them):
        `names` maps each old parameter's id to its name, `params` holds the new ones by name.
        Masks stay whole (``Freezer.apply`` cuts them)."""
        return self.replaced({id_: params[name] for id_, name in names.items()}, strict=True)

    def replaced(self, new_of: dict[int, torch.nn.Parameter], strict: bool = False) -> "StageGrowth":
        """The same growth with each parameter whose id `new_of` maps replaced by its new object
        (`strict`: every parameter must be mapped)."""
        def new(p):
            return new_of[id(p)] if strict or id(p) in new_of else p

        results = [dataclasses.replace(
            r, new_params=[new(p) for p in r.new_params], grown=[(new(p), m) for p, m in r.grown],
            units=[dataclasses.replace(u, up=new(u.up), down=new(u.down)) for u in r.units],
            splits=[dataclasses.replace(s, param=new(s.param)) for s in r.splits],
            placements=[dataclasses.replace(pl, param=new(pl.param)) for pl in r.placements],
            copies=[(new(c), new(src)) for c, src in r.copies]) for r in self.results]
        return StageGrowth(results, self.reports)


class OperatorError(WidenError, ValueError):
    """An operator that does not fit the model as it is at that point of the plan (found when it
    is applied: some fits need the built model, not only its config)."""


def apply_stage(model, view, stage_index: int, specs, batch, generator: torch.Generator,
                measure: bool = True, applier=None) -> StageGrowth:
    """Apply the stage's operators in order. With `measure`, each gets a report (no training).
    `applier` (engine.train.unit_growth.UnitByUnit: a sharded model grown one unit at a time)
    applies each operator instead of ``apply_operator`` and holds the model as it is after it."""
    growth = StageGrowth()
    inputs, targets = batch if measure else (None, None)
    view.stage_index = stage_index  # adapters name themselves after their stage ("lora_stage1")
    view.probe_inputs = inputs  # operators that read data (upcycle's k-means router); None: unmeasured
    for spec in specs:
        params = spec.params()
        before = count_params(model)
        if measure:
            logits_before, loss_before = probe(model, inputs, targets)
        try:
            if applier is None:
                result = apply_operator(view, params, generator)
            else:  # the earlier operators' tensors that it re-made with their values follow
                result = applier(params, generator)
                model, view = applier.module, applier.view
                growth.results = growth.replaced(applier.remade).results
        except ValueError as e:  # operators state what does not fit the model as a ValueError
            raise OperatorError(f"stage {stage_index}: {params.op}: {str(e).splitlines()[0]}") from e
        for key, value in result.config_changes.items():
            setattr(model.config, key, value)
        growth.results.append(result)
        if not measure:
            continue
        logits_after, loss_after = probe(model, inputs, targets)
        after = count_params(model)
        added = after - before
        growth.reports.append({
            "stage": stage_index,
            "op": params.op,
            "layers": getattr(params, "layers", None),
            "settings": params.model_dump(exclude={"op", "layers"}),
            "params_before": before,
            "params_after": after,
            "params_added": added,
            "exact": result.exact,
            "max_abs_logit_delta": float((logits_after - logits_before).abs().max()),
            "loss_before": loss_before,
            "loss_after": loss_after,
            "ppl_before": math.exp(loss_before),
            "ppl_after": math.exp(loss_after),
            **new_unit_health(model, result, inputs, targets),
            "note": result.note,
        })
    return growth


def true_entries(mask: torch.Tensor) -> int:
    """True entries of a mask; one broadcast along some dims (stride 0: the preview's masks of
    meta tensors) is counted over its distinct entries, not over the full weight's size."""
    broadcast = [d for d, (size, stride) in enumerate(zip(mask.shape, mask.stride())) if stride == 0 and size > 1]
    distinct, copies = mask, 1
    for d in broadcast:
        distinct, copies = distinct.narrow(d, 0, 1), copies * mask.shape[d]
    return int(distinct.sum()) * copies


def takes_weight_decay(p: torch.Tensor, masked) -> bool:
    """Matrices decay; biases, norms and tensors that train only their grown entries (`masked`:
    ids, ``Freezer.masked``) do not — decay would move their frozen entries."""
    return id(p) not in masked and p.ndim >= 2


class Freezer:
    """Applies a stage's freezing policy; grown tensors train only their new entries (a gradient
    mask), and are kept out of weight decay so the frozen entries stay exactly as they were."""

    def __init__(self):
        self._hooks = []
        self.masked: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}   # id -> entries that train, of each masked tensor
        self.hooked = True                   # False: masks applied by `mask_gradients` (FSDP)

    def _mask(self, p, mask: torch.Tensor, count: int | None = None) -> None:
        self.masked[id(p)] = mask
        if count is None and mask.is_meta:  # a mask without values (the preview, on meta): no count
            count = 0
        self._counts[id(p)] = true_entries(mask) if count is None else count
        if self.hooked:
            self._hooks.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

    def _reset(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self.masked, self._counts = [], {}, {}

    def apply(self, model, policy, growth: StageGrowth, cut=None) -> None:
        """`cut(mask, param)`: the model is sharded (FSDP) and each whole mask is cut as its
        parameter is; the gradients are then masked in `mask_gradients`, as after `remask`."""
        self._reset()
        self.hooked = cut is None
        if policy == "none":
            for p in model.parameters():
                p.requires_grad_(True)
        elif policy == "base":
            for p in model.parameters():
                p.requires_grad_(False)
            for result in growth.results:
                for p in result.new_params:
                    p.requires_grad_(True)
                for p, mask in result.grown:
                    p.requires_grad_(True)
                    if cut is None:
                        self._mask(p, mask)
                    else:
                        self._mask(p, cut(mask, p), true_entries(mask))
        else:  # a list of globs naming what to freeze
            for name, p in model.named_parameters():
                p.requires_grad_(not any(fnmatch.fnmatch(name, pattern) for pattern in policy))

    def masks_by_name(self, model) -> dict[str, tuple[torch.Tensor, int]]:
        return {name: (self.masked[id(p)], self._counts[id(p)]) for name, p in model.named_parameters()
                if id(p) in self.masked}

    def remask(self, model, masks: dict[str, tuple[torch.Tensor, int]], cut) -> None:
        """After sharding (new parameter objects, whose gradients FSDP assigns rather than
        accumulates, so hooks would not see them): `cut` each mask as its parameter is, and mask
        the gradients in `mask_gradients`. requires_grad carries over the sharding."""
        self._reset()
        self.hooked = False
        for name, p in model.named_parameters():
            if name in masks:
                mask, count = masks[name]
                self._mask(p, cut(mask, p), count)

    def mask_gradients(self, model) -> None:
        if self.hooked:
            return
        for p in model.parameters():
            mask = self.masked.get(id(p))
            if mask is not None and p.grad is not None:
                p.grad.mul_(mask.to(p.grad.dtype))

    def trainable(self, model) -> int:
        total = 0
        for p in model.parameters():
            if p.requires_grad:
                total += self._counts[id(p)] if id(p) in self.masked else p.numel()
        return total

