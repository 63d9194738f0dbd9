"""One GPU used well: the plan's speed settings, as small functions the training loop calls.

- ``enable_checkpointing``  train.checkpointing: recompute each block's activations in backward
- ``compiled``              train.compile: torch.compile the module the loop trains through
- ``micro_batches``         train.grad_accum: a rank's batch as consecutive equal row slices
- ``attention_of``          the attention kernel in use (train.attention; engine.model.sources chooses it)

Attention and dtype are chosen elsewhere: engine.model.sources.load_model picks sdpa or eager (and says
why it kept eager), engine.train.optim.Precision autocasts.
"""

from __future__ import annotations

from engine.errors import WidenError


class SpeedError(WidenError, ValueError):
    """A speed setting the model cannot take (one line naming the field and the fix)."""


def _inner(model):
    """The model under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    import torch

    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def enable_checkpointing(model, view=None) -> None:
    """Activation checkpointing of every block, in place, non-reentrant.

    transformers keeps the switch on each block (GradientCheckpointingLayer.gradient_checkpointing),
    not on the stack: a block deep-copied by a depth growth keeps it, but a block built afresh does
    not. So the loop calls this again after every growth; calling it twice is the same as once."""
    model = _inner(model)
    kind = getattr(getattr(view, "family", None), "kind", None)
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if kind == "mlp" or not supported:
        what = "the built-in MLP (an nn.Sequential)" if kind == "mlp" or not hasattr(model, "config") \
            else type(model).__name__
        raise SpeedError(f"train.checkpointing: {what} has no blocks transformers can checkpoint "
                         f"— set train.checkpointing = false")
    # enabling registers a forward hook on the input embeddings (its output requires grad); drop the
    # previous call's hooks first so repeated calls do not stack them
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compiled(module, train):
    """`torch.compile(module)` when train.compile, else `module` unchanged. The compiled wrapper
    shares the parameters; after a growth the loop compiles the re-wrapped module again (the first
    steps after it pay the compile time). Save and grow the inner module, never the wrapper."""
    if not train.compile:
        return module
    import torch

    return torch.compile(module)


def micro_batches(batch, grad_accum: int) -> list:
    """`batch` (numpy arrays or tensors, possibly nested in tuples/lists, all with the same rows)
    as `grad_accum` consecutive equal row slices, same nesting; grad_accum 1 gives [batch]."""
    if grad_accum == 1:
        return [batch]
    rows = _rows(batch)
    if grad_accum < 1 or rows % grad_accum:
        raise SpeedError(f"train.grad_accum: {rows} rows per process do not split into {grad_accum} equal "
                         f"micro-batches — use a train.batch_size divisible by processes × grad_accum")
    size = rows // grad_accum
    return [_cut(batch, i * size, (i + 1) * size) for i in range(grad_accum)]


def _rows(batch) -> int:
    if isinstance(batch, (tuple, list)):
        counts = {_rows(part) for part in batch}
        if len(counts) != 1:
            raise SpeedError(f"train.grad_accum: the batch's parts have different rows {sorted(counts)} "
                             f"— this is a bug in the task's batches")
        return counts.pop()
    return len(batch)


def _cut(batch, start: int, stop: int):
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut(part, start, stop) for part in batch)
    return batch[start:stop]


def attention_of(model) -> str:
    """The attention implementation in use: "sdpa", "eager", ... from the model's config;
    "none" for a model without attention (the built-in MLP)."""
    config = getattr(_inner(model), "config", None)
    if config is None:
        return "none"
    return getattr(config, "_attn_implementation", None) or "eager"
