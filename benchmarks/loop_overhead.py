"""widen's training loop against a bare PyTorch loop: the same model, batches and tokens, one
process, one stage, no evaluations in between.

    .venv/bin/python benchmarks/loop_overhead.py [--steps 60] [--repeats 3] [--batch 8] [--seq 64]

Each measurement runs in a fresh process (``--arm bare|widen``), so both arms start from the same
interpreter state (imports, heap); the arms alternate (bare, widen, then widen, bare, ...) so a slow
spell of a shared machine falls on both alike.
- bare: the plan's model (engine.train.build.prepare), its training batches made up front, then
  forward, cross-entropy, backward, clip_grad_norm_, AdamW step, zero_grad, schedule step.
- widen: the run's worker loop (engine.train.loop.Trainer) on the same plan: its tokens over its
  stage's wall time (``results.json`` ``summary.wall_s``: every step, logging, checks).
Both also report the seconds the garbage collector spent during their loop (gc.callbacks). The
table shows tokens/s, the median of the per-repeat ratios widen / bare and their spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = """
name = "loop-overhead"
seed = 0
[model]
source = "builtin:tiny-neo"
tokenizer = "bytes"
[tasks.prose]
source = "builtin:pydoc"
eval_fraction = 0.2
[train]
batch_size = {batch}
seq_len = {seq}
lr = 3e-3
warmup_steps = 5
eval_interval = 0
eval_batches = 1
log_interval = {log_interval}
checkpoint_interval = 0
device = "cpu"
dtype = "float32"
[[stages]]
name = "prose"
task = "prose"
steps = {steps}
freeze = "none"
"""


class GCTimer:
    """Seconds spent in the garbage collector while installed."""

    def __init__(self):
        self.seconds, self._start = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


def bare(plan_path: Path, cache: Path) -> dict:
    import torch

    from engine.model.forward import batch_to, forward_logits, loss_of
    from engine.plan import load_plan
    from engine.train.build import prepare, task_train_batch
    from engine.train.optim import make_optimizer

    plan = load_plan(plan_path)
    prepared = prepare(plan, cache)
    model, train, stage = prepared.model, plan.train, plan.stages[0]
    data = prepared.tasks[stage.task]
    batches = [batch_to(task_train_batch(data, train, plan.seed, 0, step), prepared.device)
               for step in range(stage.steps)]
    optimizer, scheduler = make_optimizer(model, set(), train, stage)
    model.train()
    timer = GCTimer()
    gc.callbacks.append(timer)
    start = time.perf_counter()
    for inputs, targets in batches:
        loss = loss_of(forward_logits(model, inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        float(loss)  # the loss is read every step, as any loop that logs it does
    seconds = time.perf_counter() - start
    gc.callbacks.remove(timer)
    return {"tokens_per_s": stage.steps * train.batch_size * train.seq_len / seconds, "gc_s": timer.seconds}


def widen(plan_path: Path, runs: Path) -> dict:
    from engine.plan import load_plan
    from engine.train.loop import Trainer
    from widen_tui.launcher import create_run

    plan = load_plan(plan_path)
    run = create_run(plan, plan_path, runs)
    timer = GCTimer()
    trainer = Trainer(run.path)
    train_steps = trainer.train_steps

    def timed_steps(*args, **kwargs):  # the collector's time inside the stage's step loop only
        gc.callbacks.append(timer)
        try:
            return train_steps(*args, **kwargs)
        finally:
            gc.callbacks.remove(timer)

    trainer.train_steps = timed_steps
    trainer.run_plan()
    summary = run.results()["summary"]
    stage = plan.stages[0]
    return {"tokens_per_s": stage.steps * plan.train.batch_size * plan.train.seq_len / summary["wall_s"],
            "gc_s": timer.seconds, "state": run.status()["state"]}


def measure(arm: str, plan_path: Path, tmp: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--arm", arm, "--plan", str(plan_path), "--tmp", str(tmp)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--arm", choices=["bare", "widen"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # one measurement, in this fresh process
        result = bare(args.plan, args.tmp / "cache") if args.arm == "bare" else widen(args.plan, args.tmp / "runs")
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    results: dict[str, list[dict]] = {"bare": [], "widen": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan_path = tmp / "plan.toml"
        plan_path.write_text(textwrap.dedent(PLAN.format(batch=args.batch, seq=args.seq, steps=args.steps,
                                                         log_interval=max(1, args.steps // 6))))
        measure("bare", plan_path, tmp)  # warm-up: the token cache, the OS's file cache
        for r in range(args.repeats):
            for arm in (["bare", "widen"] if r % 2 == 0 else ["widen", "bare"]):
                results[arm].append(measure(arm, plan_path, tmp))
    import torch

    ratios = [w["tokens_per_s"] / b["tokens_per_s"] for w, b in zip(results["widen"], results["bare"])]
    table = Table(title=f"builtin:tiny-neo, batch {args.batch}x{args.seq}, {args.steps} steps, {args.repeats} "
                        f"interleaved repeats, CPU {torch.get_num_threads()} threads")
    for column in ("arm", "tokens/s (median)", "min", "max", "gc s (median)"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm, rows in results.items():
        speeds = [row["tokens_per_s"] for row in rows]
        table.add_row(arm, f"{statistics.median(speeds):,.0f}", f"{min(speeds):,.0f}", f"{max(speeds):,.0f}",
                      f"{statistics.median(row['gc_s'] for row in rows):.3f}")
    table.add_section()
    table.add_row("widen / bare", f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}", f"{max(ratios):.3f}", "")
    Console(width=120).print(table)
    print("ratios per repeat: " + ", ".join(f"{r:.3f}" for r in ratios))


if __name__ == "__main__":
    main()
