"""Tiny random models of every supported family, built from configs (no downloads).

The family list and each family's config fields come from the family table
(engine.model.families): adding a family there adds it to every test that takes these lists."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.model.families import FAMILIES, family_named
from engine.model.view import ArchView

# every decoder-only family; an operator's tests take FAMILIES_FOR(op): those it applies to
ALL_DECODER_FAMILIES = [f.name for f in FAMILIES if f.kind == "causal_lm"]


def families_for(op: str) -> list[str]:
    """The decoder families `op` applies to (the others refuse it in one line)."""
    return [name for name in ALL_DECODER_FAMILIES if family_named(name).refusal(op) is None]


VOCAB = 61
TINY_EXPERTS = 4


def tiny_config(family: str, layers: int, heads: int, head_dim: int, ffn: int):
    """A config of `family` with these sizes: the sizes go to the fields the family entry names,
    then the entry's own tiny_config fields (callables get the depth)."""
    entry = family_named(family)
    att = entry.attention
    fields = {"vocab_size": VOCAB, entry.hidden_size_field: heads * head_dim, entry.num_layers_field: layers,
              att.num_heads_field: heads, entry.positions_field: 64}
    if entry.ffn_size_field:  # MoE families whose every block is sparse have no dense FFN width
        fields[entry.ffn_size_field] = ffn
    if entry.moe:  # TINY_EXPERTS experts of `ffn` units, 2 per token (and a shared expert of `ffn` units)
        moe = entry.moe
        # rounded up to a multiple of 4: the experts kernel (torch's grouped_mm) wants 16-byte strides
        fields.update({moe.num_experts_field: TINY_EXPERTS, moe.top_k_field: 2, moe.expert_size_field: -(-ffn // 4) * 4})
        if moe.shared_expert_size_field:
            fields[moe.shared_expert_size_field] = ffn
    if att.num_kv_heads_field:  # grouped-query attention where the family has it
        fields[att.num_kv_heads_field] = 1 if heads % 2 else heads // 2 or 1
    if not att.width_follows_hidden:
        fields[att.head_dim_field] = head_dim
    for key, value in entry.tiny_config.items():
        fields[key] = value(layers) if callable(value) else value
    return AutoConfig.for_model(entry.hf_model_type or entry.model_types[0], **fields)


def build(family, layers, heads, head_dim, ffn, seed):
    torch.manual_seed(seed)
    config = tiny_config(family, layers, heads, head_dim, ffn)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(model)
    return model, ArchView(model.config, model)


def randomize(model) -> None:
    """Random (not default-init) weights so zero paths would show."""
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)


def token_batch(seed: int = 0, rows: int = 2, length: int = 12):
    x = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return x, torch.roll(x, -1, 1)


def build_t5(layers=2, decoder_layers=3, heads=2, d_kv=4, d_model=16, d_ff=24, gated=False, seed=0):
    """A tiny random T5 (CodeT5 is T5): ReLU FFN (v1.0) or gated-GELU (v1.1)."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                      num_decoder_layers=decoder_layers, num_heads=heads, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model, ArchView(model.config, model)


def train_steps(model, batch, steps: int = 3, lr: float = 0.05) -> None:
    """A few AdamW steps (no weight decay, so frozen entries stay exact) of next-token loss on
    `batch` = (inputs, targets), over whatever requires grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    inputs, targets = batch
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(input_ids=inputs).logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
