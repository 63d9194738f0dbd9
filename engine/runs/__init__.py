"""Run files and their readers: the run directory, typed event records, status, results, and
everything that reads them back (live progress, curves, compare, compute to target, forgetting,
trackers). No torch here: the CLI and the TUI read runs through this package."""
