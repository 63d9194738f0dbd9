"""The mapping editor of map_layers: a grid of target layers × source layers.

Each row is a target block, each column a source block of the model at that point of the plan;
the dot says which source the target copies (one per target). The kind column says what the
target is: the source block itself (a source's first use), a real copy (own weights) or a virtual
one (weight-tied). Keyboard: arrows move, space / enter puts the target on the source under the
cursor (digits pick a source directly), ``v`` toggles real / virtual, ``+`` / ``-`` add (a copy of
the current row) / remove a target, ``i`` the identity. Helpers fill the grid: keep-ends
({depth = N}: first and last block kept, the middle stretched) and DUS ({copies, drop}: SOLAR's
depth up-scaling). A plan that uses a helper shows its resolved mapping; editing the grid
writes the explicit mapping instead.

The editor changes only the mapping keys of its operator (mapping, kinds, keep_ends, dus, repeat), with
``Edited`` messages; the other keys (scale, stack) are the operator form's.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import DataTable, Input, Label, Static

from engine.ops.params import DepthUpScaling, KeepEnds, MapLayersParams
from widen_tui.tui.plan_draft import UNSET, KeyPath, dotted, widget_id
from widen_tui.tui.widgets.schema_form import Edited, Hint

MAPPING_KEYS = ("mapping", "keep_ends", "dus", "repeat", "stack_middle", "kinds")


def default_kinds(mapping: list[int], scale: Any = None) -> list[str]:
    """What map_layers does without `kinds`: a source's first use is itself, repeats virtual
    (real when scaled)."""
    seen, kinds = set(), []
    for source in mapping:
        kinds.append("real" if source not in seen or scale is not None else "virtual")
        seen.add(source)
    return kinds


def first_uses(mapping: list[int]) -> set[int]:
    """Targets that hold their source block itself (the source's first appearance)."""
    seen, firsts = set(), set()
    for target, source in enumerate(mapping):
        if source not in seen:
            firsts.add(target)
            seen.add(source)
    return firsts


def normalized_kinds(mapping: list[int], kinds: list[str], scale: Any = None) -> Any:
    """The shortest way to write `kinds`: left out when it is the default, one string when all agree.
    A first use is always the source block itself, so its kind counts as real."""
    firsts = first_uses(mapping)
    kinds = ["real" if t in firsts else k for t, k in enumerate(kinds)]
    if kinds == default_kinds(mapping, scale):
        return UNSET
    repeats = [k for t, k in enumerate(kinds) if t not in firsts]
    if repeats and all(k == repeats[0] for k in repeats):
        return repeats[0]
    return kinds


class MappingGrid(DataTable):
    """The grid itself; the editor around it owns the mapping and the keys."""


class MappingEditor(Vertical):
    DEFAULT_CSS = """
    MappingEditor { height: auto; }
    MappingEditor > MappingGrid { height: auto; max-height: 12; }
    MappingEditor > .mapping-helpers { height: 1; }
    """

    BINDINGS = [
        Binding("space", "assign", "Use source", show=False),
        Binding("v", "toggle_kind", "Real/virtual"),
        Binding("plus,insert", "add_target", "+Target"),
        Binding("minus,delete", "remove_target", "-Target"),
        Binding("i", "identity", "Identity", show=False),
        Binding("k", "keep_ends", "Keep-ends", show=False),
        Binding("d", "dus", "DUS", show=False),
    ] + [Binding(str(n), f"pick({n})", f"Source {n}", show=False) for n in range(10)]

    depth: reactive[int | None] = reactive(None)
    problem: reactive[str] = reactive("")

    def __init__(self, path: KeyPath, op: dict, depth: int | None = None) -> None:
        super().__init__(classes="mapping-editor", id=widget_id("map", path))
        self.path = tuple(path)  # the operator's path
        self.op = dict(op)
        self.set_reactive(MappingEditor.depth, depth)

    @property
    def dotted_path(self) -> str:
        return dotted(self.path)

    # -- the mapping ------------------------------------------------------------------------------
    def current(self) -> tuple[list[int], list[str], str]:
        """(mapping, kinds, note) as the plan says them, helpers resolved at this depth."""
        mapping = self.op.get("mapping")
        note = ""
        if not isinstance(mapping, list) or not all(isinstance(m, int) for m in mapping):
            mapping = None
        helpers = [k for k in ("keep_ends", "dus", "repeat", "stack_middle") if self.op.get(k)]
        if mapping is None and helpers and self.depth:
            try:
                params = MapLayersParams.model_validate({k: v for k, v in self.op.items() if k != "kinds"})
                mapping = params.resolve(self.depth)
                helper = helpers[0]
                note = f"from {helper} = {self.op[helper]} — editing the grid writes this mapping out"
            except (ValidationError, ValueError) as e:
                note = f"helper does not resolve: {e}"
        if mapping is None:
            mapping = list(range(self.depth or 0))
            note = note or "no mapping yet: the identity — move the dots to build one"
        kinds = self.op.get("kinds")
        if isinstance(kinds, str):
            kinds = ["real" if t in first_uses(mapping) else kinds for t in range(len(mapping))]
        elif not (isinstance(kinds, list) and len(kinds) == len(mapping)):
            kinds = default_kinds(mapping, self.op.get("scale"))
        return list(mapping), list(kinds), note

    def _write(self, mapping: list[int], kinds: list[str]) -> None:
        """Post the explicit mapping (and kinds, or their removal); the helpers give way to it."""
        kinds_value = normalized_kinds(mapping, kinds, self.op.get("scale"))
        changes = {"mapping": mapping, "kinds": kinds_value, "keep_ends": UNSET, "dus": UNSET, "repeat": UNSET,
                   "stack_middle": UNSET}
        for key, value in changes.items():
            if value is UNSET and key not in self.op:
                continue
            if value is UNSET:
                self.op.pop(key, None)
            else:
                self.op[key] = value
            self.post_message(Edited(self.path + (key,), value))
        self.refresh_grid()

    def set_op(self, op: dict) -> None:
        """The operator's table as the plan holds it now (data from the form around it)."""
        self.op = dict(op)
        self.refresh_grid()

    # -- widgets ----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static("", classes="mapping-note muted", markup=False)
        yield MappingGrid(cursor_type="cell", zebra_stripes=False, id=widget_id("grid", self.path))
        keep = self.op.get("keep_ends") if isinstance(self.op.get("keep_ends"), dict) else {}
        dus = self.op.get("dus") if isinstance(self.op.get("dus"), dict) else {}
        with Horizontal(classes="mapping-helpers"):
            yield Label("keep-ends depth", classes="helper-label", markup=False)
            yield Input(str(keep.get("depth", "")), placeholder="N", type="integer", compact=True,
                        id=widget_id("keep", self.path), classes="helper-input")
            yield Label("DUS copies", classes="helper-label", markup=False)
            yield Input(str(dus.get("copies", 2)), placeholder="2", type="integer", compact=True,
                        id=widget_id("copies", self.path), classes="helper-input")
            yield Label("drop", classes="helper-label", markup=False)
            yield Input(str(dus.get("drop", "")), placeholder="n", type="integer", compact=True,
                        id=widget_id("drop", self.path), classes="helper-input")
        yield Static("", classes="field-problem error", markup=False)

    def on_mount(self) -> None:
        self.refresh_grid()

    def watch_depth(self) -> None:
        if self.is_mounted:
            self.refresh_grid()

    def watch_problem(self, problem: str) -> None:
        self.set_class(bool(problem), "-invalid")
        for static in self.query(".field-problem"):
            static.update(problem)

    def refresh_grid(self) -> None:
        grid = self.query_one(MappingGrid)
        mapping, kinds, note = self.current()
        sources = max([self.depth or 0] + [m + 1 for m in mapping])
        row, column = grid.cursor_coordinate
        grid.clear(columns=True)
        grid.add_column("target", key="target")
        grid.add_column("kind", key="kind")
        for s in range(sources):
            grid.add_column(f"{s}" if s < (self.depth or 0) else f"{s}!", key=f"s{s}")
        firsts = first_uses(mapping)
        for t, (source, kind) in enumerate(zip(mapping, kinds)):
            label = "itself" if t in firsts else kind
            cells = ["●" if s == source else "·" for s in range(sources)]
            grid.add_row(str(t), label, *cells, key=str(t))
        if mapping:
            grid.move_cursor(row=min(row, len(mapping) - 1), column=max(2, min(column, sources + 1)),
                             animate=False)
        real = sum(1 for t, k in enumerate(kinds) if t not in firsts and k == "real")
        virtual = sum(1 for t, k in enumerate(kinds) if t not in firsts and k == "virtual")
        summary = (f"{self.depth if self.depth is not None else '?'} → {len(mapping)} blocks · "
                   f"{real} real, {virtual} virtual repeats")
        self.query_one(".mapping-note", Static).update(summary + (f"\n{note}" if note else ""))

    # -- keys -------------------------------------------------------------------------------------
    def _cursor(self) -> tuple[int, int | None]:
        row, column = self.query_one(MappingGrid).cursor_coordinate
        return row, (column - 2 if column >= 2 else None)

    def on_descendant_focus(self) -> None:
        self.post_message(Hint(f"{self.dotted_path}.mapping: arrows move · space/enter: this source · "
                               "v: real/virtual · +/-: add/remove target · k/d: keep-ends/DUS helpers"))

    @on(DataTable.CellSelected)
    def _cell_selected(self, event: DataTable.CellSelected) -> None:
        event.stop()
        self.action_assign()

    def action_assign(self) -> None:
        target, source = self._cursor()
        if source is not None:
            self._put(target, source)

    def action_pick(self, source: int) -> None:
        target, _ = self._cursor()
        self._put(target, source)

    def _put(self, target: int, source: int) -> None:
        mapping, kinds, _ = self.current()
        if not 0 <= target < len(mapping):
            return
        mapping[target] = source
        self._write(mapping, kinds)
        self.query_one(MappingGrid).move_cursor(row=target, column=source + 2, animate=False)

    def action_toggle_kind(self) -> None:
        mapping, kinds, _ = self.current()
        target, _ = self._cursor()
        if not 0 <= target < len(mapping):
            return
        if target in first_uses(mapping):
            self.app.notify(f"target {target} is source block {mapping[target]} itself; real/virtual applies to "
                            "its repeats", severity="warning")
            return
        kinds[target] = "virtual" if kinds[target] == "real" else "real"
        self._write(mapping, kinds)

    def action_add_target(self) -> None:
        mapping, kinds, _ = self.current()
        target, _ = self._cursor()
        at = min(target + 1, len(mapping)) if mapping else 0
        source = mapping[target] if mapping else 0
        mapping.insert(at, source)
        kinds.insert(at, "virtual" if self.op.get("scale") is None else "real")
        self._write(mapping, kinds)
        self.query_one(MappingGrid).move_cursor(row=at, animate=False)

    def action_remove_target(self) -> None:
        mapping, kinds, _ = self.current()
        target, _ = self._cursor()
        if len(mapping) <= 1:
            return
        del mapping[target]
        del kinds[target]
        self._write(mapping, kinds)

    def action_identity(self) -> None:
        n = self.depth or 0
        self._write(list(range(n)), ["real"] * n)

    def _helper_int(self, name: str) -> int | None:
        text = self.query_one(f"#{widget_id(name, self.path)}", Input).value.strip()
        return int(text) if text.lstrip("-").isdigit() else None

    def _fill(self, helper: dict) -> None:
        """Fill the grid from a helper, resolved at this depth (the checker's own arithmetic)."""
        if not self.depth:
            self.app.notify("the model's depth is not known yet — wait for the check", severity="warning")
            return
        try:
            params = MapLayersParams.model_validate({"op": "map_layers", **helper})
            mapping = params.resolve(self.depth)
        except (ValidationError, ValueError) as e:
            message = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            self.app.notify(f"{next(iter(helper))}: {message}", severity="error")
            return
        self._write(mapping, default_kinds(mapping, self.op.get("scale")))

    def action_keep_ends(self) -> None:
        depth = self._helper_int("keep")
        if depth is None:
            self.app.notify("type the target depth in 'keep-ends depth' first", severity="warning")
            return
        self._fill({"keep_ends": KeepEnds(depth=max(depth, 2)).model_dump()} if depth >= 2 else {"keep_ends": {"depth": depth}})

    def action_dus(self) -> None:
        copies, drop = self._helper_int("copies") or 2, self._helper_int("drop")
        if drop is None:
            self.app.notify("type how many blocks DUS drops at each seam in 'drop' first", severity="warning")
            return
        self._fill({"dus": DepthUpScaling(copies=max(copies, 2), drop=max(drop, 0)).model_dump()}
                   if copies >= 2 and drop >= 0 else {"dus": {"copies": copies, "drop": drop}})

    @on(Input.Submitted)
    def _helper_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == widget_id("keep", self.path):
            self.action_keep_ends()
        else:
            self.action_dus()

    @on(Input.Changed)
    def _helper_changed(self, event: Input.Changed) -> None:
        event.stop()  # helper values are not plan keys
