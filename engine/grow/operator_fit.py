"""Operators against the model as the plan grows it, before any weight is loaded.

The config checks (``engine.plan.checks``) see the model's config; some misfits show only on the
built model at that point of the plan: a ``widen_hidden`` after a parallel ``widen_ffn`` path, a
size that is not whole heads, a module path that does not exist, two adapters with one name.
``operator_fit_problems`` finds them by applying the plan's own operators, in run order, to the
model built on the meta device (``engine.grow.preview.operator_misfits``: the engine's own code,
no second implementation), and reports each refusal on the operator's field.

``widen plan check`` and ``widen run`` both get it through ``validate_plan_file`` (the plan file's
own checks, ``engine.plan.validate_file``, then these). torch is imported only for a plan that
applies operators.
"""

from __future__ import annotations

from pathlib import Path

from engine.ops.params import OPS
from engine.plan import Plan, validate_file
from engine.plan.load import apply_overrides, read_toml
from engine.plan.problems import PlanError, Problem


def validate_plan_file(path: Path | str, overrides: list[str] | None = None,
                       seed: int | None = None) -> tuple[Plan | None, list[Problem]]:
    """Every problem of a plan file, the operators' misfits on the model as the plan grows it
    included: what `widen plan check` prints and what keeps `widen run` from launching."""
    plan, problems = validate_file(path, overrides, seed)
    try:
        raw = apply_overrides(read_toml(path), overrides or [])
    except PlanError:
        return plan, problems  # already reported by validate_file
    if seed is not None:
        raw["seed"] = seed
    problems = problems + operator_fit_problems(raw, problems)
    return (plan if not problems else None), problems


def operator_fit_problems(raw: dict, reported: list[Problem] = ()) -> list[Problem]:
    """One problem per operator the engine would refuse at its point of the plan (raw plan dict).
    An operator a problem in `reported` already names (the config checks: a layer out of range)
    is left to that problem: one line per operator."""
    if not has_operators(raw):
        return []  # nothing to apply: no model to build, no torch
    from engine.grow.preview import operator_misfits  # torch: only for a plan with operators

    named = [p.path for p in reported]
    problems = []
    for misfit in operator_misfits(raw):
        if not any(path == misfit.path or path.startswith(misfit.path + ".") for path in named):
            problems.append(misfit_problem(misfit))
    return problems


def misfit_problem(misfit) -> Problem:
    """A Misfit on its field: the operators write "field: why — fix" when one key is at fault
    ("size: ...", "modules: ..."), else the message is about the operator as a whole (its `op`)."""
    key, sep, rest = misfit.reason.partition(": ")
    if sep and key in OPS[misfit.op].schema.model_fields:
        field, message = key, rest
    elif sep and key == misfit.op:  # "widen_hidden: ..." names the operator
        field, message = "op", rest
    else:
        field, message = "op", misfit.reason
    if misfit.when:
        message = f"{misfit.when}: {message}"
    return Problem(f"{misfit.path}.{field}", message)


def has_operators(raw) -> bool:
    """Whether any stage of a raw plan (shared or a variant's) applies an operator."""
    if not isinstance(raw, dict):
        return False
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    stage_lists = [raw.get("stages"), *(v.get("stages") for v in variants if isinstance(v, dict))]
    for stages in stage_lists:
        for stage in stages if isinstance(stages, list) else []:
            if not isinstance(stage, dict):
                continue
            grow = stage.get("grow") if isinstance(stage.get("grow"), dict) else {}
            if any(isinstance(ops, list) and ops for ops in (stage.get("expand"), grow.get("expand"))):
                return True
    return False
