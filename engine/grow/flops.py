"""Training FLOPs that count what ran (docs/flops.md states the formula).

Per step, for every matmul the forward runs (a Linear, a GPT-2 Conv1D, the raw delta of a
parallel path, an adapter's A and B, a tied LM head; embedding lookups are not matmuls):

    forward   2 · in · out                 per row it reads, once per use (a weight-tied virtual
                                           block runs its matrices again: they count again)
    backward  2 · in · out · [input needs a gradient]  +  2 · in · out · [weight trains]

plus, per attention module, QKᵀ and AV over the full square (what eager matmuls and the fused
kernels compute, causal or not): forward 2·2·Lk·W per query token (W = heads × head_dim of the
queries); backward per operand that needs a gradient (eager), or 5·2·Lk·W when anything does
(fused sdpa/flash kernels recompute the scores and produce dq, dk, dv together).

An input needs a gradient exactly when autograd will compute one: when something below it
trains. So frozen matmuls above the lowest trainable parameter pay their input gradient, and
those below it pay nothing. Which matmuls run, how often, and which inputs need gradients is read
once per model shape and freezing, from one forward pass of a tiny batch (8 tokens) with module
hooks (``profile``); a step then costs a few multiplications (``FlopProfile.step_flops``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# trace lengths: distinct, so a matmul's rows tell which stream it read (T5's cross-attention
# keys and values read the encoder's tokens, its queries the decoder's)
CAUSAL_TRACE = {"tokens": 8}
SEQ2SEQ_TRACE = {"encoder": 7, "decoder": 5}
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class AttentionTerm:
    """One attention module's QKᵀ and AV: FLOPs per (query token, key token) pair of a row."""

    query: str          # stream of the queries ("tokens", "encoder", "decoder")
    key: str            # stream of the keys and values
    width: int          # heads × head_dim of the queries (what QKᵀ and AV contract over / produce)
    forward: float
    backward: float
    recompute: float = 0.0   # activation checkpointing runs the forward again in the backward


@dataclass
class FlopProfile:
    """FLOPs of one training step of one model shape and freezing, per token of each stream."""

    kind: str                                            # causal_lm | seq2seq | mlp
    forward: dict[str, float] = field(default_factory=dict)    # stream -> matmul FLOPs per token
    backward: dict[str, float] = field(default_factory=dict)
    recompute: dict[str, float] = field(default_factory=dict)  # checkpointed blocks' forward again
    attention: list[AttentionTerm] = field(default_factory=list)
    matmuls: int = 0                                     # matmul calls in one forward (for reading)

    def step_flops(self, inputs) -> float:
        """FLOPs of one training step on the global batch `inputs` (its shape is all it reads)."""
        sizes = _stream_sizes(self.kind, inputs)
        total = 0.0
        for stream, (rows, length) in sizes.items():
            per_token = self.forward.get(stream, 0.0) + self.backward.get(stream, 0.0) + self.recompute.get(stream, 0.0)
            total += rows * length * per_token
        for term in self.attention:
            rows, lq = sizes.get(term.query, (0, 0))
            lk = sizes.get(term.key, (0, 0))[1]
            total += rows * lq * lk * (term.forward + term.backward + term.recompute)
        return total

    def forward_flops(self, inputs) -> float:
        """The forward alone (what a step with nothing trainable runs)."""
        sizes = _stream_sizes(self.kind, inputs)
        total = sum(rows * length * self.forward.get(s, 0.0) for s, (rows, length) in sizes.items())
        for term in self.attention:
            rows, lq = sizes.get(term.query, (0, 0))
            total += rows * lq * sizes.get(term.key, (0, 0))[1] * term.forward
        return total


def _shape(x) -> tuple[int, ...]:
    return tuple(int(n) for n in getattr(x, "shape", ()))


def _stream_sizes(kind: str, inputs) -> dict[str, tuple[int, int]]:
    """stream -> (rows, tokens per row) of a batch's inputs."""
    if kind == "seq2seq":
        if isinstance(inputs, (tuple, list)):
            (b, le), (_, ld) = _shape(inputs[0])[:2], _shape(inputs[1])[:2]
            return {"encoder": (b, le), "decoder": (b, ld)}
        b, length = _shape(inputs)[:2]
        return {"encoder": (b, length), "decoder": (b, length)}  # a text task feeds both the same ids
    if kind == "mlp":
        return {"rows": (_shape(inputs)[0], 1)}
    b, length = _shape(inputs)[:2]
    return {"tokens": (b, length)}


