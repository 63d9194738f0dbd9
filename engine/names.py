"""Names that become file names: tasks, variants, stages, adapters, runs.

A plan is user input and a run directory may be shared, so a name must never turn into a path
outside the directory it is written in. Plans are checked with ``name_problem`` (one clear line
at `plan check`); every write joins names with ``child_path``, which refuses anything that would
leave its directory even if a check was skipped (a hand-edited plan.toml inside a run).
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.errors import UnsafeName

# Letters, digits, '_', '-', '.', '+' and '=' (not first), at most 64 characters: safe as a file
# name on every filesystem, readable in a table, and never '.' or '..'.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def _shown(value: str) -> str:
    """The value quoted on one line (newlines and control characters escaped), at most ~40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def name_problem(value: object) -> str | None:
    """Why `value` cannot name a task/variant/plan (a message with the fix), or None if it can."""
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__} — write the name in quotes"
    if _NAME.fullmatch(value):  # fullmatch: '$' would accept a trailing newline
        return None
    return (f"{_shown(value)} cannot be a name — use 1 to 64 letters, digits, '_', '-', '.', '+', '=', "
            f"starting with a letter or digit (it becomes a file name)")


# Stage names are labels (tables, events, the monitor), never file names: they may also hold
# spaces, ':', ',' and parentheses ("base:prose", "python (final size)"), but never a path
# separator, a control character or a leading '.', and at most 64 characters.
LABEL_PATTERN = r"^[^\W_][\w .+=:,()&#'<>@%-]{0,63}$"
_LABEL = re.compile(LABEL_PATTERN)


def label_problem(value: object) -> str | None:
    """Why `value` cannot be a stage's name (a message with the fix), or None if it can."""
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__} — write the name in quotes"
    if _LABEL.fullmatch(value):
        return None
    return (f"{_shown(value)} cannot be a stage name — use 1 to 64 letters, digits, spaces and "
            f"_ . + = : , ( ) & # ' < > @ % -, starting with a letter or digit (no '/' or '\\')")


def child_path(directory: Path | str, name: str, suffix: str = "") -> Path:
    """`directory / (name + suffix)`, refused (UnsafeName) unless it stays inside `directory`."""
    problem = name_problem(name)
    if problem:
        raise UnsafeName(problem)
    directory = Path(directory)
    path = directory / f"{name}{suffix}"
    if path.resolve().parent != directory.resolve():
        raise UnsafeName(f"'{name}' would be written outside {directory}")
    return path
