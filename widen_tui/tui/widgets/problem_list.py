"""The plan checker's messages, one row each; enter on a row asks the builder to go there."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.message import Message
from textual.widgets import DataTable

from engine.plan import Problem


class GoToField(Message):
    """Show the field the plan checker names (a dotted path such as stages.1.expand.0.size)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path


class ProblemList(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_column("field", key="field")
        self.add_column("problem", key="problem")

    def show(self, problems: list[Problem]) -> None:
        self.clear()
        if not problems:
            self.add_row("✓", "no problems: the plan is ready to launch")
            return
        for i, problem in enumerate(problems):
            self.add_row(Text(problem.path or "(plan)", style="bold"), Text(problem.message), key=f"{i}:{problem.path}")

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        key = event.row_key.value or ""
        if ":" in key:
            self.post_message(GoToField(key.partition(":")[2]))