# ---------------------------------------------------------------------------------------------
# reading the model: one traced forward


@dataclass
class _Call:
    rows: int
    fan_in: int
    fan_out: int
    input_grad: bool
    weight_grad: bool
    block: int | None     # index into the traced blocks, None outside any block


@dataclass
class _Projection:
    """What a hook saw of a q/k/v (or fused qkv) projection's output."""

    width: int = 0
    rows: int = 0
    grad: bool = False


def _matmul_weights(module: nn.Module) -> list[tuple[torch.Tensor, int, int]]:
    """(weight, fan_in, fan_out) of the matmuls `module` itself runs on its input (children run
    theirs): a Linear or Conv1D, or the raw tensors of engine.ops.linear's stand-ins."""
    from transformers.pytorch_utils import Conv1D

    from engine.ops.linear import ParallelLinear, WiderInputLinear

    if isinstance(module, nn.Linear):
        return [(module.weight, module.in_features, module.out_features)]
    if isinstance(module, Conv1D):  # weight [in, out]
        return [(module.weight, module.weight.shape[0], module.weight.shape[1])]
    if isinstance(module, ParallelLinear) and module.active:  # x @ delta.T beside the base
        return [(module.delta, module.delta.shape[1], module.delta.shape[0])]
    if isinstance(module, WiderInputLinear) and module.active:  # x[..., n:] @ extra.T
        return [(module.extra, module.extra.shape[1], module.extra.shape[0])]
    return []


def _sparse_modules(model: nn.Module, view) -> tuple[list[nn.Module], list[nn.Module]]:
    """(routers, fused-experts modules) of the blocks that hold experts (``MoELayout``); an
    experts module a parallel widen_ffn put a second one beside (``ExpertsWithNewUnits``) counts
    as both, each run on the same routed tokens."""
    from engine.model.view import get_submodule, holds_experts

    moe = getattr(view.family, "moe", None)
    if moe is None or view.family.kind != "causal_lm":
        return [], []
    gate_up = moe.gate_up.rpartition(".")[2]
    routers, experts = [], []
    for block in view.blocks():
        if holds_experts(view.family, block):
            routers.append(get_submodule(block, f"{moe.module}.{moe.router}"))
            root = get_submodule(block, f"{moe.module}.{moe.experts}")
            experts += [m for m in root.modules() if isinstance(getattr(m, gate_up, None), nn.Parameter)]
    return routers, experts


def _router_weights(router: nn.Module) -> list[tuple[torch.Tensor, int, int]]:
    """The router's one matmul: logits = x · weightᵀ, weight [experts, hidden]."""
    return [(router.weight, router.weight.shape[1], router.weight.shape[0])]


def _expert_matmuls(experts: nn.Module, moe) -> list[tuple[torch.Tensor, int, int]]:
    """(weight, fan_in, fan_out) of one expert's two matmuls, gate_up then down, from the fused
    tensors' shapes: [E, out, in], or [E, in, out] where the family stores them transposed (GPT-OSS)."""
    gate_up = getattr(experts, moe.gate_up.rpartition(".")[2])
    down = getattr(experts, moe.down.rpartition(".")[2])
    out_dim, in_dim = (2, 1) if moe.transposed else (1, 2)
    return [(gate_up, gate_up.shape[in_dim], gate_up.shape[out_dim]), (down, down.shape[in_dim], down.shape[out_dim])]


def _routed_rows(args, kwargs, experts: int) -> int:
    """Expert applications a fused-experts call runs: its routed (token, slot) pairs, the entries
    of the top-k index tensor it is given (an index outside 0..E-1 is a masked slot)."""
    values = [*args, *kwargs.values()]
    index = next((v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point()), None)
    if index is None:
        return 0
    return int(((index >= 0) & (index < experts)).sum())


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in (_first_tensor(v) for v in value) if t is not None), None)
    return None


