"""Forms generated from pydantic schemas: one row per field, the editor chosen by the field's type.

Operator forms, task and training settings all come from the schemas in ``engine`` (data), never
from hand-written per-op widgets. A row edits one key of the raw plan dict and says so with an
``Edited(path, value)`` message; a row left empty removes its key (the schema's default applies,
shown as the placeholder). Values are read as TOML where the type is not a plain string (``30``,
``1e-3``, ``[0, 1]``), lists also as ``q, v``; what does not parse is passed on as text, so the
plan checker's message names the problem.
"""

from __future__ import annotations

import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.suggester import Suggester, SuggestFromList
from textual.widgets import Collapsible, Input, Label, Select, Static

from widen_tui.tui.plan_draft import UNSET, KeyPath, dotted, widget_id


class Edited(Message):
    """A key of the raw plan changed (value UNSET: removed). `rebuild`: the change alters what
    the form shows (another op, growth switched on), so the builder redraws the stage."""

    def __init__(self, path: KeyPath, value: Any, rebuild: bool = False) -> None:
        super().__init__()
        self.path = tuple(path)
        self.value = value
        self.rebuild = rebuild


class Hint(Message):
    """Text explaining the focused field (the builder shows it in its status bar)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


# ---------------------------------------------------------------------------------------------
# fields from a schema


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str                      # "choice" (a Select), "text" (kept as typed), "value" (TOML), "list"
    required: bool = False
    default: Any = None
    description: str = ""
    choices: tuple = ()            # kind "choice"
    suggestions: tuple = ()        # completions offered while typing
    default_text: str | None = None  # what an unset field means, when its default depends on others

    @property
    def placeholder(self) -> str:
        if self.required:
            return "required"
        if self.default is None:
            return f"{self.default_text} (default)" if self.default_text else "not set"
        return f"{format_value(self.default)} (default)"


def _strip_optional(annotation) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _literals(annotation) -> tuple:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(annotation) for v in _literals(a))
    return ()


def _is_model(annotation) -> bool:
    annotation, _ = _strip_optional(annotation)
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_kind(annotation) -> tuple[str, tuple, tuple]:
    """(kind, choices, suggestions) for a field's type annotation."""
    annotation, _ = _strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "choice", typing.get_args(annotation), ()
    if annotation is bool:
        return "choice", (True, False), ()
    if annotation is str:
        return "text", (), ()
    if origin in (typing.Union, types.UnionType):  # e.g. "none" | "base" | ["glob", ...]
        literals = _literals(annotation)
        return "value", (), literals
    if origin is list:
        return "list", (), ()
    return "value", (), ()


def describe_fields(schema: type[BaseModel], skip: Iterable[str] = ()) -> list[FieldSpec]:
    """One FieldSpec per field of `schema` (nested tables and the skipped names left out)."""
    specs = []
    for name, info in schema.model_fields.items():
        if name in skip or _is_model(info.annotation):
            continue
        kind, choices, suggestions = field_kind(info.annotation)
        required = info.default is PydanticUndefined and info.default_factory is None
        default = None if required or info.default is PydanticUndefined else info.default
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        specs.append(FieldSpec(name, kind, required, default, info.description or "", choices, suggestions,
                               extra.get("default_text")))
    return specs


# ---------------------------------------------------------------------------------------------
# text <-> values


def format_value(value: Any) -> str:
    """How a value shows in an input: lists as `a, b`, strings bare, the rest as TOML writes it."""
    if value is None or value is UNSET:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        if all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value) and \
                all("," not in str(v) and str(v).strip() == str(v) for v in value):
            return ", ".join(str(v) for v in value)
        return _toml_value(value)
    if isinstance(value, (dict,)):
        return _toml_value(value)
    return str(value)


