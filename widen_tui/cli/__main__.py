"""`python -m widen_tui.cli`: the `widen` command."""

from widen_tui.cli import main

main()
