"""One device used well: tokens/s and peak memory per speed setting, through the real training loop.

    .venv/bin/python benchmarks/gpu.py [--device cuda|cpu] [--steps N] [--batch N] [--seq N] [--only CONFIG...]
                                       [--model builtin:tiny-neo | tiny-gpt2 | tiny-llama | DIR]

Each configuration is one real run (a stage, then a stage after a zero-init FFN widening, so
compile pays its re-compile after a growth), in its own worker process so peak memory is its own:
eager+fp32 (the baseline), sdpa+fp32, sdpa+bf16, then sdpa+bf16 with checkpointing, with compile,
with grad_accum=4. tokens/s is the median of the logged windows, leaving out each stage's first
(warm-up; for compile, the compilation); "1st after growth" is the first window of the second
stage. Peak memory is results.json's torch_peak_mb on CUDA, peak_rss_mb (the whole process,
libraries included) on CPU. "attention" is what the model got: a family without an sdpa kernel in
transformers (GPT-Neo, the built-in model) keeps eager, so there sdpa rows equal eager ones;
`--model tiny-gpt2` / `tiny-llama` write a random model of the built-in's size in a family that
has sdpa. A setting the loop does not use yet trains as its base configuration: the table prints
what was measured, nothing more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.plan import load_plan  # noqa: E402
from engine.runs.events import read_all  # noqa: E402
from engine.runs.records import StartEvent, StepEvent  # noqa: E402
from engine.runs.rundir import RunDir  # noqa: E402
from widen_tui.launcher import create_run, worker_command  # noqa: E402

PLAN = """
name = "gpu-bench"
seed = 0
[model]
source = "{model}"
[tasks.prose]
source = "builtin:pydoc"
[train]
batch_size = {batch}
seq_len = {seq}
lr = 1e-3
eval_interval = 0
eval_batches = 1
log_interval = {log_interval}
device = "{device}"
[[stages]]
task = "prose"
steps = {steps}
[[stages]]
task = "prose"
steps = {steps}
[[stages.expand]]
op = "widen_ffn"
size = 128
"""

BASE = ["train.attention=eager", "train.dtype=float32"]
CONFIGS = {
    "eager+fp32": BASE,
    "sdpa+fp32": ["train.attention=sdpa", "train.dtype=float32"],
    "sdpa+bf16": ["train.attention=sdpa", "train.dtype=bfloat16"],
    "sdpa+bf16+checkpointing": ["train.attention=sdpa", "train.dtype=bfloat16", "train.checkpointing=true"],
    "sdpa+bf16+compile": ["train.attention=sdpa", "train.dtype=bfloat16", "train.compile=true"],
    "sdpa+bf16+grad_accum=4": ["train.attention=sdpa", "train.dtype=bfloat16", "train.grad_accum=4"],
}

# random models of the built-in's size (hidden 128, 4 layers, 4 heads, FFN 512, byte vocabulary)
# in families whose transformers classes have sdpa
TINY = {
    "tiny-gpt2": ("GPT2Config", dict(vocab_size=259, n_embd=128, n_layer=4, n_head=4, n_inner=512, n_positions=512,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "tiny-llama": ("LlamaConfig", dict(vocab_size=259, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=512, max_position_embeddings=512)),
}


def model_source(name: str, tmp: Path) -> str:
    if name not in TINY:
        return name
    import torch
    import transformers

    config_class, fields = TINY[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**fields))
    model.save_pretrained(tmp / name)
    return str(tmp / name)


def attention_used(plan) -> tuple[str, str | None]:
    """What load_model gives for the plan's train.attention (from the config: no weights loaded);
    the run's start event says it too, and wins where it does."""
    from engine.model.sources import BUILTIN_MLPS, choose_attention, load_config

    if plan.model.source.removeprefix("builtin:") in BUILTIN_MLPS:
        return "none", None
    import transformers

    config = load_config(plan.model)
    auto = transformers.AutoModelForSeq2SeqLM if config.model_type == "t5" else transformers.AutoModelForCausalLM
    return choose_attention(auto, config, plan.train.attention)


