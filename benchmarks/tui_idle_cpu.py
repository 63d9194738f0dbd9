"""CPU used by the TUI while it watches a run: a finished run, and a live one.

The TUI runs as a real process in a pseudo-terminal (100×32), as a person would run it; psutil
reads its CPU time over a measuring window after the history has loaded. Two programs are
measured for each case:

- ``monitor``: an app showing only the run monitor (what the monitor itself costs);
- ``widen tui RUN``: the real app (the runs list underneath, the monitor on top).

The live run is the tiny plan with many steps, started detached and cancelled afterwards; the
training process is not counted (it is not the TUI).

    .venv/bin/python benchmarks/tui_idle_cpu.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAN = """
name = "idle-cpu"
seed = 3

[model]
source = "builtin:tiny-neo"

[tasks.prose]
source = "builtin:pydoc"
eval_fraction = 0.2

[tasks.python]
source = "builtin:stdlib-python"
max_docs = 40

[train]
batch_size = 4
seq_len = 32
lr = 3e-3
eval_interval = {eval_interval}
eval_batches = 1
log_interval = 1
device = "cpu"

[[stages]]
task = "prose"
steps = {steps}

[[stages]]
task = "python"
steps = {steps}
freeze = "base"

[[stages.expand]]
op = "widen_ffn"
layers = "all"
size = 16
"""


def monitor_only(root: str, run_id: str) -> None:
    """The child program for the `monitor` rows: an app that shows one run's monitor."""
    from widen_tui.tui.app import WidenApp
    from widen_tui.tui.screens.monitor import MonitorScreen

    class MonitorOnly(WidenApp):
        CSS_PATH = str(ROOT / "widen_tui" / "app.tcss")

        def on_mount(self, event) -> None:
            event.prevent_default()
            self.push_screen(MonitorScreen(run_id))

    MonitorOnly(root).run()


def widen(*args: str, home: Path) -> str:
    env = dict(os.environ, WIDEN_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "widen_tui.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=True)
    return proc.stdout.strip()


def in_pty(argv: list[str], home: Path, size: tuple[int, int] = (100, 32)) -> tuple[subprocess.Popen, int]:
    """Start `argv` on a new pseudo-terminal of `size`; its output is read and thrown away."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    env = dict(os.environ, WIDEN_HOME=str(home), TERM="xterm-256color", COLORTERM="truecolor")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                            start_new_session=True)
    os.close(slave)

    def drain() -> None:
        while True:
            try:
                if not os.read(master, 65536):
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    return proc, master


def measure(argv: list[str], home: Path, seconds: float, warmup: float) -> dict:
    """Average CPU % (user + system, 100 = one core) of the TUI process over `seconds`, after
    `warmup` seconds for start-up and the first read of the history."""
    proc, master = in_pty(argv, home)
    try:
        ps = psutil.Process(proc.pid)
        time.sleep(warmup)
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(argv)} exited early with {proc.returncode}")
        c0, t0 = ps.cpu_times(), time.monotonic()
        time.sleep(seconds)
        c1, t1 = ps.cpu_times(), time.monotonic()
        rss = ps.memory_info().rss / 2**20
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.close(master)
    busy = (c1.user - c0.user) + (c1.system - c0.system)
    return {"cpu_percent": 100 * busy / (t1 - t0), "cpu_s": busy, "window_s": t1 - t0, "rss_mb": rss}


def events_between(run: Path, t0: float, t1: float) -> int:
    count = 0
    with open(run / "events.jsonl") as f:
        for line in f:
            try:
                t = json.loads(line).get("t", 0)
            except json.JSONDecodeError:
                continue
            count += t0 <= t <= t1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window per case")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        monitor_only(*args.child)
        return

    home = Path(tempfile.mkdtemp(prefix="widen-idle-cpu-")) / "runs"
    home.mkdir(parents=True)
    short = home.parent / "short.toml"
    short.write_text(PLAN.format(steps=6, eval_interval=4))
    long = home.parent / "long.toml"
    long.write_text(PLAN.format(steps=100_000, eval_interval=50))

    print("finishing a tiny run…", file=sys.stderr)
    widen("run", str(short), "--detach", home=home)
    done_id = next(p.name for p in home.iterdir() if (p / "run.json").exists())
    while json.loads((home / done_id / "status.json").read_text()).get("state") != "done":
        time.sleep(0.5)

    rows = []

    def case(label: str, run_id: str) -> None:
        for program, argv in (("monitor", [sys.executable, __file__, "--child", str(home), run_id]),
                              ("widen tui RUN", [sys.executable, "-m", "widen_tui.cli", "tui", run_id])):
            print(f"measuring {program} on the {label} run for {args.seconds:.0f}s…", file=sys.stderr)
            t0 = time.time()
            result = measure(argv, home, args.seconds, args.warmup)
            events = events_between(home / run_id, t0 + args.warmup, time.time())
            rows.append((label, program, result, events / result["window_s"]))

    case("finished", done_id)

    print("starting a long live run…", file=sys.stderr)
    live_id = widen("run", str(long), "--detach", home=home)
    try:
        events = home / live_id / "events.jsonl"
        while not (events.exists() and '"step"' in events.read_text()):
            time.sleep(0.5)
        case("live", live_id)
    finally:
        widen("cancel", live_id, home=home)

    print(f"\nTUI process CPU while watching a run ({os.cpu_count()} CPUs; 100% = one core; "
          f"{args.seconds:.0f} s window after {args.warmup:.0f} s warm-up)")
    print(f"{'run':<10} {'program':<15} {'CPU %':>7} {'CPU s':>7} {'RSS MB':>8} {'events/s':>9}")
    for label, program, r, rate in rows:
        print(f"{label:<10} {program:<15} {r['cpu_percent']:>7.2f} {r['cpu_s']:>7.2f} {r['rss_mb']:>8.0f} {rate:>9.1f}")


if __name__ == "__main__":
    main()
