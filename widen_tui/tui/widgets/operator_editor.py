"""One operator of a stage: the op, which layers, and the op's own fields from its schema.

The form is generated from the op's schema (``engine.ops.params.OPS[op].schema``): a per-layer toggle row for
``layers`` (sized by the depth at this point of the plan), the mapping grid for map_layers, and a
row per other field (size, init, mode, r, modules, ...). Choosing another op rebuilds the form,
keeping ``layers`` when both ops have it.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Label, Select, Static

from engine.ops.params import OPS
from widen_tui.tui.plan_draft import UNSET, KeyPath, dotted, widget_id
from widen_tui.tui.widgets.layer_toggles import LayerToggles
from widen_tui.tui.widgets.mapping_editor import MAPPING_KEYS, MappingEditor
from widen_tui.tui.widgets.schema_form import Edited, Hint, SchemaForm


def op_choices() -> list[tuple[str, str]]:
    """The ops offered, in their descriptors' builder order (as docs/operators.md lists them)."""
    return [(d.name, d.name) for d in sorted(OPS.values(), key=lambda d: d.builder_order)]


def op_summary(op: str) -> str:
    descriptor = OPS.get(op) if isinstance(op, str) else None
    return descriptor.summary if descriptor is not None else ""


def switch_op(old: dict, new_op: str) -> dict:
    """The table for `new_op` replacing `old`: layers kept when both ops take them."""
    table = {"op": new_op}
    if "layers" in old and "layers" in OPS[new_op].schema.model_fields:
        table["layers"] = old["layers"]
    return table


class OperatorEditor(Vertical):
    """`path`: the operator's table in the plan (``stages.1.expand.0``)."""

    DEFAULT_CSS = """
    OperatorEditor { height: auto; }
    OperatorEditor > .field-row { height: auto; }
    """

    depth: reactive[int | None] = reactive(None)
    problem: reactive[str] = reactive("")

    def __init__(self, op: dict, path: KeyPath, number: int, depth: int | None = None) -> None:
        super().__init__(classes="operator-editor panel", id=widget_id("op", path))
        self.op = dict(op) if isinstance(op, dict) else {}
        self.path = tuple(path)
        self.number = number
        self.set_reactive(OperatorEditor.depth, depth)
        self.border_title = f"operator {number}"

    @property
    def dotted_path(self) -> str:
        return dotted(self.path)

    def compose(self) -> ComposeResult:
        name = self.op.get("op")
        known = isinstance(name, str) and name in OPS
        options = op_choices() + ([] if known or not name else [(f"{name}  (unknown)", name)])
        with Horizontal(classes="field-row op-row"):
            yield Label("op*", classes="field-name", markup=False)
            yield Select(options, value=name if name else Select.NULL, allow_blank=not name, compact=True,
                         prompt="choose an operator…", id=widget_id("opsel", self.path), classes="op-select")
        yield Static(op_summary(name) if known else "", classes="op-summary muted", markup=False)
        if not known:
            yield Static("", classes="field-problem error", markup=False)
            return
        schema = OPS[name].schema
        if "layers" in schema.model_fields:
            yield Horizontal(Label("layers", classes="field-name", markup=False),
                             LayerToggles(self.path + ("layers",), self.op.get("layers", UNSET), self.depth,
                                          id=widget_id("layers", self.path)),
                             classes="field-row layers-row")
        skip = {"op", "layers"}
        if name == "map_layers":
            skip |= set(MAPPING_KEYS)
            yield MappingEditor(self.path, self.op, self.depth)
        yield SchemaForm(schema, self.path, self.op, skip=skip)
        yield Static("", classes="field-problem error", markup=False)

    # -- data from the screen -------------------------------------------------------------------
    def watch_depth(self, depth: int | None) -> None:
        for toggles in self.query(LayerToggles):
            toggles.depth = depth
        for editor in self.query(MappingEditor):
            editor.depth = depth

    def watch_problem(self, problem: str) -> None:
        self.set_class(bool(problem), "-invalid")
        for static in self.query_children(".field-problem"):
            static.update(problem)

    # -- edits ----------------------------------------------------------------------------------
    @on(Edited)
    def _keep_table_current(self, event: Edited) -> None:
        """Follow every edit inside this operator, so the mapping grid reads current keys."""
        if event.path[: len(self.path)] != self.path or len(event.path) != len(self.path) + 1:
            return
        key = event.path[-1]
        if event.value is UNSET:
            self.op.pop(key, None)
        else:
            self.op[key] = event.value
        if key not in MAPPING_KEYS:
            for editor in self.query(MappingEditor):
                editor.set_op(self.op)

    @on(Select.Changed, ".op-select")
    async def _op_chosen(self, event: Select.Changed) -> None:
        event.stop()
        if event.value is Select.NULL or event.value == self.op.get("op"):
            return
        self.op = switch_op(self.op, event.value)
        self.post_message(Edited(self.path, dict(self.op)))
        await self.recompose()  # another op: another form (only this operator's)
        self.query_one(".op-select", Select).focus()

    def on_descendant_focus(self, event) -> None:
        if event.widget.has_class("op-select"):
            summary = op_summary(self.op.get("op", "")) or "choose an operator"
            self.post_message(Hint(f"{self.dotted_path}.op: {summary}"))