def one_run(root: Path, plan_path: Path, overrides: list[str]) -> tuple[RunDir, float, tuple]:
    plan = load_plan(plan_path, overrides)
    run = create_run(plan, plan_path, root)
    started = time.perf_counter()
    subprocess.run(worker_command(run), cwd=ROOT, capture_output=True, env=dict(os.environ))
    return run, time.perf_counter() - started, attention_used(plan)


def figures(run: RunDir, device: str) -> dict:
    events = read_all(run.events)
    steps = [e for e in events if isinstance(e, StepEvent)]
    start = next((e for e in events if isinstance(e, StartEvent)), None)
    by_stage: dict[int, list[StepEvent]] = {}
    for event in steps:
        by_stage.setdefault(event.stage, []).append(event)
    steady = [e.tokens_per_s for events in by_stage.values() for e in events[1:]]
    results = run.results() or {}
    summary = results.get("summary", {})
    status = run.status()
    return {"state": status.get("state"), "error": status.get("error") or status.get("message"),
            "attention": getattr(start, "attention", None),  # what the run's model got, as its start event says
            "tokens_per_s": statistics.median(steady) if steady else None,
            "after_growth": by_stage[1][0].tokens_per_s if len(by_stage.get(1, [])) > 0 else None,
            "peak_mb": summary.get("torch_peak_mb" if device == "cuda" else "peak_rss_mb")}


def ratio(value, base) -> str:
    return f"{value / base:.2f}×" if value and base else "—"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="builtin:tiny-neo",
                        help="builtin:tiny-neo, tiny-gpt2 or tiny-llama (random, built here), or a local HF directory")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage (default 8 on CPU, 200 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 4 on CPU, 64 on CUDA)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 32 on CPU, 512 on CUDA)")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="a subset of the configurations")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    steps, batch, seq = (args.steps or (200 if cuda else 8), args.batch or (64 if cuda else 4),
                         args.seq or (512 if cuda else 32))
    configs = {name: CONFIGS[name] for name in (args.only or CONFIGS)}
    if "eager+fp32" not in configs:
        configs = {"eager+fp32": BASE, **configs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan_path = tmp / "plan.toml"
        plan_path.write_text(textwrap.dedent(PLAN.format(
            model=model_source(args.model, tmp), batch=batch, seq=seq, steps=steps, device=args.device,
            log_interval=max(1, steps // (8 if cuda else 4)))))
        results = {}
        for name, overrides in configs.items():
            run, seconds, (attention, fallback) = one_run(tmp / "runs" / name, plan_path, overrides)
            measured = figures(run, args.device)
            results[name] = {**measured, "attention": measured["attention"] or attention, "fallback": fallback,
                             "seconds": seconds}
            print(f"  {name}: {results[name]['state']} in {seconds:.0f} s", file=sys.stderr)
    base = results["eager+fp32"]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"{args.model} on {where}: batch {batch}×{seq} tokens, 2 stages × {steps} steps "
                        f"(a widening between)")
    for column in ("config", "attention", "state", "tokens/s", "vs eager+fp32", "1st after growth",
                   "peak MB" + (" (torch)" if cuda else " (RSS)"), "vs eager+fp32", "run s"):
        table.add_column(column, justify="left" if column in ("config", "attention", "state") else "right")
    for name, r in results.items():
        table.add_row(name, r["attention"], r["state"] or "?",
                      f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—", ratio(r["tokens_per_s"], base["tokens_per_s"]),
                      f"{r['after_growth']:,.0f}" if r["after_growth"] else "—",
                      f"{r['peak_mb']:,.0f}" if r["peak_mb"] else "—", ratio(r["peak_mb"], base["peak_mb"]),
                      f"{r['seconds']:.0f}")
    Console(width=160).print(table)
    for reason in dict.fromkeys(r["fallback"] for r in results.values() if r["fallback"]):
        print(reason)
    for name, r in results.items():
        if r["state"] != "done":
            print(f"{name}: {r['state']} — {r['error']}")
    if not cuda:
        print("CPU peak memory is the worker's whole RSS (Python, torch, transformers included): activations are a "
              "small part of it for a tiny model, so the memory ratios stay near 1.")


if __name__ == "__main__":
    main()
