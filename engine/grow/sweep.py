"""Mapping sweep: score stacked models (target layer i = source layer mapping[i]) without training.

The pre-experiment of virtual layer stacking: before training adapters on a stacked model,
see which mappings of source layers hurt held-out perplexity least. Nothing is copied: the
source model's own blocks are called in the order a mapping gives, which computes exactly what
``map_layers`` would build (a block keeps its own attention kind, e.g. GPT-Neo's local window).

How a model is replayed block by block, for any decoder-only family:
  1. one ordinary forward pass, with a forward pre-hook on every block, records the hidden
     states entering the stack and the arguments each block receives (attention mask, position
     embeddings / ids ... — whatever this transformers version passes; Qwen2 gives each block
     its own mask). That pass is also the reference (the unexpanded model).
  2. source block j is then called with its own recorded arguments on any hidden state.
  3. the family's final norm and the model's output embedding turn the last state into logits.
A check on the first batch replays the source's own order and compares with the reference
logits, so a model whose blocks cannot be replayed this way fails loudly instead of scoring
nonsense.

Prefix sharing: mappings sorted lexicographically are a depth-first walk of the trie of their
prefixes; keeping the stack of hidden states along the current path (depth + 1 of them) lets
each mapping reuse the prefix it shares with the previous one. ``mapping_sweep`` also times the
naive evaluation (every mapping from layer 0) in the same call and reports the speed-up, and the
block forwards each way (their ratio, ``sharing_ratio``, bounds the speed-up).

Which mappings a sweep scores (every non-decreasing one for small models, a handful of each
mapping family — DUS, bands, MIDAS, ... — at real depth, or a given list) is decided in
engine.grow.sweep_mappings, which needs no torch; its names are re-exported here.

Headless (no Typer / Textual): the CLI (`widen sweep mapping`) and the training loop both call
``mapping_sweep``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.grow.sweep_mappings import (  # noqa: F401 - the sweep's mappings, re-exported for its callers
    MAX_MAPPINGS,
    Candidate,
    SweepError,
    block_forwards,
    count_mappings,
    default_mappings,
    load_mappings,
    non_decreasing_mappings,
    one_depth,
    sharing_ratio,
    spread,
    stretched_mapping,
    sweep_candidates,
    validate_mappings,
)
from engine.model.families import UnsupportedArchitecture, family_of
from engine.model.view import get_submodule
from engine.runs.forgetting import perplexity

# Relative tolerance of the replay check (block-by-block logits vs the model's own forward).
REPLAY_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# replaying the stack block by block


@dataclass
class _BlockCall:
    """What one block received in the recorded forward pass, minus the hidden states."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args, **{**self.kwargs, "hidden_states": hidden})
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out  # some families return (h, attn)


@dataclass
class _Recorded:
    """One batch's recorded forward pass: the stack's input, each block's call, the reference."""

    hidden: torch.Tensor
    calls: list[_BlockCall]
    reference_logits: torch.Tensor | None
    targets: torch.Tensor


