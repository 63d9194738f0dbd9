"""Mixture-of-experts training: the routers' auxiliary losses and what the routers did.

``Routers`` puts a forward hook on the router of every sparse block (found through the family's
``MoELayout``: ``<block>.<moe.module>.<moe.router>``; a block holds experts when the layout's
experts module is there, so a native Mixtral and a Llama whose FFNs were upcycled mid-run are
treated alike). While the training step's forward runs inside ``capture()``, each hook keeps its
router's logits (for the losses) and adds to the window's statistics on the device, without a
host sync. Outside ``capture()`` (evaluation, probes, the recomputed forward of activation
checkpointing) the hooks return at once. A dense model has no router, no hook, no cost.

The losses, added to the language-model loss with the plan's coefficients
(``[train] router_aux_loss_coef``, ``router_z_loss_coef``; by default the model config's own,
``MoELayout.aux_loss_field`` / ``z_loss_field``):

- load balancing (Switch Transformer eq. 4-6, as transformers' ``load_balancing_loss_func``
  computes it for Mixtral, Qwen-MoE, OLMoE and GPT-OSS): over the sparse layers' tokens pooled,
  f_e = the share of tokens routed to expert e among its top-k (Σ_e f_e = top_k), P_e = the mean
  router probability of e, loss = E · Σ_e f_e · P_e (1·top_k when balanced);
- router z-loss (ST-MoE): the mean over tokens and layers of logsumexp(router logits)².

Under torchrun f_e is the global batch's (the ranks' counts summed, one small all-reduce per
micro-batch) and P_e the rank's own: the ranks' gradients then average to one process's.

``drain()`` gives, once per log step, what the routers did since the last one (``RoutingWindow``):
per sparse layer the share of routed tokens each expert got, the experts that got none, the mean
router entropy; and the losses' values (the `experts` event, engine.runs.records.ExpertsEvent).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.model.view import get_submodule, holds_experts


@dataclass
class _LayerWindow:
    """One sparse layer's statistics since the last log step, on the device."""

    counts: torch.Tensor           # [E] routed (token, slot) pairs per expert (int64: exact however long)
    entropy: torch.Tensor          # Σ over tokens of the router's entropy (nats, float64)
    tokens: torch.Tensor           # tokens routed (int64)


@dataclass
class RoutingWindow:
    """What the routers did over `steps` training steps (all ranks together)."""

    steps: int
    top_k: int
    aux_coef: float
    z_coef: float
    layers: list[dict] = field(default_factory=list)   # engine.runs.records.ExpertLayer's fields
    aux_loss: float | None = None      # the load-balancing loss, mean over the window's steps
    z_loss: float | None = None        # the router z-loss, likewise
    last_extra: float = 0.0            # the last step's coef·aux + z_coef·z (its total minus its LM loss)

    def total_loss(self, lm_loss: float | None) -> float | None:
        """The last step's training loss: its language-model loss plus the routers' terms."""
        return None if lm_loss is None else lm_loss + self.last_extra

    def event_fields(self) -> dict:
        """The `experts` event's fields besides its position."""
        return {"steps": self.steps, "top_k": self.top_k, "aux_loss": self.aux_loss, "aux_coef": self.aux_coef,
                "z_loss": self.z_loss, "z_coef": self.z_coef, "layers": self.layers}


def coefficient(plan_value: float | None, config, field_name: str | None) -> float:
    """The plan's coefficient, or (None) the config's own under `field_name` (0 without one)."""
    if plan_value is not None:
        return float(plan_value)
    value = getattr(config, field_name, None) if field_name else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def sparse_routers(module: nn.Module, view) -> list[tuple[int, nn.Module]]:
    """(block index, router module) of every block of `module` that holds experts."""
    moe = getattr(view.family, "moe", None)
    if moe is None or view.family.kind != "causal_lm":
        return []
    return [(i, get_submodule(block, f"{moe.module}.{moe.router}"))
            for i, block in enumerate(view.blocks()) if holds_experts(view.family, block)]


