"""The terminal front end of widen: the CLI, the TUI and the runs index."""
