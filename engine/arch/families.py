"""Architecture descriptions, kept as data: where each family keeps its blocks, FFN and config.

Operators never ask "is this GPT-2?"; they ask the description. Adding a family is adding an
entry here (like mergekit's architecture JSONs or PEFT's target-module tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FFNLayout:
    """Where a block's feed-forward network lives, relative to the block."""

    module: str                   # the MLP module inside a block, e.g. "mlp"
    up: str                       # hidden -> intermediate projection
    down: str                     # intermediate -> hidden projection
    act: str                      # activation attribute of the MLP module
    gate: str | None = None       # gated MLPs (Llama): act(gate(x)) * up(x)
    conv1d: bool = False          # GPT-2's Conv1D stores weights transposed ([in, out])


@dataclass(frozen=True)
class ArchFamily:
    name: str
    model_types: tuple[str, ...]          # config.model_type values served by this entry
    blocks: str                           # dotted path of the ModuleList of blocks
    ffn: FFNLayout
    num_layers_field: str                 # config field holding the depth
    ffn_size_field: str                   # config field holding the FFN width
    ffn_size_default: str | None = None   # e.g. GPT-2: n_inner=None means 4 * n_embd
    hidden_size_field: str = "hidden_size"
    extra: dict = field(default_factory=dict)


FAMILIES: tuple[ArchFamily, ...] = (
    ArchFamily(
        name="gpt_neo", model_types=("gpt_neo",), blocks="transformer.h",
        ffn=FFNLayout(module="mlp", up="c_fc", down="c_proj", act="act"),
        num_layers_field="num_layers", ffn_size_field="intermediate_size",
        ffn_size_default="4*hidden_size",
    ),
    ArchFamily(
        name="gpt2", model_types=("gpt2",), blocks="transformer.h",
        ffn=FFNLayout(module="mlp", up="c_fc", down="c_proj", act="act", conv1d=True),
        num_layers_field="n_layer", ffn_size_field="n_inner", ffn_size_default="4*hidden_size",
        hidden_size_field="n_embd",
    ),
    ArchFamily(
        name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers",
        ffn=FFNLayout(module="mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act"),
        num_layers_field="num_hidden_layers", ffn_size_field="intermediate_size",
    ),
    ArchFamily(
        name="llama", model_types=("llama", "mistral", "qwen2"), blocks="model.layers",
        ffn=FFNLayout(module="mlp", up="up_proj", down="down_proj", act="act_fn", gate="gate_proj"),
        num_layers_field="num_hidden_layers", ffn_size_field="intermediate_size",
    ),
)


def family_for(model_type: str) -> ArchFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedArchitecture(f"model type '{model_type}' is not supported — supported: {supported}")


class UnsupportedArchitecture(ValueError):
    pass