def _toml_value(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _toml(text: str) -> tuple[bool, Any]:
    try:
        return True, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return False, None


def _list_item(text: str) -> Any:
    text = text.strip().strip("\"'")
    return int(text) if text.lstrip("-").isdigit() else text


def parse_value(text: str, kind: str) -> Any:
    """The value a row's text stands for; empty text is UNSET (the default applies)."""
    text = text.strip()
    if not text:
        return UNSET
    if kind == "text":
        return text
    ok, value = _toml(text)
    if kind == "list":
        if ok and isinstance(value, list):
            return value
        return [_list_item(part) for part in text.replace(",", " ").split() if part.strip()]
    if ok:
        return value
    if "," in text:  # e.g. freeze globs typed as `*.ln_*, *.wte*`
        return [_list_item(part) for part in text.split(",") if part.strip()]
    return text  # not TOML: the checker names the problem (e.g. "Input should be a valid integer")


# ---------------------------------------------------------------------------------------------
# widgets


class FieldRow(Horizontal):
    """One field: its name, its editor and, when the plan checker objects, the message."""

    DEFAULT_CSS = """
    FieldRow { height: auto; }
    FieldRow > .field-body { width: 1fr; height: auto; }
    """

    problem: reactive[str] = reactive("", layout=True)

    def __init__(self, spec: FieldSpec, path: KeyPath, value: Any, suggester: Suggester | None = None,
                 unknown: bool = False) -> None:
        super().__init__(classes="field-row", id=widget_id("row", path))
        self.spec = spec
        self.path = tuple(path)
        self.value = value
        self.suggester = suggester
        self.unknown = unknown
        if unknown:
            self.add_class("-unknown")

    @property
    def dotted_path(self) -> str:
        return dotted(self.path)

    def compose(self) -> ComposeResult:
        label = self.spec.name + ("*" if self.spec.required else "")
        yield Label(label, classes="field-name", markup=False)
        with Vertical(classes="field-body"):
            yield self._editor()
            yield Static("", classes="field-problem error", markup=False)

    def _editor(self):
        spec, editor_id = self.spec, widget_id("f", self.path)
        tooltip = spec.description or None
        if spec.kind == "choice":
            choices = list(spec.choices)
            if self.value is not None and self.value is not UNSET and self.value not in choices:
                choices.append(self.value)  # keep what the file says, even if invalid: the checker names it
            options = [(format_value(c) + ("" if c in spec.choices else "  (invalid)"), c) for c in choices]
            value = self.value if self.value is not None and self.value is not UNSET else Select.NULL
            prompt = spec.placeholder if not spec.required else "choose…"
            return Select(options, prompt=prompt, value=value, allow_blank=True, compact=True, id=editor_id,
                          tooltip=tooltip)
        suggestions = self.suggester or (SuggestFromList([str(s) for s in spec.suggestions])
                                         if spec.suggestions else None)
        return Input(format_value(self.value), placeholder=spec.placeholder, compact=True, id=editor_id,
                     suggester=suggestions, tooltip=tooltip, select_on_focus=False)

    def watch_problem(self, problem: str) -> None:
        self.set_class(bool(problem), "-invalid")
        for static in self.query(".field-problem"):
            static.update(problem)

    def _changed(self, value: Any) -> None:
        if value == self.value or (value is UNSET and self.value in (None, UNSET)):
            return  # the editor showing what is already there (e.g. on mount): nothing to say
        self.value = value
        self.post_message(Edited(self.path, value))

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._changed(parse_value(event.value, self.spec.kind))

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._changed(UNSET if event.value is Select.NULL else event.value)

    def on_descendant_focus(self) -> None:
        text = f"{self.dotted_path}: {self.spec.description}" if self.spec.description else self.dotted_path
        if self.unknown:
            text = f"{self.dotted_path}: not a key of this table — clear it to remove it"
        self.post_message(Hint(text))


class SchemaForm(Vertical):
    """The rows of one table of the plan (`path`) for a schema. `fold`: fields not set in the
    plan go into a collapsed "more settings" section (long schemas stay short). `choices` turns
    a field into a choice (e.g. a stage's task among the plan's tasks); `suggesters` offers
    completions (model and task sources)."""

    DEFAULT_CSS = "SchemaForm { height: auto; }"

    def __init__(self, schema: type[BaseModel], path: KeyPath, values: dict | None, *, skip: Iterable[str] = (),
                 fold: bool = False, choices: dict[str, Iterable] | None = None,
                 suggesters: dict[str, Suggester] | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=("schema-form " + (classes or "")).strip())
        self.schema = schema
        self.path = tuple(path)
        self.values = values if isinstance(values, dict) else {}
        self.skip = set(skip)
        self.fold = fold
        self.choices = {k: tuple(v) for k, v in (choices or {}).items()}
        self.suggesters = suggesters or {}

    def _spec(self, spec: FieldSpec) -> FieldSpec:
        if spec.name in self.choices:
            return FieldSpec(spec.name, "choice", spec.required, spec.default, spec.description,
                             self.choices[spec.name])
        return spec

    def _row(self, spec: FieldSpec, unknown: bool = False) -> FieldRow:
        return FieldRow(spec, self.path + (spec.name,), self.values.get(spec.name, UNSET),
                        self.suggesters.get(spec.name), unknown=unknown)

    def compose(self) -> ComposeResult:
        specs = [self._spec(s) for s in describe_fields(self.schema, self.skip)]
        shown = [s for s in specs if not self.fold or s.required or s.name in self.values]
        folded = [s for s in specs if s not in shown]
        for spec in shown:
            yield self._row(spec)
        # keys the schema does not know (typos): shown so they can be fixed or cleared
        known = set(self.schema.model_fields) | self.skip
        for name in self.values:
            if name not in known:
                yield self._row(FieldSpec(name, "value", description="unknown key"), unknown=True)
        if folded:
            with Collapsible(title=f"more settings ({len(folded)})", collapsed=True, classes="more-settings"):
                for spec in folded:
                    yield self._row(spec)