@dataclass
class StackReplay:
    """Calls a decoder-only model's blocks in any order (see the module docstring)."""

    model: nn.Module
    blocks: list[nn.Module] = field(init=False)
    final_norm: nn.Module = field(init=False)
    head: nn.Module = field(init=False)
    final_softcap: float | None = field(init=False)

    def __post_init__(self):
        config = getattr(self.model, "config", None)
        if config is None:
            raise SweepError("the mapping sweep needs a Hugging Face transformer (an nn.Sequential has no layer stack)")
        try:
            family = family_of(config)  # the plan's [model] family, if it names one
        except UnsupportedArchitecture as e:
            raise SweepError(str(e)) from None
        if family.kind != "causal_lm" or family.final_norm is None:
            raise SweepError(f"the mapping sweep supports decoder-only models — {family.name} ({family.kind}) "
                             "is not supported")
        self.blocks = list(get_submodule(self.model, family.blocks))
        self.final_norm = get_submodule(self.model, family.final_norm)
        self.head = self.model.get_output_embeddings()
        cap = getattr(config, family.final_softcap_field, None) if family.final_softcap_field else None
        self.final_softcap = float(cap) if cap else None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def record(self, inputs: torch.Tensor, targets: torch.Tensor) -> _Recorded:
        calls: list[_BlockCall | None] = [None] * self.num_layers
        entry: list[torch.Tensor] = []

        def hook_for(index: int):
            def hook(module, args, kwargs):
                hidden_as_kwarg = not args
                if index == 0:
                    entry.append(kwargs["hidden_states"] if hidden_as_kwarg else args[0])
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[index] = _BlockCall(tuple(args[1:]), rest, hidden_as_kwarg)
            return hook

        handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True)
                   for i, block in enumerate(self.blocks)]
        try:
            logits = self.model(input_ids=inputs, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        if not entry or any(c is None for c in calls):
            raise SweepError("the model's forward pass did not call every block of its layer stack — "
                             "the mapping sweep cannot replay this model")
        return _Recorded(entry[0], calls, logits, targets)

    def block(self, source: int, hidden: torch.Tensor, recorded: _Recorded) -> torch.Tensor:
        return recorded.calls[source](self.blocks[source], hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.final_norm(hidden))
        if self.final_softcap:  # as the model's own forward does (Gemma 2/3)
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="sum"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefix_walk(replay: StackReplay, recorded: _Recorded, ordered: list[tuple[int, ...]]):
    """Yields the loss sum of each mapping of `ordered` (sorted lexicographically) in turn: a
    depth-first walk of the prefix trie. states[k] is the hidden state after the first k layers
    of the current mapping; a mapping computes only what it does not share with the previous."""
    states, previous = [recorded.hidden], ()
    for mapping in ordered:
        shared = 0
        while shared < len(previous) and previous[shared] == mapping[shared]:
            shared += 1
        del states[shared + 1:]
        for source in mapping[shared:]:
            states.append(replay.block(source, states[-1], recorded))
        yield _loss_sum(replay.logits(states[-1]), recorded.targets)
        previous = mapping


def _from_scratch(replay: StackReplay, recorded: _Recorded, mapping: tuple[int, ...]) -> float:
    """The naive evaluation: every layer of the mapping from the stack's input."""
    hidden = recorded.hidden
    for source in mapping:
        hidden = replay.block(source, hidden, recorded)
    return _loss_sum(replay.logits(hidden), recorded.targets)


def _timed(step, device: torch.device) -> tuple[float, float]:
    _sync(device)
    start = time.perf_counter()
    loss = step()
    _sync(device)
    return loss, time.perf_counter() - start


def _replay_delta(replay: StackReplay, recorded: _Recorded) -> float:
    """Relative max |Δlogits| between the source's own order replayed and the model's output."""
    hidden = recorded.hidden
    for source in range(replay.num_layers):
        hidden = replay.block(source, hidden, recorded)
    reference = recorded.reference_logits.float()
    delta = (replay.logits(hidden).float() - reference).abs().max().item()
    return delta / max(reference.abs().max().item(), 1e-12)


def _row(mapping, loss_sum: float, tokens: int, reference: bool = False, origin: Candidate | None = None) -> dict:
    loss = loss_sum / tokens
    return {"mapping": mapping, "ppl": perplexity(loss), "loss": loss, "reference": reference,
            "family": (origin.family or None) if origin else None, "label": (origin.label or None) if origin else None}


def sweep_trained(model: nn.Module, view, spec, batches) -> dict:
    """A plan's `[sweep]` after its stages: its mappings (given, or drawn from its families, or
    generated from depth, keep_ends and limit) scored on `batches` of its task."""
    mappings = spec.mappings or sweep_candidates(view.num_layers, spec.depth, spec.keep_ends, spec.limit,
                                                 spec.families, spec.per_family, where="sweep.families")
    return {**mapping_sweep(model, batches, mappings), "task": spec.task, "depth": spec.depth}


def mapping_sweep(model: nn.Module, batches, mappings: list[list[int] | Candidate], measure_naive: bool = True) -> dict:
    """Score each mapping (target layer i = source layer mapping[i]) on `batches` — a list of
    (inputs, targets) tensors [B, T] — by mean token cross-entropy and its perplexity, with no
    training. The unexpanded model is the reference row (``"mapping": None``). A mapping may come
    as a Candidate (engine.grow.sweep_mappings): its family and label go to its row.

    Returns ``{"depth", "source_layers", "tokens", "rows", "speedup", "naive_s", "cached_s",
    "block_calls": {"cached", "naive"}, "sharing_ratio", "naive_max_loss_diff", "replay_check"}``;
    rows best first, each ``{"mapping", "ppl", "loss", "reference", "family", "label"}``. Times
    cover the evaluation of the mappings (block calls, norm, head, loss), not the recorded
    reference pass. With `measure_naive` False, the naive fields are None."""
    replay = StackReplay(model)
    batches = list(batches)
    if not batches:
        raise SweepError("no evaluation batches — give at least one (inputs, targets) batch")
    origins = {c.mapping: c for c in reversed(mappings) if isinstance(c, Candidate)}  # the first label wins
    plain = [list(c.mapping) if isinstance(c, Candidate) else c for c in mappings]
    depth = one_depth(plain)
    validated = validate_mappings(plain, replay.num_layers, depth) if plain else []
    ordered = sorted(tuple(m) for m in validated)  # the prefix walk's order: a depth-first trie walk
    device = next(model.parameters()).device
    sums = {"cached": [0.0] * len(ordered), "naive": [0.0] * len(ordered)}
    reference_sum, tokens, replay_check = 0.0, 0, 0.0
    elapsed = {"cached": 0.0, "naive": 0.0}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, (inputs, targets) in enumerate(batches):
                inputs = torch.as_tensor(inputs, device=device)
                targets = torch.as_tensor(targets, device=device)
                recorded = replay.record(inputs, targets)
                reference_sum += _loss_sum(recorded.reference_logits, targets)
                tokens += targets.numel()
                if index == 0:
                    replay_check = _replay_delta(replay, recorded)
                    if not replay_check <= REPLAY_TOLERANCE:
                        raise SweepError(f"replaying the model block by block does not reproduce its output "
                                         f"(relative max |Δlogits| {replay_check:.1e}) — the mapping sweep "
                                         f"cannot score this model")
                recorded.reference_logits = None  # [B, T, vocab]: not kept alive through the sweep
                # cached and naive steps interleave, mapping by mapping, alternating which goes
                # first: both meet the same machine load, warm-up and caches (fair timings)
                walk = _prefix_walk(replay, recorded, ordered)
                for i, mapping in enumerate(ordered):
                    steps = {"cached": lambda: next(walk),
                             "naive": lambda: _from_scratch(replay, recorded, mapping)}
                    order = ["cached", "naive"] if measure_naive else ["cached"]
                    for kind in (order if i % 2 == 0 else order[::-1]):
                        loss, seconds = _timed(steps[kind], device)
                        sums[kind][i] += loss
                        elapsed[kind] += seconds
                walk = recorded = None  # the cached hidden states go before the rows are built
    finally:
        model.train(was_training)
    rows = [_row(None, reference_sum, tokens, reference=True)]
    rows += [_row(list(m), s, tokens, origin=origins.get(m)) for m, s in zip(ordered, sums["cached"])]
    rows.sort(key=lambda r: (r["loss"], not r["reference"], r["mapping"] or []))
    cached_s, naive_s = elapsed["cached"], elapsed["naive"]
    naive_diff = max((abs(a - b) / tokens for a, b in zip(sums["cached"], sums["naive"])), default=0.0)
    calls = block_forwards(ordered)
    return {
        "depth": len(ordered[0]) if ordered else None,
        "source_layers": replay.num_layers,
        "tokens": tokens,
        "rows": rows,
        "speedup": naive_s / cached_s if measure_naive and ordered and cached_s > 0 else None,
        "naive_s": naive_s if measure_naive else None,
        "cached_s": cached_s,
        "block_calls": {"cached": calls["shared"] * len(batches), "naive": calls["naive"] * len(batches)},
        "sharing_ratio": sharing_ratio(ordered),
        "naive_max_loss_diff": naive_diff if measure_naive else None,
        "replay_check": replay_check,
    }


def sweep_after_training(trainer) -> dict:
    """A run's `[sweep]` (engine.train.loop.Trainer, its stages done): score the plan's layer mappings
    of the trained model, without training; emits a `sweep` event, returns the result."""
    spec = trainer.plan.sweep
    trainer.m.activate(None)
    trainer.model.eval()
    result = sweep_trained(trainer.model, trainer.m.view, spec, trainer.eval_sets[spec.task])
    best = next((r for r in result["rows"] if not r["reference"]), None)
    reference = next((r for r in result["rows"] if r["reference"]), None)
    trainer.emit("sweep", task=spec.task, depth=spec.depth, rows=len(result["rows"]), best=best,
                 reference_ppl=reference and reference["ppl"], speedup=result.get("speedup"))
    return result