def _router_output(output, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [tokens, E], chosen experts [tokens, k]) from what a router returned: transformers'
    routers return (logits, top-k weights, top-k indices); the indices are the integer tensor."""
    parts = output if isinstance(output, (tuple, list)) else (output,)
    logits = next(p for p in parts if isinstance(p, torch.Tensor) and p.is_floating_point())
    logits = logits.reshape(-1, logits.shape[-1])
    chosen = next((p for p in parts if isinstance(p, torch.Tensor) and not p.is_floating_point()), None)
    if chosen is None:
        chosen = torch.topk(logits.detach(), top_k, dim=-1).indices
    return logits, chosen.reshape(logits.shape[0], -1)


class Routers:
    """The sparse blocks' routers of the model being trained, hooked (see the module docstring).

    ``sync(module, view)`` (re)hooks them after every change of the model; ``capture()`` wraps
    the training forward; ``loss()`` then gives the routers' terms to add to its loss;
    ``drain(world)`` the window at a log step."""

    def __init__(self, aux_coef: float | None = None, z_coef: float | None = None, world=None):
        self.plan_aux, self.plan_z = aux_coef, z_coef
        # under torchrun: the ranks' routed counts summed, so f_e is the global batch's (load_balancing_loss)
        self._all_sum = world.sum_on_device if world is not None and world.distributed else None
        self.aux_coef = self.z_coef = 0.0
        self.top_k = 0
        self._routers: list[tuple[int, nn.Module]] = []
        self._handles: list = []
        self._capturing = False
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []   # (logits, chosen) of this forward
        self._window: dict[int, _LayerWindow] = {}
        self._losses: list[torch.Tensor] = []     # per step: [aux, z] (the step's micro-batches' mean)
        self._step_terms: list[torch.Tensor] = []  # this step's micro-batches' [aux, z]

    @property
    def active(self) -> bool:
        return bool(self._routers)

    def sync(self, module: nn.Module, view) -> None:
        """Hook the routers `module` has now (nothing changes when they are the same modules). A
        change (an upcycle, added experts, a rebuilt model) starts a new window."""
        routers = sparse_routers(module, view)
        if [(i, id(r)) for i, r in routers] != [(i, id(r)) for i, r in self._routers]:
            self.close()
            self._routers = routers
            self._handles = [router.register_forward_hook(self._hook(layer)) for layer, router in routers]
        if routers:  # add_experts may change top_k in place
            moe, config = view.family.moe, view.config
            self.aux_coef = coefficient(self.plan_aux, config, moe.aux_loss_field)
            self.z_coef = coefficient(self.plan_z, config, moe.z_loss_field)
            self.top_k = int(getattr(config, moe.top_k_field))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._routers, self._captured = [], [], []
        self._window, self._losses, self._step_terms = {}, [], []

    def _hook(self, layer: int):
        def record(_module, _args, output):
            if not self._capturing:
                return
            logits, chosen = _router_output(output, self.top_k)
            self._captured.append((logits, chosen))
            self._count(layer, logits.detach().float(), chosen)
        return record

    def _count(self, layer: int, logits: torch.Tensor, chosen: torch.Tensor) -> None:
        experts = logits.shape[-1]
        window = self._window.get(layer)
        if window is None or window.counts.numel() != experts or window.counts.device != logits.device:
            device = logits.device
            window = self._window[layer] = _LayerWindow(torch.zeros(experts, dtype=torch.int64, device=device),
                                                        torch.zeros((), dtype=torch.float64, device=device),
                                                        torch.zeros((), dtype=torch.int64, device=device))
        picked = chosen.reshape(-1).long()
        window.counts.scatter_add_(0, picked, torch.ones_like(picked))
        log_p = torch.log_softmax(logits, dim=-1)
        window.entropy = window.entropy - (log_p.exp() * log_p).sum().double()
        window.tokens = window.tokens + logits.shape[0]

    @contextmanager
    def capture(self):
        """Keep the routers' logits of the forward run inside (the training step's)."""
        self._capturing, self._captured = bool(self._routers), []
        try:
            yield
        finally:
            self._capturing = False

    def loss(self) -> torch.Tensor | None:
        """coef·load-balancing + z_coef·z-loss of the forward just captured (None for a dense
        model); the values are kept for the window. The captured logits are let go."""
        if not self._routers:
            return None
        captured, self._captured = self._captured, []
        if not captured:
            return None
        aux, z = load_balancing_loss(captured, self._all_sum), router_z_loss([logits for logits, _ in captured])
        self._step_terms.append(torch.stack([aux.detach(), z.detach()]))
        return self.aux_coef * aux + self.z_coef * z

    def end_step(self) -> None:
        """The step's micro-batches are done: their mean terms join the window."""
        if self._step_terms:
            self._losses.append(torch.stack(self._step_terms).mean(0))
            self._step_terms = []

    def drain(self, world=None) -> RoutingWindow | None:
        """The window since the last call, summed over the ranks (a collective under torchrun:
        every rank calls it at the same step), then forgotten. None for a dense model or an
        empty window."""
        if not self._routers or not self._losses:
            return None
        layers = sorted(self._window)
        device = self._losses[0].device
        parts = [torch.stack(self._losses).sum(0), self._losses[-1], torch.tensor([float(len(self._losses))], device=device)]
        for layer in layers:
            w = self._window[layer]
            parts += [w.counts.to(device), torch.stack([w.entropy, w.tokens.double()]).to(device)]
        flat = torch.cat([p.reshape(-1).double() for p in parts]).tolist()   # the window's one host read
        if world is not None and world.distributed:
            flat = world.all_sum(flat)
        size = world.size if world is not None and world.distributed else 1
        sums, last, steps = flat[0:2], flat[2:4], flat[4] / size
        at, rows = 5, []
        for layer in layers:
            experts = self._window[layer].counts.numel()
            counts, (entropy, tokens) = flat[at:at + experts], flat[at + experts:at + experts + 2]
            at += experts + 2
            routed = sum(counts)
            rows.append({"layer": layer, "load": [c / routed if routed else 0.0 for c in counts],
                         "dead": [e for e, c in enumerate(counts) if c == 0],
                         "entropy": entropy / tokens if tokens else None, "tokens": int(round(tokens))})
        self._window, self._losses = {}, []
        runs = max(steps * size, 1.0)
        aux, z = sums[0] / runs, sums[1] / runs
        last_aux, last_z = last[0] / size, last[1] / size
        return RoutingWindow(steps=int(round(steps)), top_k=self.top_k, aux_coef=self.aux_coef, z_coef=self.z_coef,
                             layers=rows, aux_loss=_finite(aux), z_loss=_finite(z) if self.z_coef else None,
                             last_extra=self.aux_coef * last_aux + self.z_coef * last_z)