def _attention_modules(view) -> list[tuple[str, nn.Module, tuple[str, ...], set[int]]]:
    """(query stream, attention module, its q/k/v leaf names, the ids of parameters adding to its
    scores) per attention module: each stack's self-attention, and cross-attention where a stack
    names one (T5's decoder: the queries are the decoder's, the keys the encoder's)."""
    from engine.model.view import get_submodule

    out = []
    seq2seq = view.base_family.kind == "seq2seq"
    for stack in view.stacks():
        layout = stack.family.attention
        leaves = (layout.qkv,) if layout.qkv else (layout.q, layout.k, layout.v)
        norms = tuple(layout.qk_norms)
        stream = stack.stack if seq2seq else "tokens"
        bias_ids: set[int] = set()
        blocks = stack.blocks()
        if layout.per_head_embedding:  # T5's relative position bias, held by the first block
            for block in blocks:
                att = get_submodule(block, layout.module)
                embedding = getattr(att, layout.per_head_embedding, None)
                if embedding is not None:
                    bias_ids |= {id(p) for p in embedding.parameters()}
        for i in range(len(blocks)):
            out.append((stream, stack.attention(i), leaves + norms, bias_ids))
            for extra in stack.family.extra_outputs:  # "layer.1.EncDecAttention.o" -> its module
                parent = extra.rpartition(".")[0]
                out.append((stream, get_submodule(blocks[i], parent), leaves + norms, set()))
    return out


