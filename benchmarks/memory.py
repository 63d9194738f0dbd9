"""Peak memory per rank under FSDP2 for 1, 2 and 4 processes, on a model of about 113M parameters.

    .venv/bin/python benchmarks/memory.py [--nproc 1 2 4] [--layers 12] [--hidden 768]

One run per process count of the same plan, as real runs (`widen`'s worker, under
`python -m torch.distributed.run` for more than one process, strategy fsdp): load a random Llama
from a local Hugging Face directory (written once, next to the runs), train one stage of 6 steps,
grow at step 3 (`--grow`: widen_ffn +512 by default, trigger "at"), evaluate and checkpoint at the
stage's end.

Each process's peak resident memory is its kernel high-water mark (``VmHWM`` in
``/proc/<pid>/status``), read every 20 ms while it lives: the last reading before it exits is its
peak. On a GPU the run's own `ranks` events give the CUDA memory at each log step. The table
gives the largest rank's peak and its ratio to one process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.plan import load_plan  # noqa: E402
from engine.runs.events import read_all  # noqa: E402
from engine.runs.rundir import RunDir  # noqa: E402
from widen_tui.launcher import create_run, worker_command, worker_env  # noqa: E402

PLAN = """
name = "memory-bench"
seed = 0
[model]
source = "{model}"
tokenizer = "bytes"
[tasks.prose]
source = "builtin:pydoc"
max_docs = 40
[train]
batch_size = 4
seq_len = 64
lr = 1e-4
eval_interval = 0
eval_batches = 2
log_interval = 1
device = "auto"
[[stages]]
task = "prose"
steps = 6
[stages.grow]
trigger = "at"
at_steps = [3]
[[stages.grow.expand]]
{grow}
"""

# the growth at step 3: one operator of each way an FSDP run applies them (docs/scale.md)
GROWTHS = {
    "widen_ffn": 'op = "widen_ffn"\nsize = 512',                          # one unit at a time
    "map_layers": 'op = "map_layers"\nkeep_ends = {{depth = {depth}}}\nkinds = "real"',  # one source block at a time
    "widen_hidden": 'op = "widen_hidden"\nsize = 24\ninit = "lossless"',    # one block at a time, walking them
}


def write_model(directory: Path, layers: int, hidden: int) -> int:
    """A random Llama (byte vocabulary) saved as a Hugging Face directory; returns its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if not (directory / "config.json").exists():
        model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def peak_hwm(pids: dict[int, str], peaks: dict[str, float]) -> None:
    for pid, rank in list(pids.items()):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peaks[rank] = max(peaks.get(rank, 0.0), int(line.split()[1]) / 1024 ** 2)  # GiB
        except OSError:
            pids.pop(pid)


def one_run(root: Path, plan_path: Path, nproc: int) -> tuple[RunDir, dict[str, float]]:
    overrides = [f"train.distributed.nproc={nproc}", "train.distributed.strategy=fsdp"] if nproc > 1 else []
    run = create_run(load_plan(plan_path, overrides), plan_path, root)
    process = subprocess.Popen(worker_command(run), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=worker_env())  # as `widen run` starts it
    pids: dict[int, str] = {}
    peaks: dict[str, float] = {}
    while process.poll() is None:
        try:
            for child in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
                command = child.cmdline()  # the worker itself, not torchrun (whose arguments name it)
                if child.pid not in pids and "engine.train.worker" in command and "torch.distributed.run" not in command:
                    pids[child.pid] = f"{int(child.environ().get('RANK', '0')):03d}-{child.pid}"
        except psutil.Error:
            pass
        peak_hwm(pids, peaks)
        time.sleep(0.02)
    return run, peaks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--grow", choices=sorted(GROWTHS), default="widen_ffn", help="the growth at step 3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, layers, hidden in (("model", args.layers, args.hidden), ("fixed", 2, 64)):
            model_dir = Path(tmp) / label
            params = write_model(model_dir, layers, hidden)
            plan_path = Path(tmp) / f"{label}.toml"
            grow = GROWTHS[args.grow].format(depth=layers + 2)
            plan_path.write_text(textwrap.dedent(PLAN.format(model=model_dir, grow=grow)))
            for nproc in args.nproc:
                run, peaks = one_run(Path(tmp) / "runs", plan_path, nproc)
                events = read_all(run.events)
                growths = sum(e.type == "expand" for e in events)
                checkpoint = "dcp" if (run.checkpoints / "latest" / "dcp").is_dir() else "whole"
                rows.append((label, params, nproc, run.status()["state"], growths, checkpoint, peaks))
    model_params = rows[0][1]
    base = max(rows[0][6].values())
    fixed = {nproc: max(peaks.values()) for label, _, nproc, _, _, _, peaks in rows if label == "fixed"}
    table = Table(title=f"Peak resident memory per rank, FSDP2 on CPU (gloo): a {model_params / 1e6:.0f}M-parameter "
                        f"Llama loaded, grown mid-stage ({args.grow}), evaluated, checkpointed; 'fixed': the same "
                        f"run of a {rows[-1][1] / 1e6:.2f}M one (what a process costs without the model)")
    for column in ("model", "processes", "state", "growths", "checkpoint", "each rank's peak (GiB)", "largest",
                   "÷ one process", "bytes / parameter"):
        table.add_column(column, justify="right")
    for label, params, nproc, state, growths, checkpoint, peaks in rows:
        largest = max(peaks.values())
        per_param = (largest - fixed[nproc]) * 1024 ** 3 / params if label == "model" else None
        table.add_row(label, str(nproc), state, str(growths), checkpoint,
                      " ".join(f"{peaks[r]:.2f}" for r in sorted(peaks)), f"{largest:.2f}",
                      f"{largest / base:.2f}" if label == "model" else "",
                      f"{per_param:.1f}" if per_param is not None else "")
    Console(width=180).print(table)
    print("bytes / parameter: (the largest rank's peak - the fixed run's) / parameters, at the model's size "
          "before its growth. docs/scale.md turns them into the largest model each strategy can grow.")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
