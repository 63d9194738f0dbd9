"""widen's headless engine: plans, architectures, operators, training. No Textual, no Typer."""
