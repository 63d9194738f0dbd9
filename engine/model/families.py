"""Architecture descriptions, kept as data: where each family keeps its blocks, FFN and config.

Operators never ask "is this GPT-2?"; they ask the description. Adding a family is adding an
entry here (like mergekit's architecture JSONs or PEFT's target-module tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.errors import WidenError


@dataclass(frozen=True)
class FFNLayout:
    """Where a block's feed-forward network lives, relative to the block."""

    module: str                   # the MLP module inside a block, e.g. "mlp"
    up: str                       # hidden -> intermediate projection
    down: str                     # intermediate -> hidden projection
    act: str                      # activation attribute of the MLP module
    gate: str | None = None       # gated MLPs (Llama): act(gate(x)) * up(x)
    conv1d: bool = False          # GPT-2's Conv1D stores weights transposed ([in, out])
    # gate and up fused in one projection, rows [gate | up] (Phi-3 gate_up_proj): `up` and `gate`
    # name the same module, and widening grows both halves
    gate_up_fused: bool = False


@dataclass(frozen=True)
class AttentionLayout:
    """Where a block's self-attention lives. Fused layouts name one qkv projection instead."""

    module: str                   # attention module inside a block, e.g. "self_attn"
    out: str                      # output projection (zeroing it makes the block's attention a no-op)
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None        # fused projection (GPT-2 c_attn, NeoX query_key_value)
    qkv_order: str = "blocks"     # fused rows: "blocks" = [q | k | v]; "per_head" = [q_h k_h v_h] per head
    conv1d: bool = False          # GPT-2's Conv1D stores weights transposed
    heads_attr: str | None = None  # instance attribute holding the head count, if the module keeps one
    kv_heads_attr: str | None = None  # ... and the key/value head count (Phi-3 caches it)
    split_attr: str | None = None  # GPT-2 splits c_attn's output at this width
    num_heads_field: str = "num_attention_heads"
    num_kv_heads_field: str | None = None   # grouped-query attention (Llama family)
    # attributes holding the block's own index (KV caches and local/global choice read them)
    layer_index_attrs: tuple[str, ...] = ("layer_idx",)
    head_dim_field: str = "head_dim"  # config field giving head_dim explicitly, when the family has one
    width_attr: str | None = None          # module attribute caching heads x head_dim (T5 inner_dim)
    # an embedding with one column per head, held by the stack's first block, which computes it
    # and passes it on to the rest at run time (T5's relative position bias): heads can only be
    # added to every block, and after a depth change the new first block must hold it
    per_head_embedding: str | None = None
    per_head_embedding_flag: str | None = None  # the module's "I hold it" switch (has_relative_attention_bias)
    # heads x head_dim must equal the hidden size (head_dim is derived from it); False where the
    # config states head_dim on its own (Llama), so d_model can grow without touching the heads
    width_follows_hidden: bool = True
    # RMSNorms of the queries and keys, inside the attention module (Qwen3, OLMo-2, Gemma 3):
    # per head (weight [head_dim], shared by the heads) or over the whole projection (OLMo-2:
    # weight [heads x head_dim], one mean square over all heads together)
    qk_norms: tuple[str, ...] = ()
    qk_norm_per_head: bool = True
    # parameters of the attention module with one entry per query head (GPT-OSS's attention
    # sinks, [heads]): they grow and repeat with the heads
    head_params: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoELayout:
    """A block's sparse mixture-of-experts FFN, its experts fused in 3-D tensors as transformers 5
    stores them (one [experts, ...] tensor per projection, not a ModuleList of MLPs).

    The paths below are relative to `module` (the MoE block inside a decoder block). Expert e's
    FFN is act(gate_up[e][:I] x) * (gate_up[e][I:] x) -> down[e], I the expert's intermediate size."""

    module: str = "mlp"                  # the sparse MoE block inside a decoder block
    router: str = "gate"                 # the router: `.weight` [experts, hidden]
    router_bias: bool = False            # the router has a `.bias` [experts] (GPT-OSS)
    experts: str = "experts"             # the fused experts module
    gate_up: str = "experts.gate_up_proj"  # [experts, 2·I, hidden], rows [gate | up]
    down: str = "experts.down_proj"      # [experts, hidden, I]
    act: str = "experts.act_fn"
    num_experts_field: str = "num_local_experts"
    top_k_field: str = "num_experts_per_tok"
    expert_size_field: str = "intermediate_size"
    # the router's top-k weights renormalized to sum to 1: a config flag (Qwen, OLMoE:
    # norm_topk_prob), or None where the family always renormalizes (Mixtral)
    norm_topk_field: str | None = None
    # a dense expert every token goes through, added after a sigmoid gate (Qwen2-MoE)
    shared_expert: FFNLayout | None = None
    shared_expert_gate: str | None = None   # Linear(hidden, 1): sigmoid(gate(x)) scales the shared expert
    shared_expert_size_field: str | None = None
    aux_loss_field: str = "router_aux_loss_coef"  # the load-balancing loss's coefficient
    z_loss_field: str | None = None       # the router z-loss's coefficient, where the family has one
    output_router_logits_field: str = "output_router_logits"
    # which blocks are sparse (Qwen2/3-MoE): a list of dense block indices and a step (block i is
    # sparse when i is not listed and (i + 1) % step == 0); None: every block is sparse (Mixtral)
    dense_layers_field: str | None = None
    sparse_step_field: str | None = None
    # GPT-OSS stores each expert transposed, [experts, in, out] (gate_up [E, hidden, 2·I], down
    # [E, I, hidden]), with gate and up interleaved (unit j: gate at 2j, up at 2j + 1) and biases
    transposed: bool = False
    gate_up_interleaved: bool = False
    gate_up_bias: str | None = None       # [experts, 2·I], ordered like gate_up's units
    down_bias: str | None = None          # [experts, hidden], added by each routed expert
    expert_size_attr: str = "intermediate_dim"  # the experts module's cached I


