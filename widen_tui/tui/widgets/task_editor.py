"""One task of the plan: its name (stages refer to it) and its settings from ``TaskSpec``.

Renaming happens when the name is submitted or left (not on every key), as a ``TaskRenamed``
message: the builder renames the task in every stage that uses it.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.suggester import Suggester
from textual.widgets import Input, Label

from engine.plan import TaskSpec
from widen_tui.tui.plan_draft import widget_id
from widen_tui.tui.widgets.schema_form import Hint, SchemaForm


class TaskRenamed(Message):
    def __init__(self, old: str, new: str) -> None:
        super().__init__()
        self.old = old
        self.new = new


class TaskEditor(Vertical):
    DEFAULT_CSS = """
    TaskEditor { height: auto; }
    TaskEditor > .field-row { height: auto; }
    """

    def __init__(self, name: str, spec: dict, source_suggester: Suggester | None = None) -> None:
        super().__init__(classes="task-editor panel", id=widget_id("task", ("tasks", name)))
        self.task_name = name
        self.spec = spec if isinstance(spec, dict) else {}
        self.source_suggester = source_suggester
        self.border_title = f"task {name}"

    @property
    def path(self) -> tuple:
        return ("tasks", self.task_name)

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field-row"):
            yield Label("name*", classes="field-name", markup=False)
            yield Input(self.task_name, compact=True, id=widget_id("taskname", self.path), classes="task-name",
                        select_on_focus=False)
        yield SchemaForm(TaskSpec, self.path, self.spec, fold=True,
                         suggesters={"source": self.source_suggester} if self.source_suggester else None)

    def _rename(self, value: str) -> None:
        new = value.strip()
        if new and new != self.task_name:
            self.post_message(TaskRenamed(self.task_name, new))

    @on(Input.Submitted, ".task-name")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._rename(event.value)

    @on(Input.Blurred, ".task-name")
    def _blurred(self, event: Input.Blurred) -> None:
        self._rename(event.value)

    @on(Input.Changed, ".task-name")
    def _typing(self, event: Input.Changed) -> None:
        event.stop()  # the name is a key, not a value: renamed on enter or when left

    def on_descendant_focus(self, event) -> None:
        if event.widget.has_class("task-name"):
            self.post_message(Hint(f"tasks.{self.task_name}: the task's name (stages use it); enter renames"))
