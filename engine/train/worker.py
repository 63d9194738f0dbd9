"""`python -m engine.train.worker RUN_DIR [--resume]`: run a plan in its own process.

The launcher starts this detached (new session, output to stderr.log); it writes the run's
events, status, checkpoints and results, and never touches the runs index.

One worker per run: the worker holds an exclusive lock on ``RUN_DIR/worker.lock`` (a kernel
``flock``, released when the process dies, even by kill -9) for its whole life, and writes its
pid to ``worker.owner`` once it holds it. A second worker on the same run exits at once with
``BUSY_EXIT`` and one line on stderr, before it touches any file of the run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

LOCK_FILE = "worker.lock"
OWNER_FILE = "worker.owner"
BUSY_EXIT = 75  # EX_TEMPFAIL: another worker holds the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.train.worker")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)

    # Installed before the slow imports: a cancel during start-up must not kill the worker
    # silently. A signal only leaves the request file, which the training loop polls.
    cancel_request = run_dir / "cancel.request"
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: cancel_request.touch())

    from filelock import FileLock, Timeout

    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 holds the lock for the run
        from engine.train.session import run

        return run(run_dir, resume=args.resume)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = _read_owner(run_dir)
        print(f"widen: run {run_dir.name} already has a worker{f' (pid {owner})' if owner else ''} — "
              f"not starting a second one", file=sys.stderr, flush=True)
        return BUSY_EXIT
    try:
        (run_dir / OWNER_FILE).write_text(str(os.getpid()))
        try:
            from engine.train.session import run  # torch: only once the run is ours
        except Exception as e:  # a broken install: say so in status.json, not only in stderr.log
            _record_start_failure(run_dir, e)
            return 1
        return run(run_dir, resume=args.resume)
    finally:
        lock.release()


def _record_start_failure(run_dir: Path, error: Exception) -> None:
    import time
    import traceback

    from engine.runs.status import identity, record_ending

    traceback.print_exc()
    message = str(error).splitlines()[0][:300] if str(error) else ""
    record_ending(run_dir / "status.json", {
        "state": "failed", "error": f"the worker could not start: {error.__class__.__name__}: {message}",
        "ended": time.time(), **identity()})


def _read_owner(run_dir: Path) -> str | None:
    try:
        text = (run_dir / OWNER_FILE).read_text().strip()
        return text if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
