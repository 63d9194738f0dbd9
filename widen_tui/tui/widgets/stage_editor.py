"""One stage of the plan: its settings, its operators and, optionally, growth mid-stage (a trigger).

A variant's stage also shows the variant's own name and description (the variant is what a
comparison calls it). Structure changes (growth switched on or off) are ``Edited`` messages with
``rebuild``: the builder redraws the stage from the plan it holds.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Select, Static

from engine.plan import GrowSpec, ModelSpec, StageSpec, VariantSpec
from widen_tui.tui.plan_draft import UNSET, KeyPath, StageRef, widget_id
from widen_tui.tui.widgets.operator_editor import OperatorEditor
from widen_tui.tui.widgets.schema_form import Edited, SchemaForm

GROWTH_CHOICES = [("none: the model keeps its size during the stage", False),
                  ("automatic: apply operators when the trigger fires (plateau, at, budget)", True)]


class StageEditor(Vertical):
    DEFAULT_CSS = """
    StageEditor { height: auto; }
    StageEditor .grow-section { height: auto; }
    """

    def __init__(self, ref: StageRef, stage: dict, variant: dict | None, tasks: list[str],
                 depths: dict[str, int | None]) -> None:
        super().__init__(classes="stage-editor", id=widget_id("stage", ref.path))
        self.ref = ref
        self.stage = stage if isinstance(stage, dict) else {}
        self.variant = variant
        self.tasks = tasks
        self.depths = depths  # operator path (dotted) -> blocks before it

    @property
    def path(self) -> KeyPath:
        return self.ref.path

    def compose(self) -> ComposeResult:
        if self.ref.variant is not None and isinstance(self.variant, dict):
            variant_path = ("variants", self.ref.variant)
            yield Static(f"variant {self.ref.variant + 1}", classes="section-title", markup=False)
            yield SchemaForm(VariantSpec, variant_path, self.variant, skip={"stages", "model"})
            if isinstance(self.variant.get("model"), dict):
                yield Static("its own model", classes="section-title", markup=False)
                yield SchemaForm(ModelSpec, variant_path + ("model",), self.variant["model"])
        yield Static(f"stage {self.ref.label}", classes="section-title", markup=False)
        yield SchemaForm(StageSpec, self.path, self.stage, skip={"expand", "grow"},
                         choices={"task": self.tasks} if self.tasks else None)
        ops = self.stage.get("expand") if isinstance(self.stage.get("expand"), list) else []
        yield Static(self._ops_title(len(ops)), classes="section-title ops-title", markup=False)
        for j, op in enumerate(ops):
            path = self.path + ("expand", j)
            yield OperatorEditor(op, path, j + 1, self._depth(path))
        grow = self.stage.get("grow")
        with Horizontal(classes="field-row grow-toggle"):
            yield Label("growth", classes="field-name", markup=False)
            yield Select(GROWTH_CHOICES, value=isinstance(grow, dict), allow_blank=False, compact=True,
                         id=widget_id("grow", self.path), classes="grow-select")
        if isinstance(grow, dict):
            with Vertical(classes="grow-section"):
                yield SchemaForm(GrowSpec, self.path + ("grow",), grow, skip={"expand"})
                grow_ops = grow.get("expand") if isinstance(grow.get("expand"), list) else []
                yield Static(f"applied at each growth ({len(grow_ops)})", classes="section-title", markup=False)
                for j, op in enumerate(grow_ops):
                    path = self.path + ("grow", "expand", j)
                    yield OperatorEditor(op, path, j + 1, self._depth(path))

    @staticmethod
    def _ops_title(count: int) -> str:
        return f"operators ({count})" + ("" if count else " — ctrl+g adds one")

    async def add_operator(self, op: dict, index: int, depth: int | None) -> OperatorEditor:
        """Show an operator appended to the stage's `expand` (the rest of the form stays)."""
        editor = OperatorEditor(op, self.path + ("expand", index), index + 1, depth)
        await self.mount(editor, before=self.query_one(".grow-toggle"))
        self.query_one(".ops-title", Static).update(self._ops_title(index + 1))
        return editor

    def _depth(self, path: KeyPath) -> int | None:
        return self.depths.get(".".join(str(p) for p in path))

    @on(Select.Changed, ".grow-select")
    def _grow_toggled(self, event: Select.Changed) -> None:
        event.stop()
        has_grow = isinstance(self.stage.get("grow"), dict)
        if event.value == has_grow:
            return
        value = {"expand": [{"op": "widen_ffn"}]} if event.value else UNSET
        self.post_message(Edited(self.path + ("grow",), value, rebuild=True))
