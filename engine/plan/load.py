"""Loading a plan: the entry points (``load_plan``, ``validate_file``, ``plan_from_dict``).

A plan file is read as TOML, its ``--set key.path=value`` overrides applied to the raw dict, then
checked: the cross checks (engine.plan.checks) and the schema (engine.plan.schema) both run on it,
so every problem is reported at once in one ``PlanError``. ``validate_file`` adds the checks that
need the model's config and what the plan points at. Applying the operators to the model built on
the meta device is a layer up (``engine.grow.operator_fit.validate_plan_file``, which calls this):
``widen plan check`` and ``widen run`` both call that.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.plan.checks import check_model_fields, cross_check
from engine.plan.problems import PlanError, Problem, problems_from_pydantic
from engine.plan.schema import Plan


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value`; the value is read as TOML (`30`, `1e-3`, `"x"`, `[0, 1]`), else a string."""
    if "=" not in text:
        raise PlanError([Problem("--set", f"'{text}' is not key.path=value — e.g. --set stages.0.steps=30")])
    key, _, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not key:
        raise PlanError([Problem("--set", f"'{text}' has no key — e.g. --set train.lr=3e-4")])
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set fields of the raw plan dict; list items by index (``stages.0.steps=30``)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit():
                    raise PlanError([Problem(f"--set {key}", f"'{where}' indexes a list — use a number")])
                index = int(part)
                if not -len(node) <= index < len(node):
                    raise PlanError([Problem(f"--set {key}", f"'{'.'.join(parts[:depth])}' has "
                                             f"{len(node)} items (0..{len(node) - 1})")])
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise PlanError([Problem(f"--set {key}", f"'{'.'.join(parts[:depth])}' is a value, not a table")])
    return raw


def read_toml(path: Path | str) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError([Problem("", f"{path}: no such plan file")]) from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise PlanError([Problem("", f"{path}: cannot read the plan ({e.__class__.__name__})")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError([Problem("", f"{path}: TOML syntax error: {e}")]) from None


def plan_from_dict(raw: dict) -> Plan:
    problems = cross_check(raw)
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as e:
        problems = problems_from_pydantic(e.errors(), model=Plan) + problems
        raise PlanError(problems) from None
    if problems:
        raise PlanError(problems)
    return plan


def load_plan(path: Path | str, overrides: list[str] | None = None, seed: int | None = None) -> Plan:
    raw = apply_overrides(read_toml(path), overrides or [])
    if seed is not None:
        raw["seed"] = seed
    return plan_from_dict(raw)


def check_plan(plan: Plan) -> list[Problem]:
    """Checks that need the model's config (loaded without weights): layer indices, model source."""
    return check_model_fields(plan.model_dump(mode="json"))


def validate_file(path: Path | str, overrides: list[str] | None = None,
                  seed: int | None = None) -> tuple[Plan | None, list[Problem]]:
    """Every problem of a plan file that its text and the model's config show: TOML, schema, cross
    references, model-dependent checks (the operators' own refusals on the model as the plan grows
    it: ``engine.grow.operator_fit.validate_plan_file``)."""
    try:
        raw = apply_overrides(read_toml(path), overrides or [])
    except PlanError as e:
        return None, e.problems
    if seed is not None:
        raw["seed"] = seed
    plan, problems = None, []
    try:
        plan = plan_from_dict(raw)
    except PlanError as e:
        problems = list(e.problems)
    problems += check_model_fields(raw)
    return (plan if not problems else None), problems