def step_fields(routing: RoutingWindow | None, lm_loss: float | None) -> dict:
    """What a `step` event adds for a mixture of experts (its total loss); nothing for a dense model."""
    return {} if routing is None else {"total_loss": routing.total_loss(lm_loss)}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def load_balancing_loss(captured: list[tuple[torch.Tensor, torch.Tensor]], all_sum=None) -> torch.Tensor:
    """E · Σ_e f_e · P_e over the sparse layers' tokens pooled, as transformers'
    ``load_balancing_loss_func`` (no attention mask: every position of a training row is a token).
    `captured`: (router logits [tokens, E], chosen experts [tokens, k]) per layer. Layers with
    different expert counts are pooled per count, and the pools averaged by their layers.

    `all_sum` (under torchrun, ``World.sum_on_device``: one all-reduce per call): f_e counts every
    rank's tokens, P_e this rank's. f_e takes no gradient, so the ranks' mean loss and the mean of
    their gradients — what DDP and FSDP average — are one process's on the global batch; with f_e
    per rank they would not be (the loss is a product of two batch means)."""
    pools: dict[int, list] = {}
    for logits, chosen in captured:
        pools.setdefault(logits.shape[-1], []).append((logits, chosen))
    sums = []   # per pool: (experts, layers, routed counts, summed probabilities, tokens)
    for experts, layers in pools.items():
        device = layers[0][0].device
        counts = torch.zeros(experts, device=device)
        probs = torch.zeros(experts, device=device)
        rows = 0
        for logits, chosen in layers:
            picked = chosen.reshape(-1)
            counts = counts.scatter_add(0, picked, torch.ones_like(picked, dtype=counts.dtype))
            probs = probs + torch.softmax(logits.float(), dim=-1).sum(0)
            rows += logits.shape[0]
        sums.append((experts, len(layers), counts, probs, rows))
    routed = torch.cat([torch.cat([c, c.new_tensor([r])]) for _, _, c, _, r in sums])  # per pool: counts, tokens
    if all_sum is not None:
        routed = all_sum(routed)   # every rank's
    total, at = 0.0, 0
    for experts, layers, _, probs, rows in sums:
        share = routed[at:at + experts] / routed[at + experts]   # f_e
        at += experts + 1
        total = total + experts * torch.sum(share * (probs / rows)) * layers
    return total / len(captured)


def router_z_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens (and layers) of logsumexp(logits)²."""
    squares = [torch.logsumexp(x.float(), dim=-1).pow(2) for x in logits]
    return torch.cat(squares).mean()