@dataclass(frozen=True)
class StackLayout:
    """One stack of blocks in a model with several (T5: encoder and decoder). Paths inside a
    block may differ between stacks (a decoder block has cross-attention before its FFN)."""

    name: str
    blocks: str
    num_layers_field: str
    ffn_module: str
    # other modules inside a block whose outputs add to the residual stream (cross-attention)
    extra_outputs: tuple[str, ...] = ()
    # the stack module's own copy of the config (T5Stack.config), read when it builds its KV
    # cache: a one-stack config, so the family's plain depth field must hold this stack's depth
    config_copy: str | None = None
    # a config field to keep equal to this stack's depth so that transformers' generate() sizes
    # its KV cache right: for T5 it uses num_layers (the encoder's depth) unless the config has
    # the legacy encoder-decoder key `decoder_layers`
    generation_cache_field: str | None = None


@dataclass(frozen=True)
class ArchFamily:
    name: str
    model_types: tuple[str, ...]          # config.model_type values served by this entry
    # transformer facts: every transformer family sets them; the nn.Sequential entry (kind "mlp")
    # has no blocks, attention or config and leaves them None
    blocks: str | None = None             # dotted path of the ModuleList of blocks
    ffn: FFNLayout | None = None
    attention: AttentionLayout | None = None
    norms: tuple[str, ...] = ()           # norm modules inside a block
    final_norm: str | None = None         # dotted path from the model root
    embeddings: str | None = None         # token embedding, from the model root
    num_layers_field: str | None = None   # config field holding the depth
    ffn_size_field: str | None = None     # config field holding the FFN width
    ffn_size_default: str | None = None   # e.g. GPT-2: n_inner=None means 4 * n_embd
    hidden_size_field: str = "hidden_size"
    # config fields that hold one entry per layer and must follow a change of depth
    per_layer_fields: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)
    kind: str = "causal_lm"               # engine.model.forward: causal_lm | seq2seq | mlp
    stacks: tuple[StackLayout, ...] = ()  # several stacks (T5); empty: the one stack above
    # a config flag choosing a gated FFN layout (T5 v1.1 / CodeT5+ vs the original ReLU FFN)
    gated_ffn: FFNLayout | None = None
    gated_ffn_flag: str | None = None
    extra_outputs: tuple[str, ...] = ()   # see StackLayout.extra_outputs
    # the residual stream, for growing d_model (engine.ops.hidden)
    position_embeddings: str | None = None  # learned absolute positions, from the model root
    lm_head: str = "lm_head"               # output projection, from the model root (may share the embedding)
    norm_kind: str = "layernorm"           # "layernorm" (mean and variance) or "rmsnorm" (mean square only)
    hidden_size_attrs: tuple[str, ...] = ()  # module attributes caching d_model; "*" = every block
    # plain nn.Sequential MLPs (kind "mlp", engine.model.view.MLPView): the children that are layers, and
    # those that may sit between two layers — elementwise, so a hidden layer can grow through them
    layer_types: tuple[str, ...] = ()
    elementwise_types: tuple[str, ...] = ()
    # -- facts other code used to keep in per-model_type tables (or took from llama's rules) ----
    # which projections carry a bias: group (qkv, o, ffn) -> a constant or (config flag, default);
    # `biases_by_type` overrides them for one of model_types (Qwen2's q/k/v biases)
    biases: dict = field(default_factory=dict)
    biases_by_type: dict = field(default_factory=dict)
    tied_by_default: bool = False          # tie_word_embeddings when the config leaves it out
    positions_field: str = "max_position_embeddings"  # the config's context length
    norm_params: int | None = None         # parameters per norm and unit; None: from norm_kind
    # an RMSNorm gain stored with an offset: the scale is offset + weight (Gemma: 1 + w), so a
    # zero scale is weight = -offset
    norm_offset: float = 0.0
    norm_eps_field: str | None = None      # the config field of every norm's epsilon (d_model growth scales it)
    # norms applied to a sub-layer's output before the residual add (OLMo-2, Gemma 2/3): a
    # block's contribution is scaled through their gains, since the norm undoes any scaling of
    # the projections before it
    post_norms: tuple[str, ...] = ()
    # the embedding output is multiplied by sqrt(hidden_size) (Gemma), a factor that follows d_model
    embedding_scale: str | None = None     # None | "sqrt_hidden"
    # the config field of the tanh soft-cap on the final logits, cap·tanh(logits / cap) (Gemma 2/3;
    # the attention logits' own cap is applied inside the attention module)
    final_softcap_field: str | None = None
    # operators that do not apply to this family: op -> the reason, said in one line
    refused_ops: dict = field(default_factory=dict)
    # config fields a tiny random model of this family needs besides its sizes (tests/tiny_models.py)
    tiny_config: dict = field(default_factory=dict)
    hf_model_type: str | None = None       # the model_type a tiny model is built as (default model_types[0])
    # mixture of experts: the sparse FFN's layout (the family's `ffn` is then the dense FFN of the
    # blocks that are not sparse, where the family has such blocks)
    moe: MoELayout | None = None
    # the MoE family a dense model becomes when its FFNs are upcycled into experts (`upcycle`), per
    # model type (the llama entry serves llama and mistral, which become Mixtral, and qwen2, which
    # becomes Qwen2-MoE); a model type not listed has no MoE class of transformers to become
    upcycle_to: dict = field(default_factory=dict)

    def refusal(self, op: str) -> str | None:
        """The one-line refusal of `op` on this family, or None when it applies."""
        reason = self.refused_ops.get(op)
        return None if reason is None else f"op: {op} does not apply to {self.name} models — {reason}"

    def has_bias(self, group: str, config) -> bool:
        """Whether this family's `group` projections (qkv, o, ffn) carry a bias under `config`."""
        model_type = getattr(config, "model_type", None)
        rule = {**self.biases, **self.biases_by_type.get(model_type, {})}[group]
        if isinstance(rule, tuple):
            flag, default = rule
            value = getattr(config, flag, default)
            return default if value is None else bool(value)
        return rule

    def params_per_norm_unit(self) -> int:
        return self.norm_params or {"layernorm": 2, "rmsnorm": 1}[self.norm_kind]


