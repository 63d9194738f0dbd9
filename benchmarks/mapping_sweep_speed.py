"""Mapping sweep: prefix-shared evaluation against evaluating each mapping from layer 0.

    .venv/bin/python benchmarks/mapping_sweep_speed.py [--device auto] [--batches 2] [--seq-len 128]

For several source -> target depths of GPT-Neo models shaped like the built-in one (random
weights: speed does not depend on training), sweeps the default mapping set (first and last layer
kept, non-decreasing; for 30 -> 36 layers, SmolLM2-135M's depth, a handful of each mapping family)
both ways in the same run and prints the wall time of each, the block calls each needs, their
ratio (the speed-up prefix sharing can give at most) and the speed-up. Both ways give the same
perplexities (the max |Δloss| column). `--real`: the 30 -> 36 case on the real SmolLM2-135M
(`widen real-model`, fetched and cached once) instead of a random model of its depth.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, GPTNeoConfig

from engine.grow.sweep import default_mappings, mapping_sweep
from engine.model.sources import BUILTIN_MODELS

CASES = [(4, 4, None), (4, 8, None), (6, 8, None), (8, 12, 60), (30, 36, None)]   # (source layers, depth, limit)


def model_with(layers: int, device: torch.device):
    fields = {k: v for k, v in BUILTIN_MODELS["tiny-neo"].items() if k != "model_type"}
    fields.update(num_layers=layers, attention_types=[[["global", "local"], layers // 2]])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPTNeoConfig(**fields), attn_implementation="eager").to(device).eval()


def real_model(device: torch.device):
    from engine.model import real_models
    from engine.model.sources import load_model
    from engine.plan import ModelSpec
    from engine.runs.rundir import runs_root

    found = real_models.ensure(real_models.DEFAULT, runs_root(), log=print)
    model, _ = load_model(ModelSpec(source=str(found.directory)), seed=0, attention="eager")
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--real", action="store_true", help="30 -> 36 on SmolLM2-135M (widen real-model)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        x = torch.randint(3, 259, (args.batch_size, args.seq_len + 1), generator=generator)
        batches.append((x[:, :-1].to(device), x[:, 1:].to(device)))

    table = Table(title=f"{'SmolLM2-135M: ' if args.real else ''}mapping sweep on {device}: prefix sharing vs each mapping from layer 0 "
                        f"({args.batches}×{args.batch_size}×{args.seq_len} tokens)", header_style="bold")
    for col in ("source → depth", "mappings", "block calls shared", "block calls naive", "ratio", "shared s",
                "naive s", "speed-up", "max |Δloss|"):
        table.add_column(col, justify="right")
    for layers, depth, limit in CASES:
        if args.real and layers != 30:
            continue
        model = real_model(device) if args.real else model_with(layers, device)
        mappings = default_mappings(layers, depth, keep_ends=True, limit=limit)
        result = mapping_sweep(model, batches, mappings, measure_naive=True)
        calls = result["block_calls"]
        table.add_row(f"{layers} → {depth}", str(len(mappings)), str(calls["cached"]), str(calls["naive"]),
                      f"{result['sharing_ratio']:.2f}×", f"{result['cached_s']:.3f}", f"{result['naive_s']:.3f}",
                      f"{result['speedup']:.2f}×", f"{result['naive_max_loss_diff']:.1e}")
    Console(width=max(Console().width, 120)).print(table)


if __name__ == "__main__":
    main()
