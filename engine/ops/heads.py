"""Attention-head expansion: add heads whose output projection starts at zero.

New heads get random query/key/value weights and zero columns in the output projection, so the
block computes exactly what it did (`init = "zero_out"`), while the output columns receive a
gradient through the new heads' values. With grouped-query attention new heads come in whole
groups with their own key/value heads (`size` must be a multiple of the group size), so the
existing heads keep their key/value sharing.
"""

from __future__ import annotations

import torch

from engine.ops.hidden import config_problem
from engine.ops.params import AddHeadsParams
from engine.ops.registry import OpResult
from engine.ops.width import _linear_weight, _make_linear, _mask_like, mask_on, shapes_only, value_std


def _grow_rows(weight: torch.Tensor, new_rows: int, std: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Append random rows (Linear layout [out, in]); returns the grown weight and the new-row mask."""
    with shapes_only(weight):  # a preview's meta weight: new rows on meta too
        added = torch.randn(new_rows, weight.shape[1], generator=gen) * std
    grown = torch.cat([weight.float(), added])
    return grown, torch.arange(grown.shape[0]) >= weight.shape[0]


def add_heads(view, params: AddHeadsParams, gen: torch.Generator) -> OpResult:
    layout = view.family.attention
    heads, kv_heads = view.num_heads, view.num_kv_heads
    head_dim = getattr(view.config, layout.head_dim_field, None) or view.hidden_size // heads
    if layout.heads_attr:  # the live count (a config may not follow added heads)
        heads = getattr(view.attention(0), layout.heads_attr)
        kv_heads = heads if not layout.num_kv_heads_field else kv_heads
    group = heads // kv_heads
    if params.size % group:
        raise ValueError(f"size: {params.size} is not a multiple of the GQA group size {group} ({heads} query "
                         f"heads share {kv_heads} key/value heads) — use a multiple of {group}, e.g. "
                         f"{group * max(1, round(params.size / group))}")
    new_kv = params.size // group
    result = OpResult(exact=params.init == "zero_out")
    layers = params.layer_indices(view.num_layers)
    if layout.per_head_embedding and layers != list(range(view.num_layers)):
        raise ValueError(f"layers: {view.family.name} blocks share a per-head {layout.per_head_embedding} "
                         "across the stack, so heads are added to every block — use layers = \"all\"")
    describable = (layers == list(range(view.num_layers)) and hasattr(view.config, layout.head_dim_field)
                   and not view.base_family.stacks)
    if describable:  # refuse now what transformers would refuse at export, after the training
        _check_config(view, heads, kv_heads, head_dim, group, params.size)
    for layer in layers:
        attn = view.attention(layer)
        # an earlier add_heads on some layers only leaves the layers with different head counts
        live = getattr(attn, layout.heads_attr) if layout.heads_attr else heads
        out = getattr(attn, layout.out)
        out_w = _linear_weight(out, layout.conv1d)                    # [hidden, heads*head_dim]
        if layout.qkv:
            fused = getattr(attn, layout.qkv)
            w = _linear_weight(fused, layout.conv1d)                  # [3*heads*head_dim, hidden]
            b = fused.bias.detach().float() if getattr(fused, "bias", None) is not None else None
            std = value_std(w)
            grown_w, grown_b, mask = _grow_fused(w.float(), b, layout.qkv_order, live, head_dim,
                                                 params.size, std, gen)
            new = _make_linear(grown_w, grown_b, fused, layout.conv1d)
            setattr(attn, layout.qkv, new)
            result.grown.append((new.weight, _mask_like(new.weight, mask, rows=not layout.conv1d)))
            if grown_b is not None:
                result.grown.append((new.bias, mask_on(mask, new.bias)))
        else:
            for name, count in ((layout.q, params.size), (layout.k, new_kv), (layout.v, new_kv)):
                proj = getattr(attn, name)
                w = _linear_weight(proj, layout.conv1d)
                std = value_std(w)
                grown_w, mask = _grow_rows(w, count * head_dim, std, gen)
                b = proj.bias.detach().float() if getattr(proj, "bias", None) is not None else None
                with shapes_only(w):
                    grown_b = torch.cat([b, torch.zeros(count * head_dim)]) if b is not None else None
                new = _make_linear(grown_w, grown_b, proj, layout.conv1d)
                setattr(attn, name, new)
                result.grown.append((new.weight, _mask_like(new.weight, mask, rows=not layout.conv1d)))
                if grown_b is not None:
                    result.grown.append((new.bias, mask_on(mask, new.bias)))
        # output projection: new input columns, zero unless init = "random"
        extra = params.size * head_dim
        with shapes_only(out_w):
            cols = (torch.randn(out_w.shape[0], extra, generator=gen) * value_std(out_w)
                    if params.init == "random" else torch.zeros(out_w.shape[0], extra))
        out_b = out.bias.detach().float() if getattr(out, "bias", None) is not None else None
        new_out = _make_linear(torch.cat([out_w.float(), cols], dim=1), out_b, out, layout.conv1d)
        setattr(attn, layout.out, new_out)
        col_mask = torch.arange(out_w.shape[1] + extra) >= out_w.shape[1]
        result.grown.append((new_out.weight, _mask_like(new_out.weight, col_mask, rows=layout.conv1d)))
        if layout.heads_attr:
            setattr(attn, layout.heads_attr, live + params.size)
        if layout.split_attr:
            setattr(attn, layout.split_attr, (live + params.size) * head_dim)
        if layout.width_attr:
            setattr(attn, layout.width_attr, getattr(attn, layout.width_attr) + params.size * head_dim)
        for name in layout.head_params:  # one entry per head (GPT-OSS's sinks): a new head's is 0,
            old = getattr(attn, name)      # any value is exact while its output columns are zero
            with shapes_only(old):
                grown = torch.cat([old.detach().float(), torch.zeros(params.size)])
            setattr(attn, name, torch.nn.Parameter(grown.to(old.device, old.dtype), requires_grad=old.requires_grad))
            result.grown.append((getattr(attn, name), mask_on(torch.arange(len(grown)) >= len(old), grown)))
        table = getattr(attn, layout.per_head_embedding, None) if layout.per_head_embedding else None
        if table is not None:  # new heads start without a position bias
            with shapes_only(table.weight):
                grown = torch.cat([table.weight.detach().float(), torch.zeros(table.weight.shape[0], params.size)],
                                  dim=1)
            table.weight = torch.nn.Parameter(grown.to(table.weight.device, table.weight.dtype))
            table.embedding_dim = grown.shape[1]
            mask = torch.arange(grown.shape[1]) >= grown.shape[1] - params.size
            result.grown.append((table.weight, _mask_like(table.weight, mask, rows=False)))

    if describable:
        # head_dim is explicit, so a config with more heads still describes these blocks
        result.config_changes = _head_changes(layout, heads, kv_heads, head_dim, group, params.size)
    else:
        result.note = ("the config keeps the original head count (this family derives head_dim from "
                       "it, or not every layer grew): the live model is right, export is not possible")
    return result


def _head_changes(layout, heads: int, kv_heads: int, head_dim: int, group: int, size: int) -> dict:
    changes = {layout.num_heads_field: heads + size, layout.head_dim_field: head_dim}
    if layout.num_kv_heads_field:
        changes[layout.num_kv_heads_field] = kv_heads + size // group
    return changes


def _check_config(view, heads: int, kv_heads: int, head_dim: int, group: int, size: int) -> None:
    """One ValueError when the grown config would not save or load (LlamaConfig wants
    hidden_size to be a multiple of the head count even with head_dim stated), naming sizes
    that fit."""
    layout = view.family.attention
    problem = config_problem(view.config, _head_changes(layout, heads, kv_heads, head_dim, group, size))
    if problem is None:
        return
    fits = [s for s in range(group, 8 * heads + 1, group)
            if config_problem(view.config, _head_changes(layout, heads, kv_heads, head_dim, group, s)) is None][:2]
    hint = f"use size = {' or '.join(map(str, fits))}" if fits else "use a family whose config states head_dim"
    raise ValueError(f"size: a {view.config.model_type} config cannot describe {heads} + {size} = {heads + size} "
                     f"heads over hidden size {view.hidden_size} (transformers: \"{problem}\"), so the grown "
                     f"model would not export — {hint}")


def _grow_fused(w, b, order: str, heads: int, head_dim: int, size: int, std: float, gen):
    """Grow a fused qkv projection by `size` heads; returns weight, bias, new-row mask."""
    with shapes_only(w):  # a preview's meta weight: the new rows on meta too
        return _grow_fused_rows(w, b, order, heads, head_dim, size, std, gen)


def _grow_fused_rows(w, b, order: str, heads: int, head_dim: int, size: int, std: float, gen):
    hidden = w.shape[1]
    if order == "blocks":  # [q | k | v], each heads*head_dim rows
        parts = list(w.split(heads * head_dim))
        bias_parts = list(b.split(heads * head_dim)) if b is not None else None
        new_w, new_b, masks = [], [], []
        for i, part in enumerate(parts):
            added = torch.randn(size * head_dim, hidden, generator=gen) * std
            new_w.append(torch.cat([part, added]))
            masks.append(torch.arange(part.shape[0] + added.shape[0], device="cpu") >= part.shape[0])
            if bias_parts is not None:
                new_b.append(torch.cat([bias_parts[i], torch.zeros(size * head_dim)]))
        return torch.cat(new_w), (torch.cat(new_b) if b is not None else None), torch.cat(masks)
    # per head: rows are [q_h, k_h, v_h] for each head, so new heads append at the end
    added = torch.randn(3 * size * head_dim, hidden, generator=gen) * std
    grown_b = torch.cat([b, torch.zeros(3 * size * head_dim)]) if b is not None else None
    return torch.cat([w, added]), grown_b, torch.arange(w.shape[0] + added.shape[0], device="cpu") >= w.shape[0]

