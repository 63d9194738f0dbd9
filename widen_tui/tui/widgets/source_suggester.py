"""Completions for model and task sources: built-in names, names the ready plans use, and
paths on disk (a source that starts like a path completes from the directory listing)."""

from __future__ import annotations

import os
from pathlib import Path

from textual.suggester import Suggester


class SourceSuggester(Suggester):
    def __init__(self, names: list[str]) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.names = list(names)

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        for name in self.names:
            if name.startswith(value) and name != value:
                return name
        if value.startswith(("/", ".", "~")) or os.sep in value:
            return _complete_path(value)
        return None


def _complete_path(value: str) -> str | None:
    path = Path(value).expanduser()
    folder, stem = (path, "") if value.endswith(os.sep) else (path.parent, path.name)
    try:
        entries = sorted(e for e in os.listdir(folder) if e.startswith(stem) and not e.startswith("."))
    except OSError:
        return None
    if not entries:
        return None
    completed = value[: len(value) - len(stem)] + entries[0]
    return completed + (os.sep if (folder / entries[0]).is_dir() else "")