FAMILIES: tuple[ArchFamily, ...] = (
    ArchFamily(
        name="gpt_neo", model_types=("gpt_neo",), blocks="transformer.h",
        ffn=FFNLayout(module="mlp", up="c_fc", down="c_proj", act="act"),
        attention=AttentionLayout(module="attn.attention", out="out_proj", q="q_proj", k="k_proj",
                                  v="v_proj", num_heads_field="num_heads", heads_attr="num_heads",
                                  layer_index_attrs=("layer_id",)),
        norms=("ln_1", "ln_2"), final_norm="transformer.ln_f", embeddings="transformer.wte",
        num_layers_field="num_layers", ffn_size_field="intermediate_size",
        ffn_size_default="4*hidden_size",
        # attention_layers[i] is "global" or "local" for block i (TinyStories-33M alternates);
        # the parent GPTNeoAttention also carries layer_id
        per_layer_fields=("attention_layers",),
        position_embeddings="transformer.wpe",
        hidden_size_attrs=("transformer.embed_dim", "transformer.h.*.attn.attention.embed_dim"),
        biases={"qkv": False, "o": True, "ffn": True}, tied_by_default=True, norm_eps_field="layer_norm_epsilon",
        # even depths alternate global/local attention like TinyStories-33M
        tiny_config={"window_size": 8, "attention_types": lambda layers: [[["global", "local"], layers // 2]]
                     if layers % 2 == 0 else [[["global"], layers]]},
    ),
    ArchFamily(
        name="gpt2", model_types=("gpt2",), blocks="transformer.h",
        ffn=FFNLayout(module="mlp", up="c_fc", down="c_proj", act="act", conv1d=True),
        attention=AttentionLayout(module="attn", out="c_proj", qkv="c_attn", num_heads_field="n_head",
                                  conv1d=True, heads_attr="num_heads", split_attr="split_size"),
        norms=("ln_1", "ln_2"), final_norm="transformer.ln_f", embeddings="transformer.wte",
        num_layers_field="n_layer", ffn_size_field="n_inner", ffn_size_default="4*hidden_size",
        hidden_size_field="n_embd",
        position_embeddings="transformer.wpe",
        hidden_size_attrs=("transformer.embed_dim", "transformer.h.*.attn.embed_dim"),
        biases={"qkv": True, "o": True, "ffn": True}, tied_by_default=True, positions_field="n_positions",
        norm_eps_field="layer_norm_epsilon",
    ),
    ArchFamily(
        name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers",
        ffn=FFNLayout(module="mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act"),
        attention=AttentionLayout(module="attention", out="dense", qkv="query_key_value", qkv_order="per_head"),
        norms=("input_layernorm", "post_attention_layernorm"), final_norm="gpt_neox.final_layer_norm",
        embeddings="gpt_neox.embed_in",
        num_layers_field="num_hidden_layers", ffn_size_field="intermediate_size",
        biases={"qkv": ("attention_bias", True), "o": ("attention_bias", True), "ffn": True},
        norm_eps_field="layer_norm_eps",
    ),

)


# The Llama layout and the families that keep it with a few changes (each change is a field).
_LLAMA_FFN = FFNLayout(module="mlp", up="up_proj", down="down_proj", act="act_fn", gate="gate_proj")
_LLAMA_ATTENTION = AttentionLayout(module="self_attn", out="o_proj", q="q_proj", k="k_proj", v="v_proj",
                                   num_kv_heads_field="num_key_value_heads", width_follows_hidden=False)
_LLAMA = ArchFamily(
    name="llama", model_types=("llama", "mistral", "qwen2"), blocks="model.layers",
    ffn=_LLAMA_FFN, attention=_LLAMA_ATTENTION,
    norms=("input_layernorm", "post_attention_layernorm"), final_norm="model.norm",
    embeddings="model.embed_tokens",
    num_layers_field="num_hidden_layers", ffn_size_field="intermediate_size",
    norm_kind="rmsnorm", hidden_size_attrs=("model.layers.*.hidden_size", "model.layers.*.mlp.hidden_size"),
    norm_eps_field="rms_norm_eps",
    biases={"qkv": ("attention_bias", False), "o": ("attention_bias", False), "ffn": ("mlp_bias", False)},
    biases_by_type={"mistral": {"qkv": False, "o": False, "ffn": False},
                    "qwen2": {"qkv": True, "o": False, "ffn": False}},
    upcycle_to={"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"},
)
_NO_BIASES = {"qkv": ("attention_bias", False), "o": ("attention_bias", False), "ffn": False}
# a tiny model must not name token ids outside its vocabulary (these configs default to 32000+)
_TINY_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_GEMMA = dict(
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_offset=1.0, embedding_scale="sqrt_hidden", tied_by_default=True, biases=_NO_BIASES,
    biases_by_type={}, per_layer_fields=("layer_types",),
)
_OLMO2_QK = ("OLMo-2's q_norm and k_norm normalise all heads together (one RMSNorm over the whole projection), "
             "so new heads would rescale the existing ones")
_PHI3_GATE_UP = ("Phi-3's gate_up_proj holds [gate | up] halves split at its midpoint, so appended features "
                 "would move the split — widen_ffn grows both halves")
_PHI3_QKV = ("Phi-3 fuses q, k and v in qkv_proj and its attention module caches the key/value head count; "
             "add_heads grows separate q/k/v projections only")

FAMILIES = FAMILIES + (
    _LLAMA,
    # Qwen3: Llama with an RMSNorm of each head's queries and keys (weight [head_dim])
    replace(_LLAMA, name="qwen3", model_types=("qwen3",), biases_by_type={}, biases=_NO_BIASES,
            attention=replace(_LLAMA_ATTENTION, qk_norms=("q_norm", "k_norm")), tiny_config=_TINY_IDS,
            upcycle_to={"qwen3": "qwen3_moe"}),
    # OLMo-2: norms after attention and FFN (before the residual add), none before; q/k norms
    # over the whole projection
    replace(_LLAMA, name="olmo2", model_types=("olmo2",), biases_by_type={}, biases=_NO_BIASES,
            attention=replace(_LLAMA_ATTENTION, qk_norms=("q_norm", "k_norm"), qk_norm_per_head=False),
            norms=("post_attention_layernorm", "post_feedforward_layernorm"),
            post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
            refused_ops={"add_heads": _OLMO2_QK},
            tiny_config=_TINY_IDS, upcycle_to={"olmo2": "olmoe"}),  # refused below: OLMoE's norms come first
    # Phi-3: fused qkv_proj ([q | k | v], k and v sized by the key/value heads) and gate_up_proj
    # ([gate | up]); head_dim derived from the hidden size
    replace(_LLAMA, name="phi3", model_types=("phi3",), biases_by_type={},
            biases={"qkv": False, "o": False, "ffn": False},
            ffn=FFNLayout(module="mlp", up="gate_up_proj", down="down_proj", act="activation_fn",
                          gate="gate_up_proj", gate_up_fused=True),
            attention=AttentionLayout(module="self_attn", out="o_proj", qkv="qkv_proj",
                                      num_kv_heads_field="num_key_value_heads",
                                      kv_heads_attr="num_key_value_heads"),
            refused_ops={"add_heads": _PHI3_QKV, "concat_linear": _PHI3_GATE_UP},
            tiny_config=_TINY_IDS),
    # Gemma 2: RMSNorm gains stored as w in (1 + w), embeddings scaled by sqrt(d), a norm before
    # and after attention and FFN, tanh soft-capping of attention and final logits, sliding-window
    # and global attention alternating per layer (config.layer_types)
    replace(_LLAMA, name="gemma2", model_types=("gemma2",), **_GEMMA,
            final_softcap_field="final_logit_softcapping",
            tiny_config={**_TINY_IDS, "sliding_window": 4, "query_pre_attn_scalar": 4}),
    # Gemma 3 (text): Gemma 2's layout with per-head q/k norms instead of attention soft-capping
    replace(_LLAMA, name="gemma3", model_types=("gemma3_text",), **_GEMMA,
            attention=replace(_LLAMA_ATTENTION, qk_norms=("q_norm", "k_norm")),
            final_softcap_field="final_logit_softcapping",
            tiny_config={**_TINY_IDS, "sliding_window": 4, "query_pre_attn_scalar": 4,
                         "sliding_window_pattern": 2}),
)


# Mixture-of-experts families: Llama-shaped attention and a sparse FFN (`moe`) of experts fused in
# 3-D tensors. `ffn` is the dense FFN of the blocks that are not sparse (Qwen2/3-MoE's
# mlp_only_layers) and None where every block is sparse; `ffn_size_field` is that dense FFN's width.
_MOE_BIASES = {"qkv": ("attention_bias", False), "o": ("attention_bias", False), "ffn": False}
_MOE_REFUSED = {
    "concat_linear": "its FFN units live in fused 3-D expert tensors, not in an up Linear read by a down Linear "
                     "— widen_ffn grows every expert's units",
}
# the router and experts cache d_model (Qwen's dense and shared-expert MLPs too); "*" = every block
_MOE_HIDDEN_ATTRS = ("model.layers.*.hidden_size", "model.layers.*.mlp.hidden_size", "model.layers.*.mlp.gate.hidden_dim",
                     "model.layers.*.mlp.experts.hidden_dim", "model.layers.*.mlp.shared_expert.hidden_size")
_QWEN_MOE = MoELayout(num_experts_field="num_experts", expert_size_field="moe_intermediate_size",
                      norm_topk_field="norm_topk_prob", dense_layers_field="mlp_only_layers",
                      sparse_step_field="decoder_sparse_step")
_OLMOE_QK = ("OLMoE's q_norm and k_norm normalise all heads together (one RMSNorm over the whole projection), "
             "so new heads would rescale the existing ones")
# GPT-OSS rather than DeepSeek-V3 as the fifth MoE family: GPT-OSS's attention is Llama's q/k/v/o
# (with biases and one learned sink per head), so every attention operator applies, and what
# differs in its experts (transposed, interleaved gate/up, biases, a router bias) is layout data
# below. DeepSeek-V3's multi-head latent attention has no q/k/v projections (q_a/q_b, kv_a/kv_b
# with a rope/no-rope split): add_heads, LoRA's q/k/v roles and widen_hidden's attention growth
# would need a second attention description, and its grouped routing keeps a score-correction
# buffer per expert.
_GPT_OSS_MOE = MoELayout(router="router", router_bias=True, act=None, transposed=True, gate_up_interleaved=True,
                         gate_up_bias="experts.gate_up_proj_bias", down_bias="experts.down_proj_bias",
                         expert_size_attr="intermediate_size")

FAMILIES = FAMILIES + (
    # Mixtral: every block sparse; softmax over the experts, top-k, the k weights renormalized
    replace(_LLAMA, name="mixtral", model_types=("mixtral",), ffn=None, ffn_size_field=None,
            biases=_MOE_BIASES, biases_by_type={}, hidden_size_attrs=_MOE_HIDDEN_ATTRS,
            moe=MoELayout(), refused_ops=_MOE_REFUSED, tiny_config=_TINY_IDS),
    # Qwen2-MoE: a shared expert behind a sigmoid gate in every sparse block; dense blocks where
    # mlp_only_layers / decoder_sparse_step say; q/k/v biases (qkv_bias)
    replace(_LLAMA, name="qwen2_moe", model_types=("qwen2_moe",), biases_by_type={},
            biases={"qkv": ("qkv_bias", True), "o": False, "ffn": False}, hidden_size_attrs=_MOE_HIDDEN_ATTRS,
            moe=replace(_QWEN_MOE, shared_expert=replace(_LLAMA_FFN, module="shared_expert"),
                        shared_expert_gate="shared_expert_gate",
                        shared_expert_size_field="shared_expert_intermediate_size"),
            refused_ops=_MOE_REFUSED,
            tiny_config={**_TINY_IDS, "mlp_only_layers": lambda layers: [0] if layers > 1 else []}),
    # Qwen3-MoE: Qwen3's per-head q/k norms, no shared expert
    replace(_LLAMA, name="qwen3_moe", model_types=("qwen3_moe",), biases_by_type={}, biases=_MOE_BIASES,
            attention=replace(_LLAMA_ATTENTION, qk_norms=("q_norm", "k_norm")), hidden_size_attrs=_MOE_HIDDEN_ATTRS,
            moe=_QWEN_MOE, refused_ops=_MOE_REFUSED,
            tiny_config={**_TINY_IDS, "norm_topk_prob": True}),
    # OLMoE: every block sparse; q/k norms over the whole projection (weight [heads x head_dim]),
    # head_dim derived from d_model (q_norm is sized by hidden_size)
    replace(_LLAMA, name="olmoe", model_types=("olmoe",), ffn=None, ffn_size_field=None, biases_by_type={},
            biases=_MOE_BIASES, hidden_size_attrs=_MOE_HIDDEN_ATTRS,
            attention=replace(_LLAMA_ATTENTION, qk_norms=("q_norm", "k_norm"), qk_norm_per_head=False,
                              width_follows_hidden=True),
            moe=MoELayout(num_experts_field="num_experts", norm_topk_field="norm_topk_prob"),
            refused_ops={**_MOE_REFUSED, "add_heads": _OLMOE_QK}, tiny_config=_TINY_IDS),
    # GPT-OSS: every block sparse; top-k of the router logits (router bias), softmax over those k
    # (so always normalised); clamped SwiGLU (up + 1)·gate·σ(α·gate) inside the experts module;
    # one learned attention sink per head; sliding and full attention alternating (layer_types)
    replace(_LLAMA, name="gpt_oss", model_types=("gpt_oss",), ffn=None, ffn_size_field=None, biases_by_type={},
            biases={"qkv": ("attention_bias", True), "o": ("attention_bias", True), "ffn": True},
            hidden_size_attrs=("model.layers.*.hidden_size", "model.layers.*.mlp.router.hidden_dim",
                               "model.layers.*.mlp.experts.hidden_size"),
            attention=replace(_LLAMA_ATTENTION, head_params=("sinks",)), per_layer_fields=("layer_types",),
            moe=_GPT_OSS_MOE, refused_ops=_MOE_REFUSED, tiny_config={**_TINY_IDS, "sliding_window": 4}),
)

_T5_ATTENTION = AttentionLayout(module="layer.0.SelfAttention", out="o", q="q", k="k", v="v",
                                num_heads_field="num_heads", heads_attr="n_heads", head_dim_field="d_kv",
                                width_attr="inner_dim", per_head_embedding="relative_attention_bias",
                                per_head_embedding_flag="has_relative_attention_bias")
FAMILIES = FAMILIES + (
    ArchFamily(
        # T5 and CodeT5: two stacks; block 0 of each holds the relative position bias it passes on
        name="t5", model_types=("t5",), kind="seq2seq", blocks="encoder.block",
        ffn=FFNLayout(module="layer.1.DenseReluDense", up="wi", down="wo", act="act"),
        gated_ffn=FFNLayout(module="layer.1.DenseReluDense", up="wi_1", down="wo", act="act", gate="wi_0"),
        gated_ffn_flag="is_gated_act",
        attention=_T5_ATTENTION,
        norms=("layer.0.layer_norm", "layer.1.layer_norm"), final_norm="encoder.final_layer_norm",
        embeddings="shared", num_layers_field="num_layers", ffn_size_field="d_ff", hidden_size_field="d_model",
        biases={"qkv": False, "o": False, "ffn": False}, tied_by_default=True, norm_params=1,
        norm_eps_field="layer_norm_epsilon",
        refused_ops={"widen_hidden": "T5 is an encoder-decoder: its two stacks, the cross-attention and the shared "
                                     "embedding would have to grow together, and its tied head's d_model^-0.5 scale "
                                     "changes with d_model"},
        stacks=(
            StackLayout(name="encoder", blocks="encoder.block", num_layers_field="num_layers",
                        ffn_module="layer.1.DenseReluDense", config_copy="encoder.config"),
            StackLayout(name="decoder", blocks="decoder.block", num_layers_field="num_decoder_layers",
                        ffn_module="layer.2.DenseReluDense", extra_outputs=("layer.1.EncDecAttention.o",),
                        config_copy="decoder.config", generation_cache_field="decoder_layers"),
        ),
    ),
)


# Plain nn.Sequential MLPs (the on-the-fly-expansion note's small models): no config, so they are
# recognised by having none (engine.model.view.ArchView.of); hidden layer i is the output of Linear i.
FAMILIES = FAMILIES + (
    ArchFamily(
        name="mlp", model_types=("sequential",), kind="mlp", layer_types=("Linear",),
        elementwise_types=("ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Tanh",
                           "Sigmoid", "Softplus", "Softsign", "Tanhshrink", "Hardtanh", "Hardswish",
                           "Hardsigmoid", "LogSigmoid", "Dropout", "AlphaDropout", "Identity"),
    ),
)


def residual_scaling_refusal(family: ArchFamily) -> str | None:
    """Why depth-µP's residual scaling (``[train] residual_scaling = "depth_mup"``,
    engine.train.depth_scaling) cannot apply to `family`'s models, in a few words; None when it
    can. It needs one stack of plain residual blocks, each writing the stream through its
    attention output and FFN down projections (or through its post-norms' gains)."""
    if family.kind == "mlp":
        return "an nn.Sequential MLP has no residual blocks"
    if family.kind != "causal_lm" or family.stacks:
        return f"{family.name} is an encoder-decoder (two stacks of blocks and cross-attention)"
    if family.moe is not None:
        return f"{family.name} blocks are a mixture of experts (routed FFNs)"
    return None


def upcycle_targets(family: ArchFamily) -> dict[str, str]:
    """Model type -> the MoE family it upcycles to, for the model types this entry serves (an
    entry made from another by `replace` keeps its dict, so only its own types count)."""
    return {t: name for t, name in family.upcycle_to.items() if t in family.model_types}


def _norm_placement(family: ArchFamily) -> str:
    pre = [n for n in family.norms if n not in family.post_norms]
    parts = [f"inputs ({', '.join(pre)})" if pre else "",
             f"outputs ({', '.join(family.post_norms)})" if family.post_norms else ""]
    return " and ".join(p for p in parts if p)


def block_layout_difference(dense: ArchFamily, moe: ArchFamily) -> str | None:
    """How `moe`'s blocks compute something else than `dense`'s outside the FFN (norm placement,
    norm kind and gain, q/k norms, embedding scale, logit cap), or None: an upcycle keeps them."""
    if (dense.norms, dense.post_norms) != (moe.norms, moe.post_norms):
        return (f"{dense.name} blocks normalise their sub-layers' {_norm_placement(dense)}, {moe.name} blocks "
                f"their {_norm_placement(moe)}")
    facts = {"norm kind": lambda f: (f.norm_kind, f.norm_offset), "embedding scale": lambda f: f.embedding_scale,
             "final logit cap": lambda f: f.final_softcap_field,
             "q/k norms": lambda f: (f.attention.qk_norms, f.attention.qk_norm_per_head)}
    for what, fact in facts.items():
        if fact(dense) != fact(moe):
            return f"{what}: {dense.name} {fact(dense)}, {moe.name} {fact(moe)}"
    return None


def _upcycle_refusal(family: ArchFamily, by_name: dict) -> str | None:
    """Why `upcycle` does not apply to `family`, from the entries, or None."""
    if family.moe is not None:
        return "its blocks are a mixture of experts already — grow them with add_experts"
    for name in dict.fromkeys(upcycle_targets(family).values()):
        target = by_name.get(name)
        reason = f"no {name} entry" if target is None else block_layout_difference(family, target)
        if reason:
            return f"its blocks differ from {name}'s ({reason}): {name} blocks cannot compute {family.name} blocks"
    if not upcycle_targets(family):
        return "transformers has no mixture-of-experts class with its blocks"
    return None


def _with_moe_refusals(family: ArchFamily, by_name: dict, sources: str) -> ArchFamily:
    """`upcycle` and `add_experts` refused where they cannot apply, the reason derived from the
    entries: a family already of experts, one without an MoE class of transformers to become, one
    whose blocks differ from its MoE class's (OLMo-2 normalises outputs, OLMoE inputs)."""
    reason = _upcycle_refusal(family, by_name)
    if family.kind != "causal_lm" or reason is None:
        return family
    refused = dict(family.refused_ops)
    if family.moe is None:
        refused.setdefault("add_experts", f"its blocks have no experts and cannot be upcycled into them ({reason})")
        reason += f" — upcycle applies to model types {sources}"
    refused.setdefault("upcycle", reason)
    return replace(family, refused_ops=refused)


# upcycle's and add_experts' refusals, derived once every entry (the MoE targets too) exists
_BY_NAME = {f.name: f for f in FAMILIES}
_UPCYCLE_SOURCES = ", ".join(t for f in FAMILIES if f.kind == "causal_lm" and _upcycle_refusal(f, _BY_NAME) is None
                             for t in upcycle_targets(f))
FAMILIES = tuple(_with_moe_refusals(f, _BY_NAME, _UPCYCLE_SOURCES) for f in FAMILIES)


def ffn_layouts() -> list[FFNLayout]:
    """Every FFN layout a family describes (gated variants included)."""
    return [layout for f in FAMILIES for layout in (f.ffn, f.gated_ffn) if layout is not None]


# A config attribute naming the family to use instead of the model type's ([model] family in a
# plan): set by engine.model.sources when the model is loaded, saved with the config, so a checkpoint
# or an export reloaded by widen keeps it (plain transformers ignores it).
FAMILY_OVERRIDE_ATTR = "widen_family"


def family_named(name: str) -> ArchFamily:
    for family in FAMILIES:
        if family.name == name and family.kind != "mlp":
            return family
    names = ", ".join(f.name for f in FAMILIES if f.kind != "mlp")
    raise UnsupportedArchitecture(f"model.family: no family '{name}' — families: {names}")


def family_of(config) -> ArchFamily:
    """The family describing a config: the one it names (FAMILY_OVERRIDE_ATTR), else its model type's."""
    named = getattr(config, FAMILY_OVERRIDE_ATTR, None)
    if named:
        return family_named(named)
    return family_for(getattr(config, "model_type", type(config).__name__))


def family_for(model_type: str) -> ArchFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    # model types a config can name (the nn.Sequential entry has no config to name it)
    supported = ", ".join(t for f in FAMILIES if f.kind != "mlp" for t in f.model_types)
    raise UnsupportedArchitecture(f"model type '{model_type}' is not supported — supported: {supported}; a model "
                                  "with the module tree of one of these families can name it: [model] family = "
                                  "\"llama\" (checked against the model)")


class UnsupportedArchitecture(WidenError, ValueError):
    pass
