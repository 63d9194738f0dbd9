"""`python -m engine.worker RUN_DIR [--resume]`: run a plan in its own process.

The launcher starts this detached (new session, output to stderr.log); it writes the run's
events, status, checkpoints and results, and never touches the runs index.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)

    # Installed before the slow imports: a cancel during start-up must not kill the worker
    # silently. A signal only leaves the request file, which the training loop polls.
    cancel_request = Path(args.run_dir) / "cancel.request"
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: cancel_request.touch())

    from engine.train import run

    return run(args.run_dir, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
