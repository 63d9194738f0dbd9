"""What mirroring to TensorBoard costs a training step: the quickstart plan (shortened, no
mid-stage evaluations) with ``report_to = ["tensorboard"]`` against no tracker, in one process.

    .venv/bin/python benchmarks/tracker_overhead.py [--steps 40] [--repeats 5] [--log-interval 10]

Runs alternate (none, tensorboard, then tensorboard, none, ...) so that a slow spell of a shared
machine falls on both arms alike. Step time: the run's training wall time (results.json
summary.wall_s, the stage loops with their logging and the mirror) over its steps. Each repeat
gives one ratio tensorboard / none; the table shows the median and the spread of those ratios.
The mirror's own time (spent in the event writer's listener, on the training thread) is timed
directly too: it does not depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from engine.plan import load_plan
from engine.runs import trackers
from engine.train.loop import Trainer
from widen_tui.launcher import create_run

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
ARMS = {"none": "[]", "tensorboard": '["tensorboard"]'}
MIRROR_S = [0.0]  # seconds spent in the listener, this run


def timed_attach(writer, names, run_dir):
    """engine.runs.trackers.attach, with the listener it installs timed."""
    _attach(writer, names, run_dir)
    listener = getattr(writer, "listener", None)
    if listener is not None:
        def timed(event):
            start = time.perf_counter()
            listener(event)
            MIRROR_S[0] += time.perf_counter() - start
        writer.listener = timed


_attach = trackers.attach


def step_time(root: Path, steps: int, log_interval: int, report_to: str) -> tuple[float, float]:
    """(seconds per step, seconds per step in the mirror)"""
    overrides = [f"stages.0.steps={steps}", f"stages.1.steps={steps}", "train.eval_interval=0",
                 f"train.log_interval={log_interval}", "train.device=cpu", f"train.report_to={report_to}"]
    plan = load_plan(QUICKSTART, overrides)
    run = create_run(plan, QUICKSTART, root)
    MIRROR_S[0] = 0.0
    Trainer(run.path).run_plan()
    summary = run.results()["summary"]
    return summary["wall_s"] / (2 * steps), MIRROR_S[0] / (2 * steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="steps per stage (the quickstart has 200)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--log-interval", type=int, default=10, help="the quickstart's default: 10")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trackers.attach = timed_attach  # engine.train.loop calls it as trackers.attach
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    mirror: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        step_time(Path(tmp), 2, args.log_interval, ARMS["tensorboard"])  # warm-up: caches, imports
        for r in range(args.repeats):
            order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                seconds, in_mirror = step_time(Path(tmp), args.steps, args.log_interval, ARMS[arm])
                times[arm].append(seconds)
                if arm == "tensorboard":
                    mirror.append(in_mirror)
    ratios = [t / n for t, n in zip(times["tensorboard"], times["none"])]
    table = Table(title=f"report_to = [\"tensorboard\"] vs none · quickstart plan, {args.steps}+{args.steps} steps, "
                        f"log_interval {args.log_interval}, {args.repeats} interleaved repeats · "
                        f"{torch.get_num_threads()} threads")
    for col in ("arm", "median step ms", "min", "max"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, values in times.items():
        table.add_row(arm, *(f"{1000 * v:.1f}" for v in (statistics.median(values), min(values), max(values))))
    table.add_section()
    table.add_row("ratio tensorboard/none", f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}",
                  f"{max(ratios):.3f}")
    table.add_row("mirror's own ms per step", f"{1000 * statistics.median(mirror):.3f}",
                  f"{1000 * min(mirror):.3f}", f"{1000 * max(mirror):.3f}")
    console = Console()
    console.print(table)
    console.print("ratios per repeat: " + ", ".join(f"{r:.3f}" for r in ratios), highlight=False)


if __name__ == "__main__":
    main()
