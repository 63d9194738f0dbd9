"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoConfig, GPTNeoXConfig, LlamaConfig

from engine.arch import ArchView

DECODER_FAMILIES = ["gpt_neo", "gpt2", "gpt_neox", "llama"]

VOCAB = 61


def tiny_config(family: str, layers: int, heads: int, head_dim: int, ffn: int):
    hidden = heads * head_dim
    if family == "gpt_neo":
        return GPTNeoConfig(vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            attention_types=[[["global", "local"], layers // 2]] if layers % 2 == 0
                            else [[["global"], layers]], window_size=8, intermediate_size=ffn,
                            max_position_embeddings=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn,
                          n_positions=64)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=1 if heads % 2 else heads // 2 or 1,
                       intermediate_size=ffn, max_position_embeddings=64)


def build(family, layers, heads, head_dim, ffn, seed):
    torch.manual_seed(seed)
    config = tiny_config(family, layers, heads, head_dim, ffn)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for p in model.parameters():  # random (not default-init) weights so zero paths would show
        torch.nn.init.normal_(p, std=0.2)
    return model, ArchView(model.config, model)


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
