"""The plan the builder edits: a raw TOML-shaped dict, and the operations on it.

The builder keeps exactly what the user wrote (no defaults filled in), so a plan loaded and
saved unchanged comes back key for key; every check runs on this dict as ``widen plan check``
runs on a file. No Textual here, no torch: the screen calls these, tests call them directly.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from engine import builtins
from engine.model import sources
from engine.plan import PlanError, Problem, check_model_fields, plan_from_dict, read_toml


class _Unset:
    """One object, kept one by copies (the builder deep-copies edits)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "UNSET"


UNSET: Any = _Unset()  # "remove this key" (a field left empty takes the schema's default)

KeyPath = tuple  # a path into the raw dict: ("stages", 1, "expand", 0, "size")

BUILTIN_MODELS = tuple(f"builtin:{name}" for name in [*sources.BUILTIN_MODELS, *sources.BUILTIN_MLPS])
BUILTIN_TASK_SOURCES = builtins.sources(builtins.TEXT_CORPORA + builtins.GENERATION_CORPORA)
TOKENIZERS = ("bytes",)
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


def dotted(path: KeyPath) -> str:
    """The plan checker's way of naming a field: stages.1.expand.0.size."""
    return ".".join(str(p) for p in path)


def widget_id(prefix: str, path: KeyPath) -> str:
    """A DOM id for the widget editing `path` (ids allow letters, digits, - and _)."""
    return prefix + "-" + re.sub(r"[^A-Za-z0-9_-]", "_", "-".join(str(p) for p in path))


def get_at(raw: dict, path: KeyPath, default: Any = None) -> Any:
    node: Any = raw
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return default
    return node


