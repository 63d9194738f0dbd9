"""Training speed and memory of the built-in model before and after widening its FFNs.

    .venv/bin/python benchmarks/widen_ffn_speed.py [--steps 20] [--device auto] [--size 128]

Prints tokens/s of a training step (forward + backward + AdamW) as a ratio against the unwidened
model measured in the same run, with `parallel` (a separate path beside the frozen FFN) and
`inplace` (wider matrices) widening, each with the base frozen and unfrozen. Memory: peak CUDA
allocation on a GPU, else the process RSS.
"""

from __future__ import annotations

import argparse
import os
import time

import psutil
import torch
from rich.console import Console
from rich.table import Table

from engine.grow.apply import Freezer, apply_stage
from engine.model.sources import load_model
from engine.plan import ExpandSpec, ModelSpec


def build(variant: str, size: int, device: torch.device):
    """The model for one variant and its freezer (which counts masked entries right)."""
    model, view = load_model(ModelSpec(), seed=0)
    freezer = Freezer()
    if variant != "base":
        mode, freeze = variant.split("/")
        growth = apply_stage(model, view, 0, [ExpandSpec(op="widen_ffn", size=size, mode=mode)], None,
                             torch.Generator().manual_seed(0), measure=False)
        freezer.apply(model, freeze, growth)
    return model.to(device), freezer


def measure(model, device, batch: int, seq: int, steps: int) -> tuple[float, float]:
    x = torch.randint(3, 259, (batch, seq), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 3):
        if step == 3:  # warm-up steps are not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        logits = model(input_ids=x).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else psutil.Process(os.getpid()).memory_info().rss) / 2**20
    return steps * batch * seq / elapsed, memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--size", type=int, default=128, help="units added per FFN (the quickstart's quarter)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    table = Table(title=f"widen_ffn +{args.size} units/layer on builtin:tiny-neo · {device} · "
                        f"batch {args.batch}×{args.seq} · {args.steps} timed steps")
    for col in ("variant", "params", "trainable", "tokens/s", "× base", "memory MB"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    base_speed = None
    for variant in ("base", "parallel/none", "parallel/base", "inplace/none", "inplace/base"):
        model, freezer = build(variant, args.size, device)
        speed, memory = measure(model, device, args.batch, args.seq, args.steps)
        base_speed = base_speed or speed
        total = sum(p.numel() for p in model.parameters())
        trainable = freezer.trainable(model)
        table.add_row(variant, f"{total:,}", f"{trainable:,}", f"{speed:,.0f}", f"{speed / base_speed:.2f}",
                      f"{memory:,.0f}")
        del model
    Console().print(table)
    print("inplace/base trains whole wider tensors with a gradient mask (frozen entries get zero "
          "gradient), so it computes the full backward; parallel/base skips the frozen FFN's weight gradients.")


if __name__ == "__main__":
    main()
