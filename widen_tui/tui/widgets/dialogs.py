"""Small modal dialogs of the plan builder: pick a plan to start from, name a file, confirm."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

NEW_PLAN = "new"  # the picker's "from scratch" choice

DIALOG_CSS = """
    $name {
        align: center middle;
    }
    $name > .dialog {
        width: 76;
        max-width: 100%;
        height: auto;
        max-height: 22;
        border: round $accent;
        padding: 0 1;
        background: $surface;
    }
    $name OptionList {
        height: auto;
        max-height: 16;
    }
"""


def dialog_css(name: str) -> str:
    return DIALOG_CSS.replace("$name", name)


class PlanPicker(ModalScreen[Path | str | None]):
    """Start from a ready plan (experiments/*.toml and the given file) or from scratch.
    Dismisses with the chosen Path, NEW_PLAN, or None (cancelled)."""

    DEFAULT_CSS = dialog_css("PlanPicker")
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, files: list[Path]) -> None:
        super().__init__()
        self.files = files

    def compose(self) -> ComposeResult:
        options = [Option("✚ new plan from scratch (built-in model, one task, one stage)", id=NEW_PLAN)]
        options += [Option(_label(path), id=str(i)) for i, path in enumerate(self.files)]
        with Vertical(classes="dialog"):
            yield Label("Start the plan from…", classes="title", markup=False)
            yield OptionList(*options, id="plan-choices")
            yield Label("enter: open · esc: cancel", classes="muted", markup=False)

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        choice = event.option.id
        self.dismiss(NEW_PLAN if choice == NEW_PLAN else self.files[int(choice)])


def _label(path: Path) -> Text:
    """The plan's name, and what its header comment says it is (or where it lives)."""
    try:
        shown = str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    summary = shown
    try:
        first = path.read_text().splitlines()[0]
        if first.startswith("#"):
            summary = first.lstrip("# ").partition(" — ")[2] or first.lstrip("# ")
    except (OSError, IndexError):
        pass
    return Text.assemble((path.stem, "bold"), "\n  ", (summary[:68] + ("…" if len(summary) > 68 else ""), "dim"))


class FileNamePrompt(ModalScreen[Path | None]):
    """Ask where to save the plan."""

    DEFAULT_CSS = dialog_css("FileNamePrompt")
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, suggestion: str, title: str = "Save the plan as") -> None:
        super().__init__()
        self.suggestion = suggestion
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title", markup=False)
            yield Input(self.suggestion, placeholder="plans/my-plan.toml", id="file-name")
            yield Label("enter: save · esc: cancel", classes="muted", markup=False)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if text:
            path = Path(text).expanduser()
            self.dismiss(path if path.suffix else path.with_suffix(".toml"))


class Confirm(ModalScreen[bool]):
    """A yes/no question (y / n, enter confirms, esc declines)."""

    DEFAULT_CSS = dialog_css("Confirm")
    BINDINGS = [Binding("y,enter", "dismiss(True)", "Yes"), Binding("n,escape", "dismiss(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, markup=False)
            yield Label("y / enter: yes · n / esc: no", classes="muted", markup=False)
