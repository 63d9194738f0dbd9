"""What the CLI and the TUI both render: Rich tables, one line per event, PNG figures."""
