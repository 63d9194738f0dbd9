"""Every plan in experiments/ is valid. The ones that need the network are checked against local
stand-in configs of the same architectures (config only, no weights: `plan check` needs no more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.plan import validate_file

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
EMBEDDED = ["quickstart", "compare_strategies", "progressive_growth", "mapping_sweep", "init_failure_modes",
            "upcycling", "growth_recipes"]
NETWORK = ["layer_widening_codet5", "virtual_layers_tinystories", "net2net_progressive"]
# name the hub id of SmolLM2-135M; run here on `widen real-model`'s copy (--set model.source=...)
REAL = ["real_layer_widening", "real_virtual_layers", "real_init_failure_modes"]


def stand_in(family: str, directory: Path) -> Path:
    """The published configs of the models these plans name, saved locally (shapes only)."""
    from transformers import GPTNeoConfig, GPTNeoXConfig, LlamaConfig, T5Config

    if family == "smollm2-135m":
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                             max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
    elif family == "codet5-small":
        config = T5Config(vocab_size=32100, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                          num_heads=8, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=2)
    elif family == "tinystories-33m":
        config = GPTNeoConfig(vocab_size=50257, hidden_size=768, num_layers=4, num_heads=16,
                              attention_types=[[["global", "local"], 2]], window_size=256,
                              intermediate_size=None, max_position_embeddings=2048)
    else:  # pythia-70m
        config = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                               intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25)
    config.save_pretrained(directory)
    return directory


STAND_INS = {"layer_widening_codet5": "codet5-small", "virtual_layers_tinystories": "tinystories-33m",
             "net2net_progressive": "pythia-70m", **dict.fromkeys(REAL, "smollm2-135m")}


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_experiments_are_valid(name):
    plan, problems = validate_file(EXPERIMENTS / f"{name}.toml")
    assert not problems, [str(p) for p in problems]
    assert plan.model.source.startswith("builtin:")
    assert all(t.source.startswith("builtin:") for t in plan.tasks.values())


@pytest.mark.parametrize("name", NETWORK + REAL)
def test_network_experiments_are_valid_on_stand_in_configs(name, tmp_path):
    directory = stand_in(STAND_INS[name], tmp_path / STAND_INS[name])
    plan, problems = validate_file(EXPERIMENTS / f"{name}.toml", [f'model.source="{directory}"'])
    assert not problems, [str(p) for p in problems]
    assert plan.variants, "each source experiment compares variants"


@pytest.mark.parametrize("name", EMBEDDED + NETWORK + REAL)
def test_each_experiment_says_what_it_reproduces_and_how_long(name):
    header = []
    for line in (EXPERIMENTS / f"{name}.toml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = " ".join(header).lower()
    assert len(header) >= 3 and any(unit in text for unit in ("minute", "hour")), header
    if name in NETWORK + REAL:
        assert "network" in text
    if name in REAL:
        assert "widen real-model" in text and "huggingfacetb/smollm2-135m" in " ".join(
            (EXPERIMENTS / f"{name}.toml").read_text().lower().split())
