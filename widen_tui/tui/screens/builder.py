"""The plan builder: make an expansion plan, see it checked and its parameters counted as you
type, save it as TOML and launch it.

The screen holds the plan as a raw dict (what the file says, no defaults added) and is the only
place that changes it: widgets say what the user did with ``Edited`` messages. Every change
schedules (debounced) the plan checker's checks in thread workers — ``widen plan check`` on the
in-memory dict, its schema part at once and its model part (a hub model's config may take a
while to load) one at a time — and the parameter preview (the plan's operators on a model built
on the meta device, in the helper process ``engine.grow.preview_worker``: this process stays torch-free). Results come back to the screen, which hands them down: messages beside each
field, depths to the layer toggles and mapping grids. The UI never waits for them.

Tabs: Plan (name, model, tasks, training), Stages (one stage at a time: its settings, operators,
growth; variants' stages too), Check (every problem, the parameter table), TOML (what Save writes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Collapsible, Footer, Label, Select, Static, TabbedContent, TabPane

from engine.grow.preview import PlanPreview
from engine.plan import DistributedSpec, ModelSpec, Plan, PlanError, Problem, SweepSpec, TrainSpec
from widen_tui.tui.plan_draft import (
    TOKENIZERS,
    UNSET,
    blank_plan,
    check_draft,
    check_model,
    check_schema,
    dotted,
    experiment_files,
    get_at,
    known_sources,
    load_draft,
    new_stage,
    new_task_name,
    new_variant,
    quiet_hub_logs,
    rename_task,
    set_at,
    stage_refs,
    to_toml,
    widget_id,
)
from widen_tui.tui.preview_client import shared_client
from widen_tui.tui.widgets.binding_commands import BindingCommands
from widen_tui.tui.widgets.dialogs import NEW_PLAN, Confirm, FileNamePrompt, PlanPicker
from widen_tui.tui.widgets.layer_toggles import LayerToggles
from widen_tui.tui.widgets.mapping_editor import MAPPING_KEYS, MappingEditor
from widen_tui.tui.widgets.operator_editor import OperatorEditor
from widen_tui.tui.widgets.param_preview import ParamPreview
from widen_tui.tui.widgets.problem_list import GoToField, ProblemList
from widen_tui.tui.widgets.schema_form import Edited, FieldRow, Hint, SchemaForm
from widen_tui.tui.widgets.source_suggester import SourceSuggester
from widen_tui.tui.widgets.stage_editor import StageEditor
from widen_tui.tui.widgets.task_editor import TaskEditor, TaskRenamed
from widen_tui.views.preview_rows import count, stage_line

CHECK_DELAY = 0.3  # seconds of quiet typing before the plan is checked again


def _table(raw, key: str) -> dict | None:
    """raw[key] when raw is a table holding a table there (the builder edits possibly broken plans)."""
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, dict) else None


@dataclass
class SchemaResult:
    generation: int
    plan: Plan | None
    problems: list[Problem]
    toml: str


@dataclass
class ModelResult:
    generation: int
    problems: list[Problem]
    preview: PlanPreview | None


@dataclass
class CheckResult:
    """What the builder shows: both checks' problems, the preview, the TOML."""

    generation: int
    plan: Plan | None
    problems: list[Problem]
    preview: PlanPreview | None
    toml: str
    model_pending: bool = False  # the model check has not caught up with the latest edit yet


def model_checks(raw: dict) -> tuple[list[Problem], PlanPreview | None]:
    """The config-dependent checks and the preview (from the preview helper, which loads the
    config once per session; None: a newer request superseded this one). When the plan's model
    cannot load, that is the one problem (the checker would only wait for the same failure again)."""
    preview = shared_client().preview(raw)
    if preview is not None and preview.error_field:
        return [Problem(f"model.{preview.error_field}", preview.error)], preview
    return check_model(raw), preview


def _key_path(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in text.split(".")) if text else ()