def set_at(raw: dict, path: KeyPath, value: Any) -> None:
    """Set (or with UNSET remove) the value at `path`, making tables on the way."""
    node: Any = raw
    for part in path[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if value is UNSET:
        if isinstance(node, dict):
            node.pop(last, None)
        return
    node[last] = value


# ---------------------------------------------------------------------------------------------
# a new plan and its parts


def blank_plan() -> dict:
    """From scratch: the built-in model, one task, one stage — valid as it stands."""
    return {
        "name": "my-plan",
        "seed": 0,
        "model": {"source": "builtin:tiny-neo", "tokenizer": "bytes"},
        "tasks": {"prose": {"source": "builtin:pydoc"}},
        "stages": [{"task": "prose", "steps": 100}],
    }


def new_task_name(raw: dict) -> str:
    tasks = raw.get("tasks") or {}
    n = len(tasks) + 1
    while f"task{n}" in tasks:
        n += 1
    return f"task{n}"


def first_task(raw: dict) -> str:
    tasks = raw.get("tasks")
    return next(iter(tasks)) if isinstance(tasks, dict) and tasks else "prose"


def new_stage(raw: dict) -> dict:
    return {"task": first_task(raw), "steps": 100}


def new_variant(raw: dict) -> dict:
    names = {v.get("name") for v in raw.get("variants") or [] if isinstance(v, dict)}
    n = len(names) + 1
    while f"variant{n}" in names:
        n += 1
    return {"name": f"variant{n}", "stages": [{**new_stage(raw), "freeze": "base"}]}


def rename_task(raw: dict, old: str, new: str) -> None:
    """Rename a task and every stage (and the sweep) that names it, keeping the tasks' order."""
    tasks = raw.get("tasks") or {}
    raw["tasks"] = {(new if name == old else name): spec for name, spec in tasks.items()}
    for ref in stage_refs(raw):
        stage = get_at(raw, ref.path)
        if isinstance(stage, dict) and stage.get("task") == old:
            stage["task"] = new
    sweep = raw.get("sweep")
    if isinstance(sweep, dict) and sweep.get("task") == old:
        sweep["task"] = new


@dataclass(frozen=True)
class StageRef:
    """Where a stage lives: shared (``stages.i``) or a variant's own (``variants.v.stages.i``)."""

    path: KeyPath
    label: str
    variant: int | None  # index into raw["variants"]

    @property
    def group(self) -> KeyPath:
        return self.path[:-1]


def _stage_label(stage: Any, number: int) -> str:
    if not isinstance(stage, dict):
        return f"{number}"
    return f"{number} · {stage.get('name') or stage.get('task', '?')}"


def stage_refs(raw: dict) -> list[StageRef]:
    """Every stage in plan order: the shared ones, then each variant's."""
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    refs = [StageRef(("stages", i), _stage_label(s, i + 1) + " (shared)", None) for i, s in enumerate(shared)]
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    for v, variant in enumerate(variants):
        if not isinstance(variant, dict):
            continue
        name = variant.get("name", f"variant {v + 1}")
        stages = variant.get("stages") if isinstance(variant.get("stages"), list) else []
        for i, stage in enumerate(stages):
            refs.append(StageRef(("variants", v, "stages", i),
                                 f"{name} › {_stage_label(stage, len(shared) + i + 1)}", v))
    return refs


# ---------------------------------------------------------------------------------------------
# checking, saving, loading


def check_schema(raw: dict):
    """The checks that need no model config (every field, every cross reference): (Plan or None,
    problems). Never raises: whatever the checker cannot digest becomes one problem."""
    raw = copy.deepcopy(raw)
    try:
        return plan_from_dict(raw), []
    except PlanError as e:
        return None, list(e.problems)
    except Exception as e:  # noqa: BLE001 - the UI must keep going on any input
        return None, [Problem("", f"the checker failed: {e}")]


def check_model(raw: dict) -> list[Problem]:
    """The checks that load the model's config (layer indices at each point of the plan)."""
    try:
        return check_model_fields(copy.deepcopy(raw))
    except Exception as e:  # noqa: BLE001
        return [Problem("model", f"the model checks failed: {e}")]


def check_draft(raw: dict):
    """`widen plan check` on the in-memory dict: (Plan or None, every problem). The launch's check:
    it also applies the operators on the meta device (engine.grow.operator_fit: imports torch
    when the plan has operators, so the builder's live checks leave it to the preview helper)."""
    from engine.grow.operator_fit import operator_fit_problems

    plan, problems = check_schema(raw)
    problems += check_model(raw)
    try:
        problems += operator_fit_problems(copy.deepcopy(raw), problems)
    except Exception as e:  # noqa: BLE001 - the UI must keep going on any input
        problems.append(Problem("", f"the operator check failed: {e}"))
    return (plan if not problems else None), problems


def quiet_hub_logs() -> None:
    """Hub clients log retries to stderr, which would scribble over the full-screen app."""
    import logging

    try:  # the libraries set their own levels when first imported: import them first
        import huggingface_hub  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        pass
    for name in ("huggingface_hub", "transformers", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def to_toml(raw: dict, header: str = "") -> str:
    """The plan as a person writes it (as in README and experiments/): ``[train]``,
    ``[tasks.prose]``, ``[[stages]]``, ``[[stages.expand]]``; small numeric tables inline
    (``keep_ends = {depth = 8}``), lists of values on one line."""
    lines: list[str] = []
    _write_table(_plain(raw), (), lines)
    body = "\n".join(lines).strip("\n") + "\n"
    return (header.rstrip("\n") + "\n\n" if header.strip() else "") + body


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _value(name)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _inline(value: Any, in_array: bool) -> bool:
    """Written as `key = value` in its table: not a table, or a small numeric table inside an
    array item (keep_ends, dus)."""
    if _is_table_array(value):
        return False
    if isinstance(value, dict):
        return in_array and all(isinstance(v, (int, float)) for v in value.values())
    return True


def _write_table(table: dict, path: tuple, lines: list[str], in_array: bool = False) -> None:
    for name, value in table.items():
        if _inline(value, in_array):
            lines.append(f"{_key(name)} = {_value(value)}")
    for name, value in table.items():
        if _inline(value, in_array):
            continue
        dotted_name = ".".join(_key(p) for p in path + (name,))
        if isinstance(value, dict):
            if not value or any(_inline(v, in_array) for v in value.values()):  # [tasks] alone says nothing
                lines += ["", f"[{dotted_name}]"]
            _write_table(value, path + (name,), lines, in_array)
        else:
            for item in value:
                lines += ["", f"[[{dotted_name}]]"]
                _write_table(item, path + (name,), lines, in_array=True)


def _plain(value: Any) -> Any:
    """The dict without empty tables left behind by removed keys (TOML cannot say `x = {}` twice)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not UNSET}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def leading_comments(text: str) -> str:
    """The comment block at the top of a plan file (experiments explain themselves there)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#") or (not line.strip() and lines):
            lines.append(line)
        else:
            break
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def load_draft(path: Path) -> tuple[dict, str]:
    """(raw dict, header comments) of a plan file; PlanError for unreadable TOML."""
    raw = read_toml(path)
    try:
        header = leading_comments(Path(path).read_text())
    except OSError:
        header = ""
    return raw, header


def experiment_files(extra: Path | None = None) -> list[Path]:
    """The ready plans (experiments/*.toml, here and in the current directory) and `extra`."""
    found: dict[Path, None] = {}
    if extra is not None:
        found[Path(extra)] = None
    for folder in (Path.cwd() / "experiments", EXPERIMENTS_DIR):
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                if path.resolve() not in {p.resolve() for p in found}:
                    found[path] = None
    return list(found)


def known_sources(files: list[Path]) -> tuple[list[str], list[str]]:
    """(model sources, task sources) named by the ready plans: suggestions for the inputs."""
    models, tasks = list(BUILTIN_MODELS), list(BUILTIN_TASK_SOURCES)
    for path in files:
        try:
            raw = read_toml(path)
        except PlanError:
            continue
        for model in [raw.get("model")] + [v.get("model") for v in raw.get("variants") or [] if isinstance(v, dict)]:
            if isinstance(model, dict) and isinstance(model.get("source"), str) and model["source"] not in models:
                models.append(model["source"])
        for task in (raw.get("tasks") or {}).values():
            if isinstance(task, dict) and isinstance(task.get("source"), str) and task["source"] not in tasks:
                tasks.append(task["source"])
    return models, tasks
