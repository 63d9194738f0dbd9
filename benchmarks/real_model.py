"""widen on a real pretrained model (SmolLM2-135M, `widen real-model`): its training loop's tokens/s
against a bare PyTorch loop and against Hugging Face's Trainer, on the same model, batches and
tokens, side by side in one run; each arm's peak resident memory; and the model's load time from
its Hugging Face directory and from its GGUF.

    .venv/bin/python benchmarks/real_model.py [--steps 12] [--repeats 2] [--batch 4] [--seq 64]

Each measurement runs in a fresh process (``--arm``), so every arm starts from the same interpreter
state; the arms rotate between repeats so a slow spell of a shared machine falls on all of them.
- bare: forward, cross-entropy, backward, clip_grad_norm_, AdamW step, zero_grad, schedule step
  (benchmarks/loop_overhead.py's bare loop, on the real model);
- widen: the run's worker loop (engine.train.loop.Trainer): the stage's tokens over its wall time;
- hf-trainer: ``transformers.Trainer`` with the same batches, optimizer (AdamW, torch), learning
  rate, warmup, clipping and no evaluation or saving: its tokens over ``train_runtime``.
Goal (issue): widen ≥ 0.98 of the bare loop and ≥ 1.0 of the Trainer.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import bare as bare_loop  # noqa: E402  (the same bare loop as the built-in model's)
from loop_overhead import widen as widen_loop  # noqa: E402

PLAN = """
name = "real-model-speed"
seed = 0
[model]
source = "{model}"
tokenizer = "{model}"
[tasks.python]
source = "builtin:stdlib-python"
eval_fraction = 0.1
[train]
batch_size = {batch}
seq_len = {seq}
lr = 1e-4
warmup_steps = 2
eval_interval = 0
eval_batches = 1
log_interval = {log_interval}
checkpoint_interval = 0
device = "cpu"
dtype = "float32"
[[stages]]
name = "python"
task = "python"
steps = {steps}
freeze = "none"
"""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hf_trainer(plan_path: Path, cache: Path) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from engine.plan import load_plan
    from engine.train.build import prepare, task_train_batch

    plan = load_plan(plan_path)
    prepared = prepare(plan, cache)
    train, stage = plan.train, plan.stages[0]
    data = prepared.tasks[stage.task]
    # the bare loop's batches, row by row; in order (no shuffle) so each step sees the same batch
    rows = [torch.as_tensor(row, dtype=torch.long) for step in range(stage.steps)
            for row in task_train_batch(data, train, plan.seed, 0, step)[0]]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}  # the model shifts labels itself

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(cache / "hf-trainer"), per_device_train_batch_size=train.batch_size, max_steps=stage.steps,
        learning_rate=stage.lr or train.lr, warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        max_grad_norm=train.grad_clip or 0.0, optim="adamw_torch", lr_scheduler_type="cosine",
        logging_steps=max(1, stage.steps // 6), save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = InOrder(model=prepared.model, args=args, train_dataset=Rows(),
                      data_collator=lambda items: {k: torch.stack([x[k] for x in items]) for k in items[0]})
    metrics = trainer.train().metrics
    return {"tokens_per_s": stage.steps * train.batch_size * train.seq_len / metrics["train_runtime"]}


def load_times(model_dir: Path, gguf: Path) -> dict:
    from engine.model.sources import load_model
    from engine.plan import ModelSpec

    times = {}
    for name, spec in (("directory", ModelSpec(source=str(model_dir))), ("gguf", ModelSpec(source=str(gguf)))):
        start = time.perf_counter()
        load_model(spec, seed=0)
        times[name] = time.perf_counter() - start
    return times


ARMS = {"bare": lambda plan, tmp: bare_loop(plan, tmp / "cache"),
        "widen": lambda plan, tmp: widen_loop(plan, tmp / "runs"),
        "hf-trainer": lambda plan, tmp: hf_trainer(plan, tmp / "cache")}


def measure(arm: str, plan_path: Path, tmp: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--arm", arm, "--plan", str(plan_path), "--tmp", str(tmp)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--arm", choices=[*ARMS, "load"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # one measurement, in this fresh process
        import torch

        torch.manual_seed(0)
        if args.arm == "load":
            from engine.model import real_models
            from engine.runs.rundir import runs_root

            found = real_models.ensure(real_models.DEFAULT, runs_root())
            result = load_times(found.directory, found.gguf)
        else:
            result = ARMS[args.arm](args.plan, args.tmp)
        print(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))
        return
    from rich.console import Console
    from rich.table import Table

    from engine.model import real_models
    from engine.runs.rundir import runs_root

    found = real_models.ensure(real_models.DEFAULT, runs_root(), log=print)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan_path = tmp / "plan.toml"
        plan_path.write_text(textwrap.dedent(PLAN.format(model=found.directory, batch=args.batch, seq=args.seq,
                                                         steps=args.steps, log_interval=max(1, args.steps // 6))))
        measure("bare", plan_path, tmp)  # warm-up: the token cache, the OS's file cache
        arms = list(ARMS)
        for r in range(args.repeats):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                results[arm].append(measure(arm, plan_path, tmp))
        loads = measure("load", plan_path, tmp)
    import torch

    speed = {arm: statistics.median(row["tokens_per_s"] for row in rows) for arm, rows in results.items()}
    table = Table(title=f"{real_models.DEFAULT} ({found.directory.name}), batch {args.batch}x{args.seq}, {args.steps} "
                        f"steps, {args.repeats} rotated repeats, CPU {torch.get_num_threads()} threads, float32")
    for column in ("arm", "tokens/s (median)", "min", "max", "peak RSS MiB", "widen ÷ arm"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm, rows in results.items():
        speeds = [row["tokens_per_s"] for row in rows]
        table.add_row(arm, f"{speed[arm]:,.1f}", f"{min(speeds):,.1f}", f"{max(speeds):,.1f}",
                      f"{max(row['peak_rss_mib'] for row in rows):,.0f}", f"{speed['widen'] / speed[arm]:.3f}")
    console = Console(width=120)
    console.print(table)
    for arm in ("bare", "hf-trainer"):
        ratios = [w["tokens_per_s"] / o["tokens_per_s"] for w, o in zip(results["widen"], results[arm])]
        console.print(f"widen / {arm} per repeat: " + ", ".join(f"{r:.3f}" for r in ratios), highlight=False)
    console.print(f"load: Hugging Face directory {loads['directory']:.1f} s, GGUF (dequantized to float32) "
                  f"{loads['gguf']:.1f} s", highlight=False)


if __name__ == "__main__":
    main()