def profile(model: nn.Module, view=None, sample_inputs=None, checkpointing: bool = False) -> FlopProfile:
    """The FLOP profile of `model` as it is now (shape, freezing, active task modules, adapters).

    One forward of a tiny batch in eval mode (no dropout, no randomness drawn) with hooks; the
    model is unchanged after. `sample_inputs`: a batch's inputs, needed only for a plain MLP
    (its input width); `checkpointing`: train.checkpointing (checkpointed blocks run their forward
    again during the backward)."""
    from engine.model.forward import forward_logits, model_kind
    from engine.model.view import ArchView

    kind = model_kind(model)
    view = view if view is not None else ArchView.of(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if kind == "mlp":
        if sample_inputs is None:
            raise ValueError("a plain MLP's FLOP profile needs a sample of its inputs")
        inputs = torch.as_tensor(sample_inputs[:1], device=device)
        lengths = {"rows": 1}
    else:
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        lengths = SEQ2SEQ_TRACE if kind == "seq2seq" else CAUSAL_TRACE

        def ids(n):  # ordinary token ids, clear of the special ones at the start of most vocabularies
            return (3 + torch.arange(n, device=device) % max(vocab - 3, 1)).clamp(max=vocab - 1).unsqueeze(0)

        inputs = (ids(lengths["encoder"]), ids(lengths["decoder"])) if kind == "seq2seq" else ids(lengths["tokens"])
    by_rows = {n: s for s, n in lengths.items()}

    calls: list[_Call] = []
    blocks: list[nn.Module] = [] if kind == "mlp" else [b for s in view.stacks() for b in s.blocks()]
    block_grad: dict[int, bool] = {}
    current: list[int] = []
    handles = []

    def on_matmul(module, args, _output, weights=_matmul_weights):
        x = _first_tensor(args)
        if x is None:
            return
        for weight, fan_in, fan_out in weights(module):
            calls.append(_Call(x.numel() // max(x.shape[-1], 1), fan_in, fan_out, x.requires_grad,
                               weight.requires_grad, current[-1] if current else None))

    for module in model.modules():  # each module once; a module run twice is hooked once, counted twice
        if _matmul_weights(module):
            handles.append(module.register_forward_hook(on_matmul))

    # a mixture of experts: the router's matmul, and each token's top-k experts (only those run)
    routers, expert_modules = _sparse_modules(model, view) if kind != "mlp" else ([], [])
    for router in routers:
        handles.append(router.register_forward_hook(lambda m, a, o: on_matmul(m, a, o, _router_weights)))

    def on_experts(module, args, kwargs, _output):
        x = _first_tensor(args)
        if x is None:
            return
        moe = view.family.moe
        (gate_up, *up_shape), (down, *down_shape) = _expert_matmuls(module, moe)
        rows = _routed_rows(args[1:], kwargs, gate_up.shape[0])
        bias = getattr(module, moe.gate_up_bias.rpartition(".")[2]) if moe.gate_up_bias else None
        # down reads act(gate_up(x)): it needs a gradient when x does or gate_up's tensors train
        hidden_grad = x.requires_grad or gate_up.requires_grad or bool(bias is not None and bias.requires_grad)
        block = current[-1] if current else None
        calls.append(_Call(rows, *up_shape, x.requires_grad, gate_up.requires_grad, block))
        calls.append(_Call(rows, *down_shape, hidden_grad, down.requires_grad, block))

    for experts in expert_modules:
        handles.append(experts.register_forward_hook(on_experts, with_kwargs=True))
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, _a, i=index: current.append(i)))

        def leave(_m, _a, output, i=index):
            current.pop()
            out = _first_tensor(output)
            block_grad[i] = block_grad.get(i, False) or bool(out is not None and out.requires_grad)
        handles.append(block.register_forward_hook(leave))

    attention: list[tuple[str, dict[str, _Projection], set[int], int | None]] = []
    if kind != "mlp":
        from engine.model.view import get_submodule

        block_of = {id(b): i for i, b in enumerate(blocks)}
        owners = {id(m): block_of[id(b)] for b in blocks for m in b.modules()}
        for stream, att, leaves, bias_ids in _attention_modules(view):
            seen: dict[str, _Projection] = {}

            def record(_m, _a, output, name=None, seen=seen):
                out = _first_tensor(output)
                if out is not None:
                    seen[name] = _Projection(out.shape[-1], out.numel() // max(out.shape[-1], 1), out.requires_grad)

            for leaf in leaves:
                try:
                    target = get_submodule(att, leaf)
                except AttributeError:
                    continue
                handles.append(target.register_forward_hook(lambda m, a, o, n=leaf, r=record: r(m, a, o, n)))
            attention.append((stream, seen, bias_ids, owners.get(id(att))))

    was_training = model.training
    no_grad = [p for p in model.parameters() if p.grad is None]
    try:
        model.eval()
        with torch.enable_grad():
            logits = forward_logits(model, inputs)
            if logits.requires_grad:  # a model that hooks its backward (FSDP) must see it run
                logits.sum().mul(0).backward()
        for p in no_grad:
            p.grad = None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    trains = any(p.requires_grad for p in model.parameters())
    result = FlopProfile(kind, matmuls=len(calls))
    for call in calls:
        stream = by_rows.get(call.rows) if kind != "mlp" else "rows"
        if stream is None:  # rows that are no stream's length: count them per token of the first
            stream, share = next(iter(lengths)), call.rows / next(iter(lengths.values()))
        else:
            share = call.rows / lengths[stream] if kind != "mlp" else call.rows
        unit = 2.0 * call.fan_in * call.fan_out * share
        _add(result.forward, stream, unit)
        if trains:
            _add(result.backward, stream, unit * (call.input_grad + call.weight_grad))
            if checkpointing and call.block is not None and block_grad.get(call.block):
                _add(result.recompute, stream, unit)
    fused = getattr(getattr(model, "config", None), "_attn_implementation", "eager") in FUSED_ATTENTION
    params = {id(p): p for p in model.parameters()}
    for stream, seen, bias_ids, owner in attention:
        term = _attention_term(view, stream, seen, any(params[i].requires_grad for i in bias_ids if i in params),
                               by_rows, fused, trains, checkpointing and owner is not None and block_grad.get(owner))
        if term is not None:
            result.attention.append(term)
    return result


def _add(table: dict[str, float], key: str, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


def _attention_term(view, stream: str, seen: dict[str, _Projection], bias_grad: bool, by_rows: dict[int, str],
                    fused: bool, trains: bool, recomputed: bool) -> AttentionTerm | None:
    """QKᵀ and AV of one attention module from what its projections' hooks saw (None: it did not run)."""
    layout = view.family.attention
    if layout.qkv:
        qkv = seen.get(layout.qkv)
        if qkv is None:
            return None
        heads, kv_heads = view.num_heads, view.num_kv_heads
        width = qkv.width * heads // (heads + 2 * kv_heads)  # [q | k | v], k and v sized by the kv heads
        q = k = v = qkv
        key_rows = qkv.rows
    else:
        q, k, v = seen.get(layout.q), seen.get(layout.k), seen.get(layout.v)
        if q is None or k is None or v is None:
            return None
        width, key_rows = q.width, k.rows
    q_grad, k_grad, v_grad = q.grad, k.grad, v.grad
    for name, which in zip(layout.qk_norms, ("q", "k")):  # the scores read the normed queries and keys
        if name in seen:
            q_grad, k_grad = (seen[name].grad, k_grad) if which == "q" else (q_grad, seen[name].grad)
    query = by_rows.get(q.rows, stream)
    key = by_rows.get(key_rows, stream)
    pair = 2.0 * width                      # one matmul's FLOPs per (query, key) pair
    forward = 2 * pair                      # QKᵀ and AV
    if not trains:
        backward = 0.0
    elif fused:
        backward = 5 * pair if (q_grad or k_grad or v_grad or bias_grad) else 0.0
    else:
        probs_grad = q_grad or k_grad or bias_grad
        backward = pair * (q_grad + k_grad + probs_grad + v_grad)
    return AttentionTerm(query, key, width, forward, backward, forward if recomputed and trains else 0.0)
