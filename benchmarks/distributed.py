"""Training speed on 1 and N processes (DDP and FSDP2 under torchrun), and what a growth costs.

    .venv/bin/python benchmarks/distributed.py [--nproc 2] [--steps 60] [--batch 8] [--seq 64]

Runs one plan (the built-in model: a stage, then a stage with a zero-init FFN widening that
also grows once on a plateau, Net2WiderNet in place) as real runs: in one process (one thread,
as torchrun gives each rank, and two threads: how much changing nothing but the rounding moves
the losses), and under `python -m torch.distributed.run --nproc_per_node N`, with the same
global batch. Prints
tokens/s of the training steps (median over the logged windows) with the ratio against one
process, the largest step-loss difference between the two (they should train alike), and the
seconds a plateau growth took: grow, carry the optimizer state, re-wrap in DDP (FSDP: gather the
weights and moments whole, rebuild, grow, re-shard, scatter the moments).
On CPU the processes share the cores, so N processes are not N times faster; on N GPUs they are
meant to be.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.plan import load_plan  # noqa: E402
from engine.runs.events import read_all  # noqa: E402
from engine.runs.records import StepEvent  # noqa: E402
from engine.runs.rundir import RunDir  # noqa: E402
from widen_tui.launcher import create_run, worker_command  # noqa: E402

PLAN = """
name = "distributed-bench"
seed = 0
[model]
source = "builtin:tiny-neo"
[tasks.prose]
source = "builtin:pydoc"
[train]
batch_size = {batch}
seq_len = {seq}
lr = 3e-3
eval_interval = 0
eval_batches = 2
log_interval = 5
device = "auto"
[[stages]]
task = "prose"
steps = {steps}
[[stages]]
task = "prose"
steps = {steps}
[[stages.expand]]
op = "widen_ffn"
size = 128
[stages.grow]
patience = 1
threshold = 0.5
check_interval = 5
warmup_checks = 1
max_growths = 1
[[stages.grow.expand]]
op = "widen_ffn"
size = 128
init = "net2net"
mode = "inplace"
"""


def one_run(root: Path, plan_path: Path, nproc: int, threads: int = 1, strategy: str = "ddp") -> RunDir:
    overrides = [f"train.distributed.nproc={nproc}", f"train.distributed.strategy={strategy}"] if nproc > 1 else []
    run = create_run(load_plan(plan_path, overrides), plan_path, root)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # torchrun's default for each rank: 1
    subprocess.run(worker_command(run), cwd=ROOT, check=True, capture_output=True, env=env)
    return run


def figures(run: RunDir) -> dict:
    events = read_all(run.events)
    steps = [e for e in events if isinstance(e, StepEvent)]
    growths = (run.results() or {}).get("growths", [])
    return {"tokens_per_s": statistics.median(e.tokens_per_s for e in steps[1:]),
            "growth_steps": [g["step"] for g in growths],
            "losses": [(e.global_step, e.loss) for e in steps],
            "growth_s": [e.get("seconds") for e in growths],
            "state": run.status()["state"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.toml"
        plan_path.write_text(textwrap.dedent(PLAN.format(batch=args.batch, seq=args.seq, steps=args.steps)))
        configs = {"1": (1, 1, "ddp"), "1, 2 threads": (1, 2, "ddp"), f"{args.nproc} ddp": (args.nproc, 1, "ddp"),
                   f"{args.nproc} fsdp": (args.nproc, 1, "fsdp")}
        results = {name: figures(one_run(Path(tmp) / "runs", plan_path, n, threads, strategy))
                   for name, (n, threads, strategy) in configs.items()}
    base = results["1"]
    table = Table(title=f"DDP and FSDP2 under torchrun: global batch {args.batch}×{args.seq} tokens, "
                        f"{2 * args.steps} steps with a widening and a plateau growth")
    for column in ("processes", "state", "tokens/s", "vs 1 process", "rel Δloss ≤ step 40", "rel Δloss, all",
                   "growth at step", "growth (s)"):
        table.add_column(column, justify="right")
    for n, r in results.items():
        deltas = [(step, abs(a - b) / abs(a)) for (step, a), (_, b) in zip(base["losses"], r["losses"])]
        growth = ", ".join(f"{s:.3f}" for s in r["growth_s"] if s is not None) or "none"
        table.add_row(n, r["state"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×",
                      f"{max(d for step, d in deltas if step <= 40):.1e}", f"{max(d for _, d in deltas):.1e}",
                      ", ".join(map(str, r["growth_steps"])) or "none", growth)
    Console(width=140).print(table)
    print("The first steps agree to float precision; after that rounding differences (one mean over the batch vs "
          "the mean of per-rank means; or only another thread count, row 2) grow over the steps, as training "
          "amplifies them.")


if __name__ == "__main__":
    main()
