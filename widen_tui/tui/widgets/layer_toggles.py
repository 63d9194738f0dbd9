"""A row of per-layer toggles: which blocks an operator acts on.

Sized by the model's depth at that point of the plan (the builder sets ``depth`` from the
preview: an earlier map_layers or insert_identity changes it). ``all`` is its own toggle, as the
plan says it (``layers = "all"`` follows the depth; a list names blocks). Indices the plan names
beyond the depth stay visible, marked, so they can be switched off. Keys: ←/→ move, space or
enter toggles, ``a`` all / none.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.reactive import reactive
from textual.widget import Widget

from widen_tui.tui.plan_draft import UNSET, KeyPath, dotted
from widen_tui.tui.widgets.schema_form import Edited, Hint


class LayerToggles(Widget, can_focus=True):
    BINDINGS = [
        Binding("left", "move(-1)", "Prev layer", show=False),
        Binding("right", "move(1)", "Next layer", show=False),
        Binding("space,enter", "toggle", "Toggle layer"),
        Binding("a", "all", "All layers"),
    ]

    depth: reactive[int | None] = reactive(None, layout=True)
    selection: reactive[Any] = reactive("all", layout=True)   # "all" or a list of block indices
    cursor: reactive[int] = reactive(0)                       # 0: the "all" toggle, i + 1: block i
    problem: reactive[str] = reactive("")

    def __init__(self, path: KeyPath, value: Any, depth: int | None = None, id: str | None = None) -> None:
        super().__init__(id=id, classes="layer-toggles")
        self.path = tuple(path)
        self.set_reactive(LayerToggles.selection, "all" if value in (UNSET, None) else value)
        self.set_reactive(LayerToggles.depth, depth)

    @property
    def dotted_path(self) -> str:
        return dotted(self.path)

    def _chosen(self) -> set:
        return set(self.selection) if isinstance(self.selection, list) else set()

    def _slots(self) -> list[int]:
        """Blocks shown: the depth, plus any index the plan names beyond it."""
        known = self.depth or 0
        extra = sorted(i for i in self._chosen() if isinstance(i, int) and i >= known)
        return list(range(known)) + extra

    def render(self) -> Text:
        text = Text()
        everything = self.selection == "all"
        focused = self.has_focus
        cells = [("all", everything, 0, False)] + [
            (str(i), everything or i in self._chosen(), n + 1, i >= (self.depth or 0))
            for n, i in enumerate(self._slots())]
        for label, on, index, beyond in cells:
            mark = "■" if on else "□"
            style = "bold" if on else "dim"
            if beyond:
                style, label = "bold red", label + "!"
            if focused and index == self.cursor:
                style += " reverse"
            text.append(f"{mark}{label}", style=style)
            text.append(" ")
        if self.depth is None:
            text.append("(the depth here is not known yet: see the check)", style="dim italic")
        if self.problem:
            text.append(f"\n{self.problem}", style="bold red")
        return text

    def on_focus(self) -> None:
        self.post_message(Hint(f"{self.dotted_path}: ←/→ choose a block, space toggles it, a: all / none"))

    def action_move(self, step: int) -> None:
        self.cursor = max(0, min(len(self._slots()), self.cursor + step))

    def _set(self, value: Any) -> None:
        self.selection = value
        self.post_message(Edited(self.path, value))

    def action_all(self) -> None:
        self._set([] if self.selection == "all" else "all")

    def action_toggle(self) -> None:
        if self.cursor == 0:
            self.action_all()
            return
        index = self._slots()[self.cursor - 1]
        chosen = set(range(self.depth or 0)) if self.selection == "all" else self._chosen()
        chosen ^= {index}
        self._set(sorted(chosen))