class BuilderScreen(Screen):
    """`plan_path`: open this plan (a new plan is saved there if it does not exist); None: pick
    a ready plan or start from scratch."""

    CSS_PATH = "builder.tcss"
    COMMANDS = {BindingCommands}
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", tooltip="Save the plan as TOML"),
        Binding("f2", "save_as", "Save as", show=False, tooltip="Save the plan under another name"),
        Binding("ctrl+r", "launch", "Launch", tooltip="Check, save, start the run(s) detached, open the monitor"),
        Binding("L", "launch", "Launch", show=False),
        Binding("ctrl+o", "open", "Open", tooltip="Start from a ready plan or from scratch"),
        Binding("ctrl+t", "add_stage", "+Stage", tooltip="Add a stage after this one"),
        Binding("ctrl+g", "add_operator", "+Op", tooltip="Add an operator to this stage"),
        Binding("ctrl+n", "add_task", "+Task", tooltip="Add a task"),
        Binding("ctrl+b", "add_variant", "+Variant", show=False, tooltip="Add a variant (an arm of a comparison)"),
        Binding("ctrl+y", "remove", "Remove", tooltip="Remove the operator, task or stage being edited"),
        Binding("f9", "remove_variant", "Remove variant", show=False, tooltip="Remove this stage's variant"),
        Binding("f7", "stage(-1)", "Prev stage", show=False),
        Binding("f8", "stage(1)", "Next stage", show=False),
        Binding("f3", "tab('plan')", "Plan tab", show=False),
        Binding("f4", "tab('stages')", "Stages tab", show=False),
        Binding("f5", "tab('check')", "Check tab", show=False),
        Binding("f6", "tab('toml')", "TOML tab", show=False),
        Binding("escape", "back", "Back", tooltip="Leave the builder"),
    ]

    def __init__(self, plan_path: Path | None = None) -> None:
        super().__init__()
        self.plan_path = Path(plan_path) if plan_path else None
        self.raw: dict = blank_plan()
        self.header = ""
        self.modified = False
        self.stage_index = 0
        self.schema: SchemaResult | None = None
        self.model: ModelResult | None = None
        self.checking = False
        self.generation = 0
        self._dirty = False
        self._timer = None
        self.launched: list[str] = []  # run ids of the last launch
        self.files = experiment_files(self.plan_path if self.plan_path and self.plan_path.exists() else None)
        models, task_sources = known_sources(self.files)
        self.model_suggester = SourceSuggester(models)
        self.tokenizer_suggester = SourceSuggester(list(TOKENIZERS) + [m for m in models if "/" in m])
        self.task_suggester = SourceSuggester(task_sources)

    # -- layout -----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static("", id="builder-title", markup=False)
        with TabbedContent(id="builder-tabs", initial="tab-plan"):
            with TabPane("Plan", id="tab-plan"):
                yield VerticalScroll(id="plan-pane")
            with TabPane("Stages", id="tab-stages"):
                with Horizontal(id="stage-bar"):
                    yield Label("stage", classes="field-name", markup=False)
                    yield Select([], prompt="(no stages — ctrl+t adds one)", id="stage-picker", compact=True)
                yield VerticalScroll(id="stage-pane")
            with TabPane("Check", id="tab-check"):
                with VerticalScroll(id="check-pane"):
                    yield Static("problems (enter: go to the field)", classes="section-title", markup=False)
                    yield ProblemList(id="problem-list")
                    yield Static("parameters (from the config, no weights)", classes="section-title", markup=False)
                    yield ParamPreview(id="param-preview")
            with TabPane("TOML", id="tab-toml"):
                with VerticalScroll(id="toml-pane"):
                    yield Static("", id="toml-view", markup=False)
        with Vertical(id="builder-status"):
            yield Static("", id="hint-line", classes="muted", markup=False)
            yield Static("", id="check-line", markup=False)
            yield Static("", id="preview-line", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        if self.plan_path is not None and self.plan_path.exists():
            await self.load(self.plan_path)
            return
        await self.rebuild()
        if self.plan_path is None:
            self.app.push_screen(PlanPicker(self.files), self._picked)

    # -- loading ----------------------------------------------------------------------------------
    async def load(self, path: Path) -> None:
        try:
            raw, header = load_draft(path)
        except PlanError as e:
            self.notify(str(e), severity="error", title="cannot open the plan")
            return
        self.raw, self.header, self.plan_path = raw, header, Path(path)
        self.modified, self.stage_index = False, 0
        await self.rebuild()

    async def start_new(self) -> None:
        self.raw, self.header, self.plan_path = blank_plan(), "", None
        self.modified, self.stage_index = False, 0
        await self.rebuild()

    async def _picked(self, choice) -> None:
        if choice == NEW_PLAN:
            await self.start_new()
        elif choice is not None:
            await self.load(choice)

    async def rebuild(self) -> None:
        """Redraw everything from the plan (after opening one, or a structural change)."""
        await self._build_plan_pane()
        self._update_picker()
        await self.show_stage(self.stage_index)
        self._update_title()
        self.schedule_check()

    async def _build_plan_pane(self) -> None:
        pane = self.query_one("#plan-pane", VerticalScroll)
        await pane.remove_children()
        raw = self.raw
        tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
        widgets: list[Widget] = [
            Static("plan", classes="section-title", markup=False),
            SchemaForm(Plan, (), raw, skip={"model", "tasks", "train", "stages", "variants", "sweep"}),
            Static("model", classes="section-title", markup=False),
            SchemaForm(ModelSpec, ("model",), raw.get("model"),
                       suggesters={"source": self.model_suggester, "tokenizer": self.tokenizer_suggester}),
            Static(f"tasks ({len(tasks)}) — ctrl+n adds one, ctrl+y removes the one being edited",
                   classes="section-title"),
            *[TaskEditor(name, spec, self.task_suggester) for name, spec in tasks.items()],
            Static("training", classes="section-title", markup=False),
            SchemaForm(TrainSpec, ("train",), raw.get("train")),
            Static("processes (DDP under torchrun; the batch above is the global one)", classes="section-title",
                   markup=False),
            SchemaForm(DistributedSpec, ("train", "distributed"), _table(raw.get("train"), "distributed")),
        ]
        if isinstance(raw.get("sweep"), dict):
            widgets += [Static("mapping sweep (after the last stage)", classes="section-title", markup=False),
                        SchemaForm(SweepSpec, ("sweep",), raw["sweep"], choices={"task": list(tasks)})]
        variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
        widgets.append(Static(f"stages: {len(raw.get('stages') or [])} shared, variants: {len(variants)} — "
                              "edit them in the Stages tab (f4)", classes="muted"))
        await pane.mount_all(widgets)

    def _update_picker(self) -> None:
        picker = self.query_one("#stage-picker", Select)
        refs = stage_refs(self.raw)
        self.stage_index = max(0, min(self.stage_index, len(refs) - 1))
        options = [(ref.label, i) for i, ref in enumerate(refs)]
        picker.set_options(options)
        if refs:
            picker.value = self.stage_index

    async def show_stage(self, index: int, focus_id: str | None = None) -> None:
        refs = stage_refs(self.raw)
        pane = self.query_one("#stage-pane", VerticalScroll)
        await pane.remove_children()
        if not refs:
            await pane.mount(Static("no stages yet — ctrl+t adds one, ctrl+b adds a variant", classes="muted", markup=False))
            return
        self.stage_index = max(0, min(index, len(refs) - 1))
        ref = refs[self.stage_index]
        variant = get_at(self.raw, ("variants", ref.variant)) if ref.variant is not None else None
        tasks = list(self.raw.get("tasks") or {}) if isinstance(self.raw.get("tasks"), dict) else []
        depths = self._op_depths()
        await pane.mount(StageEditor(ref, get_at(self.raw, ref.path), variant, tasks, depths))
        picker = self.query_one("#stage-picker", Select)
        if picker.value != self.stage_index:
            picker.value = self.stage_index
        self._annotate()
        if focus_id:
            self._focus_by_id(focus_id)

    def _update_title(self) -> None:
        if self.plan_path is None:
            where = "new plan (not saved yet)"
        else:
            where = f"{self.plan_path.parent.name}/{self.plan_path.name}" if self.plan_path.parent.name \
                else self.plan_path.name
        mark = " ● modified" if self.modified else ""
        self.query_one("#builder-title", Static).update(f"Plan builder · {where}{mark}")

    # -- edits ------------------------------------------------------------------------------------
    @on(Edited)
    async def _edited(self, event: Edited) -> None:
        event.stop()
        if not event.path:
            return
        set_at(self.raw, event.path, copy.deepcopy(event.value))
        self._modified()
        if event.rebuild:
            focused = self.focused.id if self.focused else None
            await self.show_stage(self.stage_index, focus_id=focused)
        if self._changes_stage_labels(event.path):
            self._relabel_picker()
        self.schedule_check()

    def _changes_stage_labels(self, path: tuple) -> bool:
        return (path[-1] in ("name", "task") and "stages" in path) or path[:1] == ("variants",) and path[-1] == "name"

    def _relabel_picker(self) -> None:
        """New labels for the stage picker, without moving off the stage being edited."""
        picker = self.query_one("#stage-picker", Select)
        options = [(ref.label, i) for i, ref in enumerate(stage_refs(self.raw))]
        with picker.prevent(Select.Changed):
            picker.set_options(options)
            if options:
                picker.value = self.stage_index

    @on(Select.Changed, "#stage-picker")
    async def _stage_picked(self, event: Select.Changed) -> None:
        event.stop()
        if isinstance(event.value, int) and event.value != self.stage_index:
            await self.show_stage(event.value)

    @on(TaskRenamed)
    async def _task_renamed(self, event: TaskRenamed) -> None:
        event.stop()
        tasks = self.raw.get("tasks") or {}
        if event.new in tasks:
            self.notify(f"a task named '{event.new}' exists already", severity="error")
            return
        rename_task(self.raw, event.old, event.new)
        self._modified()
        await self.rebuild()
        self._focus_by_id(widget_id("taskname", ("tasks", event.new)))

    @on(Hint)
    def _hint(self, event: Hint) -> None:
        event.stop()
        self.query_one("#hint-line", Static).update(event.text)

    def _modified(self) -> None:
        if not self.modified:
            self.modified = True
            self._update_title()

    # -- checking ---------------------------------------------------------------------------------
    # Two checks per change, in thread workers: the schema check (fast: every field, every cross
    # reference) and the model check (the config-dependent checks and the parameter preview; a hub
    # name's config may take seconds to load, or fail slowly offline). The model check runs one at
    # a time and then once more for the latest plan, so slow loads never pile up and the schema's
    # messages keep coming while one is under way.

    def schedule_check(self) -> None:
        """Check again once the typing pauses."""
        self.generation += 1
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(CHECK_DELAY, self._start_check)
        self.query_one("#check-line", Static).update("… checking")

    def _start_check(self) -> None:
        raw = copy.deepcopy(self.raw)
        self._schema_check(raw, self.header, self.generation)
        if self.checking:
            self._dirty = True  # the model check under way is for an older plan: run again after it
            return
        self.checking, self._dirty = True, False
        self._model_check(raw, self.generation)

    @property
    def settled(self) -> bool:
        """Both checks are done for the plan as it is (tests wait for it)."""
        return (not self.checking and self.schema is not None and self.model is not None
                and self.schema.generation == self.generation == self.model.generation)

    @work(thread=True, group="builder-schema-check", exit_on_error=False)
    def _schema_check(self, raw: dict, header: str, generation: int) -> None:
        plan, problems = check_schema(raw)
        try:
            toml = to_toml(raw, header)
        except Exception as e:  # noqa: BLE001 - a value TOML cannot hold: say so, keep checking
            toml = f"# cannot write this plan as TOML: {e}"
            problems = problems + [Problem("", f"cannot be written as TOML: {e}")]
        self._deliver(self._schema_checked, SchemaResult(generation, plan, problems, toml))

    @work(thread=True, group="builder-model-check", exit_on_error=False)
    def _model_check(self, raw: dict, generation: int) -> None:
        quiet_hub_logs()
        try:
            problems, preview = model_checks(raw)
            if preview is None:  # superseded in the helper by another screen's request: keep what is shown
                preview = self.model.preview if self.model else None
        except Exception as e:  # noqa: BLE001 - the builder keeps going on any plan
            problems, preview = [Problem("model", f"the model checks failed: {e}")], PlanPreview(None, error=str(e))
        self._deliver(self._model_checked, ModelResult(generation, problems, preview))

    def _deliver(self, callback, result) -> None:
        try:
            self.app.call_from_thread(callback, result)
        except RuntimeError:
            pass  # the app is closing

    def _schema_checked(self, result: SchemaResult) -> None:
        if self.is_attached and (self.schema is None or result.generation >= self.schema.generation):
            self.schema = result
            self._show_result()

    def _model_checked(self, result: ModelResult) -> None:
        self.checking = False
        if not self.is_attached:
            return
        self.model = result
        self._show_result()
        if self._dirty or result.generation != self.generation:
            self._start_check()

    @property
    def result(self) -> CheckResult | None:
        """The latest of both checks together."""
        if self.schema is None:
            return None
        model = self.model or ModelResult(-1, [], None)
        return CheckResult(self.schema.generation, self.schema.plan if not model.problems else None,
                           self.schema.problems + model.problems, model.preview, self.schema.toml,
                           model_pending=model.generation != self.generation)

    def _show_result(self) -> None:
        result = self.result
        if result is None:
            return
        problems = result.problems
        if problems:
            first = problems[0]
            line = f"✗ {len(problems)} problem{'s' if len(problems) > 1 else ''} · {first} (f5: all)"
            self.query_one("#check-line", Static).update(line)
        elif result.model_pending:
            self.query_one("#check-line", Static).update("… loading the model's config to check layers and count "
                                                         "parameters")
        else:
            variants = len(self.raw.get("variants") or []) or 1
            self.query_one("#check-line", Static).update(
                f"✓ ready to launch · {variants} run{'s' if variants > 1 else ''} (ctrl+r)")
        self.query_one("#check-line").set_class(bool(problems), "error")
        self.query_one("#preview-line", Static).update(self._preview_line())
        self.query_one(ProblemList).show(problems)
        self.query_one(ParamPreview).show(result.preview)
        self.query_one("#toml-view", Static).update(result.toml)
        self._annotate()

    def _preview_line(self) -> str:
        preview = self.result.preview if self.result else None
        if preview is None or preview.base_total is None:
            return f"parameters: ? ({preview.error})" if preview else ""
        refs = stage_refs(self.raw)
        path = dotted(refs[self.stage_index].path) if refs else None
        stage = next((s for s in preview.stages if s.path == path), None)
        if stage is None:
            return f"params: base model {count(preview.base_total)}"
        return f"params · {stage_line(stage)}"

    def _op_depths(self) -> dict[str, int | None]:
        """Operator path -> blocks before it (the fewest over the stacks it acts on)."""
        preview = self.result.preview if self.result else None
        if preview is None:
            return {}
        return {path: (min(depth.values()) if depth else None) for path, depth in preview.op_depths().items()}

    def _annotate(self) -> None:
        """Hand the latest results down: each field's problem, each operator's depth."""
        if self.result is None:
            return
        messages: dict[str, list[str]] = {}
        for problem in self.result.problems:
            messages.setdefault(problem.path, []).append(problem.message)

        def said(*paths: str) -> str:
            return "; ".join(m for p in paths for m in messages.get(p, []))

        for row in self.query(FieldRow):
            row.problem = said(row.dotted_path)
        for toggles in self.query(LayerToggles):
            toggles.problem = said(toggles.dotted_path)
        for editor in self.query(MappingEditor):
            editor.problem = said(*(f"{editor.dotted_path}.{key}" for key in MAPPING_KEYS))
        depths = self._op_depths()
        for editor in self.query(OperatorEditor):
            editor.problem = said(editor.dotted_path, f"{editor.dotted_path}.op")
            editor.depth = depths.get(editor.dotted_path)
        self.query_one("#preview-line", Static).update(self._preview_line())

    # -- navigation -------------------------------------------------------------------------------
    def _focus_by_id(self, widget_id_: str) -> bool:
        found = self.query(f"#{widget_id_}")
        if not found:
            return False
        widget = found.first()
        for ancestor in widget.ancestors:
            if isinstance(ancestor, Collapsible):
                ancestor.collapsed = False
        self.call_after_refresh(widget.focus)
        self.call_after_refresh(widget.scroll_visible)
        return True

    @on(GoToField)
    async def _go_to(self, event: GoToField) -> None:
        event.stop()
        path = _key_path(event.path)
        refs = stage_refs(self.raw)
        stage = next((i for i, ref in enumerate(refs) if path[: len(ref.path)] == ref.path), None)
        if stage is not None:
            self.action_tab("stages")
            await self.show_stage(stage)
        else:
            self.action_tab("plan")
        candidates = [widget_id("f", path)]
        if path and path[-1] == "layers":
            candidates.append(widget_id("layers", path[:-1]))
        if path and path[-1] in MAPPING_KEYS:
            candidates.append(widget_id("grid", path[:-1]))
        candidates += [widget_id("opsel", path), widget_id("opsel", path[:-1])]
        for candidate in candidates:
            if self._focus_by_id(candidate):
                return

    def action_tab(self, name: str) -> None:
        self.query_one(TabbedContent).active = f"tab-{name}"

    async def action_stage(self, step: int) -> None:
        refs = stage_refs(self.raw)
        if refs:
            self.action_tab("stages")
            await self.show_stage((self.stage_index + step) % len(refs))

    def action_back(self) -> None:
        if not self.modified:
            self.app.pop_screen()
            return

        def leave(yes: bool | None) -> None:
            if yes:
                self.app.pop_screen()

        self.app.push_screen(Confirm("Leave the builder? The plan has unsaved changes."), leave)

    def action_open(self) -> None:
        def picked(choice) -> None:
            if choice is None:
                return
            if not self.modified:
                self.run_worker(self._picked(choice))
                return

            def confirmed(yes: bool | None) -> None:
                if yes:
                    self.run_worker(self._picked(choice))

            self.app.push_screen(Confirm("Discard the unsaved changes?"), confirmed)

        self.app.push_screen(PlanPicker(self.files), picked)

    # -- structure --------------------------------------------------------------------------------
    def _current_ref(self):
        refs = stage_refs(self.raw)
        return refs[self.stage_index] if refs else None

    async def _restructured(self, stage_index: int | None = None, focus_id: str | None = None,
                            plan_pane: bool = False) -> None:
        self._modified()
        if stage_index is not None:
            self.stage_index = stage_index
        if plan_pane:
            await self._build_plan_pane()
        self._update_picker()
        await self.show_stage(self.stage_index, focus_id=focus_id)
        self.schedule_check()

    async def action_add_stage(self) -> None:
        ref = self._current_ref()
        group = ref.group if ref else ("stages",)
        stages = get_at(self.raw, group)
        if not isinstance(stages, list):
            stages = []
            set_at(self.raw, group, stages)
        at = ref.path[-1] + 1 if ref else 0
        stages.insert(at, new_stage(self.raw))
        new_path = group + (at,)
        index = next(i for i, r in enumerate(stage_refs(self.raw)) if r.path == new_path)
        self.action_tab("stages")
        await self._restructured(index, focus_id=widget_id("f", new_path + ("task",)))
        self.notify(f"stage added ({dotted(new_path)})")

    async def action_add_operator(self) -> None:
        ref = self._current_ref()
        if ref is None:
            self.notify("add a stage first (ctrl+t)", severity="warning")
            return
        stage = get_at(self.raw, ref.path)
        ops = stage.setdefault("expand", [])
        ops.append({"op": "widen_ffn"})
        self.action_tab("stages")
        path = ref.path + ("expand", len(ops) - 1)
        self._modified()
        editors = self.query(StageEditor)
        if editors and editors.first().path == ref.path:  # only the new operator is drawn
            await editors.first().add_operator(ops[-1], len(ops) - 1, None)
            self._focus_by_id(widget_id("opsel", path))
            self.schedule_check()
        else:
            await self._restructured(focus_id=widget_id("opsel", path))
        self.notify(f"operator added ({dotted(path)}): choose the op, then its settings")

    async def action_add_task(self) -> None:
        name = new_task_name(self.raw)
        tasks = self.raw.get("tasks")
        if not isinstance(tasks, dict):
            tasks = self.raw["tasks"] = {}
        tasks[name] = {"source": "builtin:stdlib-python"}
        self.action_tab("plan")
        await self._restructured(focus_id=widget_id("taskname", ("tasks", name)), plan_pane=True)
        self.notify(f"task '{name}' added: rename it and choose its source")

    async def action_add_variant(self) -> None:
        variants = self.raw.setdefault("variants", [])
        variants.append(new_variant(self.raw))
        path = ("variants", len(variants) - 1, "stages", 0)
        index = next(i for i, r in enumerate(stage_refs(self.raw)) if r.path == path)
        self.action_tab("stages")
        await self._restructured(index, focus_id=widget_id("f", ("variants", len(variants) - 1, "name")),
                                 plan_pane=True)

    async def action_remove(self) -> None:
        focused = self.focused
        chain = list(focused.ancestors_with_self) if focused else []
        operator = next((w for w in chain if isinstance(w, OperatorEditor)), None)
        task = next((w for w in chain if isinstance(w, TaskEditor)), None)
        if operator is not None:
            self._remove_item(operator.path)
            await self._restructured()
            self.notify(f"removed operator {dotted(operator.path)}")
        elif task is not None:
            tasks = self.raw.get("tasks") or {}
            tasks.pop(task.task_name, None)
            await self._restructured(plan_pane=True)
            self.notify(f"removed task '{task.task_name}' (stages naming it now show a problem)")
        elif self.query_one(TabbedContent).active == "tab-stages" and self._current_ref():
            ref = self._current_ref()

            async def remove_stage(yes: bool | None) -> None:
                if yes:
                    self._remove_item(ref.path)
                    await self._restructured(max(0, self.stage_index - 1), plan_pane=True)

            self.app.push_screen(Confirm(f"Remove stage {ref.label} and its operators?"), remove_stage)
        else:
            self.notify("move to an operator, a task or a stage to remove it", severity="warning")

    def _remove_item(self, path: tuple) -> None:
        """Delete a list item; an emptied operator list goes too (a stage without `expand`)."""
        container = get_at(self.raw, path[:-1])
        if isinstance(container, list) and 0 <= path[-1] < len(container):
            del container[path[-1]]
            if not container and path[-2] == "expand":
                set_at(self.raw, path[:-1], UNSET)

    def action_remove_variant(self) -> None:
        ref = self._current_ref()
        if ref is None or ref.variant is None:
            self.notify("show a variant's stage first (f7/f8)", severity="warning")
            return
        name = get_at(self.raw, ("variants", ref.variant, "name"), ref.variant)

        async def remove(yes: bool | None) -> None:
            if yes:
                del self.raw["variants"][ref.variant]
                if not self.raw["variants"]:
                    del self.raw["variants"]
                await self._restructured(0, plan_pane=True)

        self.app.push_screen(Confirm(f"Remove variant '{name}' and its stages?"), remove)

    # -- saving and launching ---------------------------------------------------------------------
    def _suggested_file(self) -> str:
        name = str(self.raw.get("name") or "plan")
        return f"plans/{''.join(c if c.isalnum() or c in '-_' else '-' for c in name)}.toml"

    def action_save(self) -> None:
        if self.plan_path is None:
            self.action_save_as()
        else:
            self.write(self.plan_path)

    def action_save_as(self, then=None) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.write(path)
                if then is not None:
                    then()

        suggestion = str(self.plan_path) if self.plan_path else self._suggested_file()
        self.app.push_screen(FileNamePrompt(suggestion), chosen)

    def write(self, path: Path) -> bool:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_toml(self.raw, self.header))
        except OSError as e:
            self.notify(f"cannot save {path}: {e}", severity="error")
            return False
        self.plan_path, self.modified = Path(path), False
        self._update_title()
        problems = len(self.result.problems) if self.result and self.settled else 0
        self.notify(f"saved {path}" + (f" — {problems} problem{'s' * (problems > 1)} to fix before launching"
                                       if problems else ""), severity="warning" if problems else "information")
        return True

    def action_launch(self) -> None:
        if self.plan_path is None:
            self.action_save_as(then=self.action_launch)
            return
        self.query_one("#check-line", Static).update("… checking before launch")
        self._launch(copy.deepcopy(self.raw), self.plan_path)

    @work(thread=True, group="builder-launch", exclusive=True, exit_on_error=False)
    def _launch(self, raw: dict, path: Path) -> None:
        from widen_tui.launcher import create_runs, start_worker

        quiet_hub_logs()
        plan, problems = check_draft(raw)
        if problems:
            self.app.call_from_thread(self._launch_refused, problems)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_toml(raw, self.header))
            runs = create_runs(plan, path, root=getattr(self.app, "root", None))
            for run in runs:
                start_worker(run)
        except Exception as e:  # noqa: BLE001 - shown to the user, the app keeps going
            self.app.call_from_thread(self.notify, f"launch failed: {e}", severity="error")
            return
        self.app.call_from_thread(self._launched, [run.id for run in runs])

    def _launch_refused(self, problems: list[Problem]) -> None:
        self.notify(f"{len(problems)} problem{'s' * (len(problems) > 1)} to fix before launching — "
                    f"{problems[0]}", severity="error", title="not launched")
        self.action_tab("check")
        self.schedule_check()

    def _launched(self, run_ids: list[str]) -> None:
        self.modified = False
        self._update_title()
        self.notify(f"launched {len(run_ids)} run{'s' * (len(run_ids) > 1)}: {run_ids[0]}"
                    + (f" (+{len(run_ids) - 1} after it)" if len(run_ids) > 1 else ""), title="running")
        self.launched = run_ids
        open_monitor = getattr(self.app, "open_monitor", None)
        if open_monitor is not None:
            open_monitor(run_ids[0])
