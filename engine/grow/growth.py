"""Progressive growth during training: when to grow, how the optimizer state follows the grown
model, and the measured growth itself.

A stage with a ``grow`` table (engine.plan.GrowSpec) grows when its trigger fires
(engine.grow.triggers, re-exported here; one class per ``trigger``, each fed a ``Progress`` after
every optimizer step, at most one growth per step, its counters saved with every checkpoint):

- ``plateau`` (PlateauDetector): the mean training loss of each `check_interval` steps has
  stopped improving (ReduceLROnPlateau's test), at most `max_growths` times;
- ``at`` (AtTrigger): after the stage steps `at_steps`, or once the run has seen the tokens
  `at_tokens` (G_stack, Staged Training: growth at fixed points of the schedule);
- ``budget`` (BudgetTrigger): once the run's training FLOPs (the loop's ``history.flops``) reach
  each share `at_fractions` of `budget_flops`. For at and budget, one growth per point; a point
  the stage does not reach before its last step grows nothing.

The trainer then grows the model in place (``grow_model``, a thin wrapper over
``engine.grow.apply.apply_stage``), rebuilds its AdamW over the trainable parameters and carries the
old optimizer's state over (``carry_optimizer_state``), so training continues where it was
instead of restarting Adam from zero moments.

The trainer's sequence at a growth (inside a stage, between two optimizer steps)::

    if trigger.update(Progress(step, tokens, flops, loss=mean_loss_at_a_check_or_None)):  # GrowSpec
        before = dict(model.named_parameters())                  # 1. pre-growth names -> tensors
        grown = grow_model(model, view, spec.expand, stage, g, probe,
                           growth_generator(seed, stage, g))     # 2. grow + measure (g = 0, 1, ..)
        model.to(device)
        stage_growth = combine_growth(stage_growth, grown, before, model)  # 3. all the stage added
        freezer.apply(model, stage.freeze, stage_growth)         # 4. trainable set, gradient masks
        new_opt, new_sched = trainer._optimizer(stage)           # 5. fresh AdamW over trainables
        carry_optimizer_state(opt, new_opt, before, model, grown, masked=freezer.masked)  # 6.
        continue_schedule(sched, new_sched)                      # 7. the lr schedule's position

A resume replays the growths unmeasured (``grow_model(..., probe_batch=None, ...)`` with the
same generators) before loading the checkpoint's weights, optimizer and
``trigger.state_dict()``. Under FSDP/DDP every growth — width or depth (map_layers stacking) —
takes the same path: gathered whole, grown as in one process, re-sharded / re-wrapped
(engine.train.trained_model).

The lr after a growth (``schedule_after``; the scheduler's position is always the stage step):

- ``continue`` (default): the stage's schedule goes on as if nothing happened
  (``continue_schedule``);
- ``rewarm`` (LEMON, Wang et al. 2023: the expanded model trains best with the small model's
  peak lr and a faster decay): from the growth's step r the lr is back at the peak and decays
  with the schedule's shape over the steps left, progress (step - r) / (steps - r), no second
  warm-up (``engine.train.optim.LrSchedule``'s `restarts`; every growth of the stage restarts it). The
  restarts are the stage's growth steps in ``history.growths``, so a resume rebuilds them. Under
  ``schedule = "wsd"`` a rewarm goes back to the peak and keeps the decay at the end of the stage
  (the stable phase goes on); ``rewarm_steps`` (SPARKLING) climbs back linearly instead of jumping.

The optimizer state at a growth (``optimizer_state``; ``apply_state_policy`` after the carry):

- ``carry`` (default): the rules below — old entries keep their state, split units' moments are
  transformed with the weights, copies take their source's (Staged Training);
- ``reset``: a fresh AdamW over the grown model (zero moments, step 0), as a naive restart;
- ``asymmetric`` (SPARKLING, Yu et al. 2026): the old entries keep their carried state, every new
  entry starts from zero moments — new units of grown tensors (copies of split units included:
  their outgoing share no longer follows the source's moments), copied blocks and experts, new
  tensors. With ``schedule_after = "rewarm"`` and ``rewarm_steps`` it is the paper's recipe for
  width growth mid-training, except that the re-warm-up applies to the whole model (one lr per
  AdamW group, not per entry). Under FSDP it gathers the model for the growth.

Operators that copy units default to exact symmetry breaking inside a growth
(``OpParams.growth_defaults``, filled in by GrowSpec, so the plan dump says it): widen_ffn /
widen_mlp net2net and copy_halve, widen_hidden duplicate and lossless take symmetry = "noise"
unless the plan sets symmetry. Net2WiderNet's copies have the same incoming weights and, read
through equal outgoing shares, the same gradients: they stay twins for ever (twin cosine 1.000
after training; engine.ops.health warns after the stage when it stays above 0.99). "noise" adds to
the outgoing weights of a unit's slots paired noise that sums to zero (HyperCloning), "split"
gives them unequal shares (1 ± scale)/c (LEMON's α + β = 1, α ≠ β); both keep the function
exactly, as the copies' activations are equal. Under Adam a split breaks the twins only weakly:
the copies' incoming gradients stay proportional (share × the source's) while their outgoing
columns are, and Adam's step ignores a gradient's scale — hence "noise" as the default. At a
stage start the operators' own defaults (symmetry = "none") stay: the classic Net2Net.

How the state is carried (AdamW keeps per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq``
(v) and, with amsgrad, ``max_exp_avg_sq``; torch 2.13):

- the same Parameter object still in the model: its state is moved as it is;
- a Parameter the operator replaced by a larger one (in-place widening): found by name in
  `before`; old entries get their old state, new entries zero moments, all share the old step;
- entries that copy (split) an old unit (``OpResult.splits``: Net2WiderNet / copy_halve in
  place): the moments are grown with the same replication as the weights and rescaled, see below;
- new Parameters that are real copies of a live one (``OpResult.copies``: map_layers' real
  repeats, e.g. G_stack's ``repeat = g``): their source's state, copied — moments and step
  (Staged Training's rule for depth: the state is copied with the weights). A virtual repeat
  holds its source's Parameter itself, so it shares the state as it shares the tensor;
- new Parameters holding old tensors' values elsewhere (``OpResult.placements``: an upcycled
  FFN's gate and up as slices of the fused experts tensor, its down as each expert's): each
  placed region gets its source's moments, unscaled, the rest zero moments, the step the
  sources' (an expert's gradient is its routing weight times the FFN's, a scale Adam's step
  does not see; the moments' weight against new gradients shifts by it — docs/moe.md);
- other new Parameters (parallel paths, adapters, inserted identity blocks): fresh state (torch
  starts them at step 0, so their bias correction is their own).

Why that rescaling (Staged Training, Shen et al. 2022: grow the optimizer state with the same
function-preserving transformation as the weights). Adam's update of an entry is
lr · m̂ / (sqrt(v̂) + eps): invariant to a constant scale of the entry's gradients. Take a unit
replicated into c slots, its outgoing weights divided by c. At the same function,

- each copy of its *incoming* weights gets 1/c of the source's gradient (it is read through
  w/c). With m -> m/c and v -> v/c², the copy's moments are exactly those of a gradient history
  scaled by 1/c, so (up to eps) its Adam update equals the source's update in the small model
  at every later step: every copy's pre-activation follows the small model's unit exactly.
- each copy of its *outgoing* weights gets the source's full gradient (same activation), but
  the function reads the sum of the c copies. Equal moments would move every copy by the
  source's step — the sum by c steps. Adam's step size cannot be changed by scaling gradients,
  so no transformation of (m, v) makes this exact for every future gradient. The closest one
  keeps m (the gradients are unchanged) and multiplies v by c²: the step shrinks to 1/c while the
  moment history dominates v, and the sum of the copies moves like the source. The error comes
  only from the fresh gradient's weight (1 - beta2) in the next v: relative to v it is about
  (1 - 1/c²)·(1 - beta2) per step late in training (0.075 % for c = 2, beta2 = 0.999) and up
  to (1 - 1/c²)/(t + 1) after t steps early on. The inflated v then decays over ~1/(1 - beta2)
  steps, so the new units move from the small model's dynamics to their own learning rate.

With unequal outgoing shares (widen_ffn symmetry = "split": slot r reads share_r · w, the
shares of a unit summing to 1) the same reasoning gives incoming m -> share·m, v -> share²·v and
outgoing v -> v / share² (the Split records grad_scale = share, divisor = 1/share); with paired
outgoing noise the equal-share rule is kept (the noise is not a division: approximate).

In general, per split axis, an entry whose value was divided by `divisor` and whose gradient is
`grad_scale` times the source's gets m -> grad_scale·m, v -> (grad_scale·divisor)²·v (factors of
several split axes multiply). Dividing the outgoing moments by c and c² like the weights (the
literal reading of "the same transformation") does not shrink the step: m/c over sqrt(v/c²) is
the source's full step again (the sum still moves c times), with the fresh gradient weighted c
times more. tests/engine/grow/test_growth.py measures these rules against each other and naive carrying.

Splitting operators that record no splits fall back to the mask rule (old entries keep their
state unscaled): widen_mlp in place (engine/ops/linear.py would need
``result.splits.extend(wide.splits)``) and widen_hidden "duplicate" (its grower would record,
per doubled axis, grad_scale 1/2 for written entries — rows, embeddings, norms — and divisor 2
for read entries — the [W/2, W/2] input columns, and the halved final norm under a tied head).

Caveat of zero moments with the common step (new entries of a grown tensor): Adam's bias
correction uses the tensor's step t, so once t is large the first update of those entries is
about (1 - beta1)/sqrt(1 - beta2) ≈ 3 lr for a steady gradient (≈ 6.5 lr ten steps later, back
to ~lr over ~1/(1 - beta2) steps) where a fresh tensor would take lr.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from engine.grow.apply import StageGrowth, apply_stage
from engine.grow.triggers import AtTrigger, BudgetTrigger, PlateauDetector, Progress, make_trigger
from engine.ops.registry import OpResult, Split

__all__ = ["AtTrigger", "BudgetTrigger", "PlateauDetector", "Progress", "apply_state_policy", "carry_optimizer_state",
           "combine_growth",
           "continue_schedule", "grow_model", "growth_generator", "make_trigger"]

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's elementwise state (torch 2.13)


# ---------------------------------------------------------------------------------------------
# the growth itself


def growth_generator(seed: int, stage: int, growth: int) -> torch.Generator:
    """The generator the operators of growth number `growth` (0, 1, ...) of a stage draw from:
    the same in a run and its resume, and different from the stage's own operators'
    (engine.train.build.op_generator draws from seed·1000 + stage)."""
    return torch.Generator().manual_seed((seed * 1000 + stage) * 1000 + 1_000_003 * (growth + 1))


def grow_model(model, view, specs, stage_index: int, growth_index: int, probe_batch,
               generator: torch.Generator, applier=None) -> StageGrowth:
    """apply_stage for one growth: each report is measured on `probe_batch` (parameters added,
    max |Δlogits|, loss before/after, new-unit health) and tagged ``growth = growth_index``.
    `probe_batch` None: unmeasured (replaying a checkpoint's growths)."""
    growth = apply_stage(model, view, stage_index, specs, probe_batch, generator, measure=probe_batch is not None,
                         applier=applier)
    for report in growth.reports:
        report["growth"] = growth_index
    return growth


# ---------------------------------------------------------------------------------------------
# carrying entries of a tensor onto its grown replacement


def _splits_by_param(results: list[OpResult]) -> dict[int, list[Split]]:
    out: dict[int, list[Split]] = {}
    for result in results:
        for split in getattr(result, "splits", []):
            out.setdefault(id(split.param), []).append(split)
    return out


def _masks_by_param(results: list[OpResult]) -> dict[int, torch.Tensor]:
    return {id(p): mask for result in results for p, mask in result.grown}


def _carry(old: torch.Tensor, new: torch.Tensor, splits: list[Split] | None, mask: torch.Tensor | None,
           kind: str) -> torch.Tensor | None:
    """`old` (shaped like the old parameter) placed in a tensor shaped like `new`:

    - `splits`: gathered along each split axis (slot i takes old index source[i]) and, for
      kind "m" / "v", multiplied by grad_scale / (grad_scale·divisor)²;
    - else `mask` (True = new entry): old values where the mask is False, in order, zeros elsewhere;
    - else the same shape: a copy.

    None when the shapes do not fit (e.g. a tensor grown twice in one growth)."""
    if splits:
        t, scale = old, None
        for split in splits:
            t = t.index_select(split.dim, split.source.to(t.device))
            if kind in ("m", "v"):
                factor = split.grad_scale if kind == "m" else (split.grad_scale * split.divisor) ** 2
                shape = [1] * t.ndim
                shape[split.dim] = -1
                factor = factor.to(t.device, torch.float32).reshape(shape)
                scale = factor if scale is None else scale * factor
        if t.shape != new.shape:
            return None
        return (t.float() * scale).to(t.dtype) if scale is not None else t.clone()
    if mask is not None and mask.shape == new.shape:
        keep = ~mask.to(old.device)
        if int(keep.sum()) != old.numel():
            return None
        out = torch.zeros(new.shape, dtype=old.dtype, device=old.device)
        out[keep] = old.reshape(-1)
        return out
    return old.clone() if old.shape == new.shape else None


def _predecessor(p: torch.nn.Parameter, names: list[str], before: dict, live: set[int]):
    """The pre-growth Parameter that `p` replaced: the one `before` names like `p`, now gone."""
    for name in names:
        old = before.get(name)
        if old is not None and old is not p and id(old) not in live:
            return old
    return None


def combine_growth(earlier: StageGrowth, later: StageGrowth, before: dict, model) -> StageGrowth:
    """What a stage has added once a growth is applied: `earlier` (the stage's operators and any
    previous growths) followed by `later` (this growth), for ``Freezer.apply`` (freeze = "base").

    A tensor that `earlier` grew and `later` replaced keeps its earlier new entries marked new
    (carried through the later growth's splits or mask, as the optimizer state is); what is no
    longer in the model is dropped."""
    current = dict(model.named_parameters(remove_duplicate=False))
    live = {id(p) for p in current.values()}
    earlier_masks = _masks_by_param(earlier.results)
    later_masks, later_splits = _masks_by_param(later.results), _splits_by_param(later.results)
    carried: dict[int, torch.Tensor] = {}  # id of a later-grown tensor -> its combined mask
    for name, old in before.items():
        new = current.get(name)
        if id(old) not in earlier_masks or id(old) in live or new is None:
            continue
        if id(new) in later_masks or id(new) in later_splits:
            old_new = _carry(earlier_masks[id(old)], new, later_splits.get(id(new)), None
                             if id(new) in later_splits else later_masks.get(id(new)), "copy")
            if old_new is not None:
                mask = later_masks.get(id(new), torch.zeros(new.shape, dtype=torch.bool))
                carried[id(new)] = mask.to(old_new.device) | old_new
    results = [dataclasses.replace(r, new_params=[p for p in r.new_params if id(p) in live],
                                   grown=[(p, m) for p, m in r.grown if id(p) in live],
                                   splits=[s for s in r.splits if id(s.param) in live],
                                   placements=[pl for pl in r.placements if id(pl.param) in live],
                                   units=[u for u in r.units if id(u.up) in live and id(u.down) in live])
               for r in earlier.results]
    results += [dataclasses.replace(r, grown=[(p, carried.get(id(p), m)) for p, m in r.grown])
                for r in later.results]
    return StageGrowth(results=results, reports=[*earlier.reports, *later.reports])


def continue_schedule(old_scheduler, new_scheduler) -> None:
    """Make `new_scheduler` (built over the new optimizer, at position 0) continue where
    `old_scheduler` was, and give the new optimizer's groups the learning rate of that position.
    For closed-form schedulers such as the trainer's LambdaLR (lr = base_lr · f(position)). The
    new scheduler keeps its own base_lrs: ``load_state_dict`` would copy the old ones, whose
    number follows the old optimizer's groups (a growth can add one: the no-decay group)."""
    new_scheduler.last_epoch = old_scheduler.last_epoch - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        new_scheduler.step()


# ---------------------------------------------------------------------------------------------
# the optimizer state


def _step_for(step, group: dict, p: torch.nn.Parameter) -> torch.Tensor:
    """The old `step`, placed where this optimizer group keeps it (CPU float32 unless capturable
    or fused: on the parameter's device)."""
    value = float(step)
    if group.get("capturable") or group.get("fused"):
        return torch.tensor(value, dtype=torch.float32, device=p.device)
    return torch.tensor(value, dtype=torch.float32)


def _fit_group(state: dict, group: dict, p: torch.nn.Parameter) -> dict:
    """Make a carried state valid for the new group (amsgrad needs its max; step placement)."""
    state["step"] = _step_for(state["step"], group, p)
    if group.get("amsgrad") and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
    if not group.get("amsgrad"):
        state.pop("max_exp_avg_sq", None)
    return state


def carry_optimizer_state(old_optimizer: torch.optim.Optimizer, new_optimizer: torch.optim.Optimizer,
                          before: dict[str, torch.nn.Parameter], model, growth: StageGrowth,
                          masked: dict[int, torch.Tensor] | None = None) -> dict:
    """Give `new_optimizer` (a fresh AdamW over the grown model's trainable parameters) the state
    `old_optimizer` had for every parameter that continues (see the module docstring for the
    rules and the reasoning). `before`: ``dict(model.named_parameters())`` captured just before
    the growth; `growth`: the growth's StageGrowth (its OpResults' `grown` masks and `splits`).
    `masked` (``Freezer.masked``: id -> mask of the entries that train): the other entries get
    zero moments, so a carried moment cannot move entries whose gradient is masked to zero.

    Parameters the old optimizer had no state for (never stepped, frozen before) and new ones
    start fresh, except real copies of a block (``OpResult.copies``), which get their source's,
    and tensors holding old tensors' values elsewhere (``OpResult.placements``: upcycled experts),
    which get their sources' moments there. Returns counts: moved, grown (entries placed by mask),
    split (moments grown through splits), copied (copies and placements), fresh, and the names of
    replaced tensors whose state could not be placed."""
    old_state = {id(p): s for p, s in old_optimizer.state.items() if s}
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    live = set(names)
    masks, splits = _masks_by_param(growth.results), _splits_by_param(growth.results)
    copied = {id(new): source for result in growth.results for new, source in getattr(result, "copies", [])}
    placed: dict[int, list] = {}
    for result in growth.results:
        for placement in getattr(result, "placements", []):
            placed.setdefault(id(placement.param), []).append(placement)
    counts = {"moved": 0, "grown": 0, "split": 0, "copied": 0, "fresh": 0, "unplaced": []}
    for group in new_optimizer.param_groups:
        for p in group["params"]:
            if id(p) in old_state:  # the same tensor: its state as it is
                new_optimizer.state[p] = _fit_group(dict(old_state[id(p)]), group, p)
                counts["moved"] += 1
                continue
            source = copied.get(id(p))
            if source is not None:  # a real copy of a block: its source's state, copied (before any
                state = old_state.get(id(source))  # name match: a dropped block may hold its name)
                if state is not None and all(state[k].shape == p.shape for k in MOMENTS if k in state):
                    carried = {k: (v.clone() if k in MOMENTS else v) for k, v in state.items()}
                    new_optimizer.state[p] = _fit_group(carried, group, p)
                    counts["copied"] += 1
                else:
                    counts["fresh"] += 1
                continue
            if id(p) in placed:  # made of old tensors' values (upcycle): their moments where they sit
                state = placed_state(p, placed[id(p)], before, old_state)
                if state is not None:
                    new_optimizer.state[p] = _fit_group(state, group, p)
                    counts["copied"] += 1
                else:
                    counts["fresh"] += 1
                continue
            old = _predecessor(p, names.get(id(p), []), before, live)
            state = old_state.get(id(old)) if old is not None else None
            if state is None:
                counts["fresh"] += 1
                continue
            carried = carried_state(state, p, splits.get(id(p)), masks.get(id(p)))
            if carried is not None:
                new_optimizer.state[p] = _fit_group(carried, group, p)
                counts["split" if id(p) in splits else "grown"] += 1
                continue
            counts["fresh"] += 1
            counts["unplaced"].append(names[id(p)][0])
    zero_masked_moments(new_optimizer, masked)
    return counts


def apply_state_policy(optimizer: torch.optim.Optimizer, growth: StageGrowth, policy: str) -> int:
    """``[stages.grow] optimizer_state`` after the carry: "carry" keeps what ``carry_optimizer_state``
    placed; "reset" empties the optimizer (a fresh AdamW: zero moments, step 0, its own bias
    correction); "asymmetric" (SPARKLING) keeps the old entries' state and gives every new entry
    zero moments — the new entries of grown tensors (the operators' `grown` masks, copies of split
    units included), and whole new tensors (copies of blocks, upcycled experts, inserted blocks,
    adapters) start fresh. Returns the number of tensors whose state was dropped or zeroed."""
    if policy == "carry":
        return 0
    if policy == "reset":
        dropped = sum(1 for state in optimizer.state.values() if state)
        optimizer.state.clear()
        return dropped
    new = {id(p) for result in growth.results for p in result.new_params}
    new |= {id(c) for result in growth.results for c, _ in getattr(result, "copies", [])}
    new |= {id(pl.param) for result in growth.results for pl in getattr(result, "placements", [])}
    masks = _masks_by_param(growth.results)
    touched = 0
    for p in list(optimizer.state):
        state = optimizer.state[p]
        if not state:
            continue
        if id(p) in new:
            del optimizer.state[p]
            touched += 1
        elif id(p) in masks:
            keep = ~masks[id(p)]
            for key in MOMENTS:
                if key in state:
                    state[key] = state[key] * keep.to(state[key].device, state[key].dtype)
            touched += 1
    return touched


def carried_state(state: dict, p: torch.Tensor, splits: list[Split] | None, mask: torch.Tensor | None) -> dict | None:
    """AdamW `state` of a tensor that `p` grew from, placed as `p` is (``_carry``: through its
    splits, else its new-entry mask); None when it does not fit (then `p` starts fresh)."""
    carried = {"step": state["step"]}
    for key in MOMENTS:
        if key in state:
            value = _carry(state[key], p, splits, mask, "m" if key == "exp_avg" else "v")
            if value is None:
                return None
            carried[key] = value.to(device=p.device, dtype=p.dtype)
    return carried


def placed_state(p: torch.Tensor, placements: list, before: dict, old_state: dict) -> dict | None:
    """AdamW state of a tensor made of old tensors' values (``Placement``): each placed region
    holds its source's moments, the other entries zero; the step is the sources' largest. None
    when no source had state (then `p` starts fresh)."""
    sourced = [(pl, old_state.get(id(before.get(pl.source)))) for pl in placements]
    sourced = [(pl, state) for pl, state in sourced if state]
    if not sourced:
        return None
    carried = {"step": max(float(state["step"]) for _, state in sourced)}
    for key in MOMENTS:
        if all(key in state for _, state in sourced):
            value = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            for pl, state in sourced:
                value[pl.index] = state[key][pl.source_index].to(value)
            carried[key] = value
    return carried


def zero_masked_moments(optimizer, masked: dict[int, torch.Tensor] | None) -> None:
    """Entries whose gradient is masked to zero (``Freezer.masked``) get zero moments, so a
    carried moment cannot move them."""
    for p, state in optimizer.state.items():
        mask = (masked or {}).get(id(p))
        if mask is not None and state:
            for key in MOMENTS:
                if key in state:
                    state[key] = state[key] * mask.to(state[key].device, state[key].dtype)
