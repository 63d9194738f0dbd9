"""A plan's problems, one clear line each: ``field.path: message — fix``.

``Problem`` keeps its field and message on one line whatever the plan holds (keys and values are
user input: control characters escaped, values echoed cut to ~60 characters); ``PlanError``
carries every problem of a plan at once. ``problems_from_pydantic`` turns pydantic's errors into
Problems: one per field (a union's branches folded into one line), with the allowed range or a
"did you mean" hint read off the schema.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from engine.errors import WidenError
from engine.names import name_problem

SHOWN_CHARS = 60


def shown(value: Any) -> str:
    """A value echoed in a message: its repr on one line, cut to ~60 characters."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail
        text = f"<{type(value).__name__}>"
    if len(text) > SHOWN_CHARS:
        text = text[:SHOWN_CHARS - 1] + "…"
    return text


def one_line(text: str, limit: int) -> str:
    """`text` with every non-printable character escaped (no newline can split a problem) and
    cut to `limit` characters."""
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def listing(names, limit: int = 12) -> str:
    """Names for a "use one of: ..." hint: each on one line, at most `limit` of them."""
    names = [n if isinstance(n, str) and name_problem(n) is None else shown(n) for n in names]
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f", … ({more} more)" if more > 0 else "")


@dataclass(frozen=True)
class Problem:
    """One problem: `path` the field (stages.1.expand.0.size), `message` what is wrong — and the
    fix. Both are kept to one line whatever the plan holds (keys and values are user input)."""

    path: str
    message: str

    def __post_init__(self):
        object.__setattr__(self, "path", one_line(self.path, 200))
        object.__setattr__(self, "message", one_line(self.message, 2000))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PlanError(WidenError, ValueError):
    """All the problems of a plan, one line each."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------------------------------------
# pydantic errors -> one clear line each


def _path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


# pydantic error type -> the fix that follows its message
_TYPE_FIXES = {
    "int_type": "write a whole number, e.g. 4",
    "int_parsing": "write a whole number, e.g. 4",
    "int_from_float": "write a whole number, e.g. 4",
    "float_type": "write a number, e.g. 0.001",
    "float_parsing": "write a number, e.g. 0.001",
    "finite_number": "write a finite number (no inf or nan)",
    "bool_type": "write true or false",
    "bool_parsing": "write true or false",
    "string_type": "write text in quotes",
    "list_type": "write a list, e.g. [0, 1]",
    "dict_type": "write a table, e.g. [train] or {key = value}",
    "model_type": "write a table, e.g. [train] or {key = value}",
    "model_attributes_type": "write a table, e.g. [train] or {key = value}",
    "too_short": "add entries",
    "too_long": "remove entries",
    "string_too_short": "write at least one character",
    "union_tag_invalid": "see the README's plan format",
}


_TAG_PREFIXES = ("literal[", "list[", "function-", "dict[", "tuple[", "nullable[")
_SCALAR_TAGS = ("str", "int", "float", "bool")


def _is_tag(loc: tuple, i: int) -> bool:
    """Whether loc[i] names a branch of a union (pydantic adds it), not a field or a key."""
    part = loc[i]
    if not isinstance(part, str):
        return False
    return part.startswith(_TAG_PREFIXES) or (part in _SCALAR_TAGS and i == len(loc) - 1)


def _branch_text(err: dict) -> str:
    kind = err["type"]
    if kind == "literal_error":
        return str(err.get("msg", "")).removeprefix("Input should be ")
    return {"list_type": "a list", "string_type": "text", "int_type": "a whole number", "int_parsing": "a whole number",
            "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
            "dict_type": "a table", "model_type": "a table", "bool_type": "true or false"}.get(
        kind, str(err.get("msg", "")).removeprefix("Input should be "))


def problems_from_pydantic(errors: list[dict], prefix: str = "", model: type[BaseModel] | None = None) -> list[Problem]:
    """One Problem per field: the errors of a union's branches (a list or "all", a literal or a
    list of globs, an index or a name) become one line — the branch the value got into when it
    got past the type (a list whose item is wrong), else "must be A or B, got X"."""
    groups: dict[tuple, list[dict]] = {}
    order: list[tuple] = []
    for err in errors:
        loc = tuple(err["loc"])
        tag = next((i for i in range(len(loc)) if _is_tag(loc, i)), None)
        key = loc[:tag] if tag is not None else ("", *loc)
        if key not in groups:
            order.append(key)
        groups.setdefault(key, []).append(err)
    problems = []
    for key in order:
        group = groups[key]
        tagged = [e for e in group if any(_is_tag(tuple(e["loc"]), i) for i in range(len(e["loc"])))]
        if len(tagged) < 2:
            problems += [_problem_from_pydantic(e, prefix, model) for e in group]
            continue
        deeper = [e for e in tagged if not _is_tag(tuple(e["loc"]), len(e["loc"]) - 1)]
        own = [e for e in tagged if e["type"] == "value_error"]
        chosen = deeper or own
        if chosen:
            problems += [p for p in (_problem_from_pydantic(e, prefix, model) for e in chosen) if p not in problems]
            continue
        path = ".".join(x for x in (prefix, _path(key)) if x)
        texts = list(dict.fromkeys(_branch_text(e) for e in tagged))
        fix = next((_TYPE_FIXES[e["type"]] for e in reversed(tagged) if e["type"] in _TYPE_FIXES),
                   "see the README's plan format")
        problems.append(Problem(path, f"must be {' or '.join(texts)}, got {shown(tagged[0].get('input'))} — {fix}"))
    return problems


def _problem_from_pydantic(err: dict, prefix: str = "", model: type[BaseModel] | None = None) -> Problem:
    loc = tuple(p for i, p in enumerate(err["loc"]) if not _is_tag(tuple(err["loc"]), i))
    path = ".".join(x for x in (prefix, _path(loc)) if x)
    kind = err["type"]
    given = shown(err.get("input"))
    message = " ".join(str(err.get("msg", "")).split())  # one line, whatever pydantic wrote
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1]) if model else []
        hint = difflib.get_close_matches(str(loc[-1])[:100], known, n=1)
        allowed = f" — allowed: {', '.join(known)}" if known else " — remove it"
        fix = f" — did you mean '{hint[0]}'?" if hint else allowed
        return Problem(path, f"unknown key{fix}")
    if kind == "missing":
        return Problem(path, "is required — add it")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        bounds = _bounds_text(model, loc) if model else None
        fix = f"use a value in {bounds}" if bounds else _TYPE_FIXES.get(kind, "use a smaller or larger value")
        return Problem(path, f"{message.replace('Input should be', 'must be')}, got {given} — {fix}")
    if kind == "literal_error":
        expected = str((err.get("ctx") or {}).get("expected", "")).replace("'", "").split(" or ")
        options = [o.strip() for part in expected for o in part.split(",") if o.strip()]
        value = err.get("input")
        hint = difflib.get_close_matches(value[:100], options, n=1) if isinstance(value, str) else []
        fix = f"did you mean '{hint[0]}'?" if hint else "use one of those"
        return Problem(path, f"{message.replace('Input should be', 'must be')}, got {given} — {fix}")
    if kind == "value_error":
        return Problem(path, message.removeprefix("Value error, "))
    fix = _TYPE_FIXES.get(kind, "see the README's plan format")
    return Problem(path, f"{message.replace('Input should be', 'must be')} (got {given}) — {fix}")


def _bounds_text(model: type[BaseModel], loc: tuple) -> str | None:
    """The allowed range of the number field at `loc` ("1..65536", "(0, 10000]"), or None."""
    field = _field_at(model, loc)
    if field is None:
        return None
    low = high = None
    low_open = high_open = False
    for item in field.metadata:
        for attr, is_low, is_open in (("gt", True, True), ("ge", True, False),
                                      ("lt", False, True), ("le", False, False)):
            value = getattr(item, attr, None)
            if value is None:
                continue
            if is_low:
                low, low_open = value, is_open
            else:
                high, high_open = value, is_open
    if low is None and high is None:
        return None
    whole = _is_int_field(field.annotation)
    if whole:
        low = None if low is None else low + (1 if low_open else 0)
        high = None if high is None else high - (1 if high_open else 0)
        return f"{'..' if low is None else low}..{'' if high is None else high}".replace("....", "..")
    left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
    right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
    return f"{left}, {right}"


def _is_int_field(annotation) -> bool:
    if annotation is int:
        return True
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not list and args:
        return _is_int_field(args[0])
    return False


def _field_at(model: type[BaseModel], loc: tuple):
    """The pydantic FieldInfo at `loc` inside `model` (list indices and dict keys skipped)."""
    current: Any = model
    field = None
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or isinstance(part, int):
            continue
        if part not in fields:
            continue  # a dict key (tasks.<name>)
        field = fields[part]
        current = _inner_model(field.annotation)
    return field


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _inner_model(field.annotation)
    return list(getattr(current, "model_fields", {}))


def _inner_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found:
            return found
    return None
