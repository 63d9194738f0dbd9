"""The `widen` command line: the root Typer app, `--version` and `main()`, assembled from one module
per group of verbs. Start-up stays light: torch is imported only by verbs that need it (`plan
show`, `doctor`, `export`, `sweep`) or by the worker subprocess.

- launch.py   run, demo, resume, join, cancel
- follow.py   watch, logs
- listing.py  runs, show, db rebuild
- compare.py  compare
- exports.py  export, export-metrics
- figures.py  plot
- system.py   tui, doctor
- plans.py    plan check, plan show
- sweep.py    sweep mapping
- common.py   what several verbs share: consoles, finding a run, warnings, JSON output
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from engine.errors import WidenError
from widen_tui.cli import compare, exports, figures, follow, launch, listing, plans, sweep, system
from widen_tui.cli.common import err

app = typer.Typer(help="widen — grow trained neural networks, train on new tasks, see what was "
                       "gained and forgotten.", no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False)
# A group added without a name gives its verbs to the root; `widen --help` lists them in this order.
for group in (launch, follow, listing, compare, exports, figures, system):
    app.add_typer(group.commands)
app.add_typer(plans.plan_app, name="plan")
app.add_typer(listing.db_app, name="db")
app.add_typer(sweep.sweep_app, name="sweep")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("widen")
        except PackageNotFoundError:  # a bare checkout, not installed
            number = "unknown (not installed: `make setup`)"
        typer.echo(f"widen {number}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print widen's version and exit")] = False) -> None:
    """widen — grow trained neural networks, train on new tasks, see what was gained and forgotten."""


def main() -> None:
    try:
        # without standalone mode click returns a typer.Exit's code instead of raising it
        # prog_name: usage lines and the completion variable (_WIDEN_COMPLETE) say `widen`, also under -m
        code = app(standalone_mode=False, prog_name="widen")
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except WidenError as e:  # widen's own: the message is the whole story
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # click usage errors and anything unexpected: one line, no traceback
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a usage error (typer vendors click)
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("WIDEN_DEBUG"):
            raise
        err.print(f"error: {e.__class__.__name__}: {e} (WIDEN_DEBUG=1 shows the traceback)",
                  highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
