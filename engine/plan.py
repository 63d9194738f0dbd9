"""The expansion plan: TOML schema, `--set` overrides, and checking with clear messages.

``load_plan`` parses and validates; every problem is reported as ``field.path: message — fix``
in one ``PlanError``. ``check_plan`` adds the checks that need the model's config (layer indices),
loaded without weights. No torch here: the CLI imports this module at start-up.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import WidenError
from engine.ops.params import OP_PARAMS, OpParams


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    source: str = Field("builtin:tiny-neo", description="builtin:<name>, a hub name or a local directory")
    tokenizer: str = Field("bytes", description='"bytes" or a tokenizer hub name / directory')
    revision: str | None = None


GENERATION_SOURCES = ("builtin:docstring-code",)


class TaskSpec(Strict):
    source: str = Field(..., description="builtin:<corpus>, local text files, or a datasets name/dir")
    kind: Literal["text", "generation"] | None = Field(
        None, description='"text" (language modelling) or "generation" (prompt -> continuation, '
                          "loss on the continuation, scored by exact match and BLEU-4); default: "
                          "generation for builtin:docstring-code, else text")
    split: str = "train"
    column: str = "text"
    prompt_column: str | None = Field(None, description="generation tasks from datasets: the prompt column")
    target_column: str | None = Field(None, description="generation tasks from datasets: the target column")
    subset: str | None = Field(None, description="dataset configuration name")
    eval_fraction: float = Field(0.1, gt=0, lt=0.9, description="share of documents held out")
    max_docs: int | None = Field(None, gt=0)
    generate_examples: int = Field(16, ge=0, description="generation tasks: held-out examples decoded "
                                   "and scored (exact match, BLEU-4) at each stage end; 0 disables")
    max_new_tokens: int = Field(96, gt=0, description="generation tasks: decoding budget per example")

    @property
    def task_kind(self) -> str:
        if self.kind is not None:
            return self.kind
        return "generation" if self.source in GENERATION_SOURCES else "text"


class TrainSpec(Strict):
    batch_size: int = Field(16, gt=0)
    seq_len: int = Field(128, gt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    eval_interval: int = Field(50, ge=0, description="steps between evaluations (0: stage ends only)")
    eval_batches: int = Field(4, gt=0)
    log_interval: int = Field(10, gt=0)
    checkpoint_interval: int = Field(0, ge=0, description="steps between checkpoints (0: stage ends)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ExpandSpec(BaseModel):
    """One operator application; its keys beyond `op` are checked against ``OP_PARAMS[op]``."""

    model_config = ConfigDict(extra="allow")
    op: str

    def params(self) -> OpParams:
        return OP_PARAMS[self.op].model_validate(self.model_dump())


class GrowSpec(Strict):
    """Progressive growth inside a stage: apply `expand` whenever the training loss plateaus
    (the test of torch's ReduceLROnPlateau: `patience` checks without an improvement larger than
    `threshold`, relative or absolute, then `cooldown` checks of rest)."""

    trigger: Literal["plateau"] = "plateau"
    patience: int = Field(3, ge=1, description="checks without improvement before growing")
    threshold: float = Field(0.01, ge=0, description="the improvement that counts (see mode)")
    mode: Literal["rel", "abs"] = Field("rel", description="rel: best·(1-threshold); abs: best-threshold")
    cooldown: int = Field(2, ge=0, description="checks to wait after a growth before counting again")
    check_interval: int = Field(10, gt=0, description="steps per check (mean training loss over them)")
    warmup_checks: int = Field(2, ge=0, description="checks at the start of the stage that never trigger")
    max_growths: int = Field(1, ge=1, description="at most this many growths in the stage")
    expand: list[ExpandSpec] = Field(..., min_length=1, description="the operators applied at each growth")


class StageSpec(Strict):
    name: str | None = None
    task: str
    steps: int = Field(..., ge=0)
    freeze: Union[Literal["none", "base"], list[str]] = Field(
        "none", description='"none", "base" (only what this stage adds trains) or name globs to freeze')
    lr: float | None = Field(None, gt=0, description="overrides train.lr for this stage")
    expand: list[ExpandSpec] = Field(default_factory=list)
    grow: GrowSpec | None = Field(None, description="grow the model when the loss plateaus")


class VariantSpec(Strict):
    """One arm of a comparison: the plan's shared stages (trained once, cached), then these.
    A variant may use another model (e.g. the same inits on a small MLP and on a transformer):
    the shared stages then train once per model (the cache key covers the model)."""

    name: str = Field(..., min_length=1)
    description: str | None = None
    model: ModelSpec | None = Field(None, description="this variant's model (default: the plan's)")
    stages: list[StageSpec] = Field(default_factory=list)


class SweepSpec(Strict):
    """Score layer mappings of the trained model without training (after the last stage)."""

    task: str = Field(..., description="the task whose held-out text scores each mapping")
    depth: int = Field(..., gt=0, description="layers of the stacked models")
    keep_ends: bool = Field(True, description="keep the first and last source layers in place")
    mappings: list[list[int]] | None = Field(None, description="explicit mappings (default: generated)")
    limit: int | None = Field(None, gt=0, description="at most this many generated mappings")


class Plan(Strict):
    name: str = Field(..., min_length=1)
    seed: int = 0
    description: str | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    tasks: dict[str, TaskSpec] = Field(..., min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    stages: list[StageSpec] = Field(default_factory=list, description="shared stages (before any variant)")
    variants: list[VariantSpec] = Field(default_factory=list, description="arms that share the stages")
    task_modules: bool = Field(False, description="each stage's expansion modules belong to its task; "
                               "evaluating a task switches to its modules over the shared frozen base")
    sweep: SweepSpec | None = None

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def stage_label(self, index: int) -> str:
        stage = self.stages[index]
        return stage.name or f"{index + 1}:{stage.task}"

    def for_variant(self, name: str) -> "Plan":
        """The plan one variant runs: the shared stages, then the variant's own."""
        variant = next((v for v in self.variants if v.name == name), None)
        if variant is None:
            raise KeyError(f"no variant '{name}' — variants: {', '.join(v.name for v in self.variants)}")
        data = self.model_dump()
        data.update(stages=data["stages"] + [s.model_dump() for s in variant.stages], variants=[],
                    description=variant.description or self.description)
        if variant.model is not None:
            data["model"] = variant.model.model_dump()
        return Plan.model_validate(data)

    def prefix_key(self, stages: int) -> str:
        """A content hash of everything the first `stages` stages' result depends on: model,
        tokenizer, every task (each is evaluated after each stage), training settings, seed,
        task-module mode and the stages themselves. Equal keys = interchangeable checkpoints."""
        import hashlib
        import json

        data = self.model_dump(mode="json", include={"seed", "model", "tasks", "train", "task_modules"})
        data["stages"] = [s.model_dump(mode="json", exclude={"name"}) for s in self.stages[:stages]]
        data["format"] = PREFIX_FORMAT
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Bump when what a cached prefix checkpoint holds, or how stages train, changes.
PREFIX_FORMAT = 1


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

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


def _problem_from_pydantic(err: dict, prefix: str = "", model: type[BaseModel] | None = None) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "list["))))
    path = ".".join(x for x in (prefix, _path(loc)) if x)
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1]) if model else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        fix = f" — did you mean '{hint[0]}'?" if hint else (f" — allowed: {', '.join(known)}" if known else " — remove it")
        return Problem(path, f"unknown key{fix}")
    if kind == "missing":
        return Problem(path, "is required — add it")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return Problem(path, f"{err['msg'].replace('Input should be', 'must be')}, got {given!r}")
    if kind == "literal_error":
        return Problem(path, f"{err['msg'].replace('Input should be', 'must be')}, got {given!r}")
    if kind == "value_error":
        return Problem(path, err["msg"].removeprefix("Value error, "))
    return Problem(path, f"{err['msg']} (got {given!r})")


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


def _check_op(raw: dict, path: str) -> list[Problem]:
    name = raw.get("op")
    if name not in OP_PARAMS:
        hint = difflib.get_close_matches(str(name), list(OP_PARAMS), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"known ops: {', '.join(sorted(OP_PARAMS))}"
        return [Problem(f"{path}.op", f"unknown op '{name}' — {fix}")]
    try:
        OP_PARAMS[name].model_validate(raw)
    except ValidationError as e:
        return [_problem_from_pydantic(err, path, OP_PARAMS[name]) for err in e.errors()]
    return []


# ---------------------------------------------------------------------------------------------
# loading, overrides


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


def _cross_check(raw: dict) -> list[Problem]:
    """Checks across fields (stage -> task, op -> its parameters), on the raw dict so that they
    run even when other fields are wrong: `plan check` reports every problem at once."""
    problems: list[Problem] = []
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    problems += _check_stages(stages, "stages", tasks)
    names = []
    for v, variant in enumerate(variants):
        if not isinstance(variant, dict):
            continue
        vstages = variant.get("stages") if isinstance(variant.get("stages"), list) else []
        problems += _check_stages(vstages, f"variants.{v}.stages", tasks)
        if not stages and not vstages:
            problems.append(Problem(f"variants.{v}.stages", "this variant has no stage and the plan "
                                    "shares none — add [[variants.stages]] or shared [[stages]]"))
        name = variant.get("name")
        if name in names:
            problems.append(Problem(f"variants.{v}.name", f"'{name}' names two variants — make names unique"))
        names.append(name)
    if not stages and not variants and "stages" not in raw:
        problems.append(Problem("stages", "is required — add at least one [[stages]] table"))
    elif not stages and not variants:
        problems.append(Problem("stages", "the plan has no stage — add at least one [[stages]] table"))
    if raw.get("task_modules") is True:
        problems += _task_module_problems(stages, "stages", first=True)
        for v, variant in enumerate(variants):
            vstages = variant.get("stages") if isinstance(variant, dict) else None
            if isinstance(vstages, list):
                problems += _task_module_problems(vstages, f"variants.{v}.stages", first=not stages)
    sweep = raw.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("task"), str) and tasks and sweep["task"] not in tasks:
        problems.append(Problem("sweep.task", f"unknown task '{sweep['task']}' — use one of: {', '.join(tasks)}"))
    return problems


def _check_stages(stages: list, where: str, tasks: dict) -> list[Problem]:
    problems = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        task = stage.get("task")
        if isinstance(task, str) and tasks and task not in tasks:
            problems.append(Problem(f"{where}.{i}.task", f"unknown task '{task}' — define "
                                    f"[tasks.{task}] or use one of: {', '.join(tasks)}"))
        for key, ops in _stage_op_lists(stage):
            for j, spec in enumerate(ops):
                if isinstance(spec, dict) and "op" in spec:
                    problems.extend(_check_op(spec, f"{where}.{i}.{key}.{j}"))
    return problems


def _task_module_problems(stages: list, where: str, first: bool) -> list[Problem]:
    """With task_modules: after the first stage the base stays frozen and every operator adds a
    module that can be switched per task (engine.task_modules says which)."""
    import re

    from engine.task_modules import stage_problems

    problems = []
    for i, stage in enumerate(stages):
        if isinstance(stage, dict):
            index = i if first else i + 1  # a variant's stages come after the shared ones
            for field, message in stage_problems(index, stage):
                path = re.sub(r"\[(\d+)\]", r".\1", field)  # expand[1].mode -> expand.1.mode
                problems.append(Problem(f"{where}.{i}.{path}", message))
    return problems


def _stage_op_lists(stage: dict) -> list[tuple[str, list]]:
    """("expand", [ops]) and ("grow.expand", [ops]) of a raw stage: the operators it may apply."""
    out = []
    expand = stage.get("expand")
    out.append(("expand", expand if isinstance(expand, list) else []))
    grow = stage.get("grow")
    if isinstance(grow, dict) and isinstance(grow.get("expand"), list):
        out.append(("grow.expand", grow["expand"]))
    return out


def plan_from_dict(raw: dict) -> Plan:
    problems = _cross_check(raw)
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as e:
        problems = [_problem_from_pydantic(err, model=Plan) for err in e.errors()] + problems
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


def check_model_fields(raw: dict) -> list[Problem]:
    """The config-dependent checks on a raw plan dict, so that they run even when other fields
    are wrong. Each operator's layers are checked against the depth at that point of the plan
    (shared stages, then each variant's own, on the variant's model when it names one)."""
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    arch, problems = _architecture(raw.get("model") or {}, "model")
    depths = {view.stack: view.num_layers for view in arch.stacks()} if arch else {}
    if arch:
        problems += _check_stage_ops(shared, "stages", depths, arch)
    for v, variant in enumerate(raw.get("variants") or [] if isinstance(raw.get("variants"), list) else []):
        if not isinstance(variant, dict):
            continue
        stages = variant.get("stages") if isinstance(variant.get("stages"), list) else []
        if variant.get("model") is not None:
            own, found = _architecture(variant["model"], f"variants.{v}.model")
            problems += found
            if own is None:
                continue
            own_depths = {view.stack: view.num_layers for view in own.stacks()}
            problems += [p for p in _check_stage_ops(shared, "stages", own_depths, own) if p not in problems]
            problems += _check_stage_ops(stages, f"variants.{v}.stages", own_depths, own)
        elif arch:
            problems += _check_stage_ops(stages, f"variants.{v}.stages", dict(depths), arch)
    return problems


def _architecture(model_raw, where: str):
    """(ArchView from the config alone, problems) for a raw model table."""
    from engine.models import ModelLoadError, load_architecture

    try:
        model = ModelSpec.model_validate(model_raw)
    except ValidationError:
        return None, []  # reported by the schema check
    try:
        return load_architecture(model), []
    except ModelLoadError as e:
        return None, [Problem(f"{where}.{e.field}", str(e))]


def _check_stage_ops(stages: list, where: str, depths: dict, arch) -> list[Problem]:
    """Check each stage's operators (and its growth operators, once per allowed growth) in plan
    order, updating `depths` as depth operators change it."""
    problems = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        for key, ops in _stage_op_lists(stage):
            repeats = 1
            if key == "grow.expand":
                growths = stage["grow"].get("max_growths", 1)
                repeats = growths if isinstance(growths, int) and 0 < growths <= 16 else 1
            for _ in range(repeats):
                found = []
                for j, spec in enumerate(ops):
                    found += _check_one_op(spec, f"{where}.{i}.{key}.{j}", depths, arch)
                problems += [p for p in found if p not in problems]
    return problems


def _check_one_op(spec, where: str, depths: dict, arch) -> list[Problem]:
    if not isinstance(spec, dict) or spec.get("op") not in OP_PARAMS:
        return []  # reported by the schema check
    problems = []
    op_class = OP_PARAMS[spec["op"]]
    try:
        params = op_class.model_validate(spec)
        source_layers = params.source_layers()
    except ValidationError:  # other fields are reported by the schema check; indices still here
        params = None
        raw_layers = spec.get(op_class.source_field)
        source_layers = [k for k in raw_layers if isinstance(k, int)] if isinstance(raw_layers, list) else []
    stack = spec.get("stack")
    if stack is not None and stack not in depths:
        names = ", ".join(str(n) for n in depths if n) or "none (one stack of blocks)"
        return [Problem(f"{where}.stack", f"'{stack}' is not a stack of this model — stacks: {names}")]
    chosen = [stack] if stack is not None else list(depths)
    for name in chosen:
        num_layers = depths[name]
        label = f"the {name} has" if name else "the model has"
        bad = [k for k in source_layers if k >= num_layers]
        if bad:
            problems.append(Problem(
                f"{where}.{op_class.source_field}",
                f"layer {', '.join(map(str, bad))} out of range — {label} {num_layers} "
                f"layers at this point (0..{num_layers - 1}); use those indices or \"all\""))
        if params is None:
            continue
        for field, message in params.depth_problems(num_layers):
            problems.append(Problem(f"{where}.{field}", message))
        depths[name] = params.num_layers_after(num_layers)
    model_problems = getattr(params, "model_problems", None)
    for field, message in (model_problems(arch.family) if model_problems else []):
        problems.append(Problem(f"{where}.{field}", message))
    return problems


def validate_file(path: Path | str, overrides: list[str] | None = None,
                  seed: int | None = None) -> tuple[Plan | None, list[Problem]]:
    """Every problem of a plan file: TOML, schema, cross references and model-dependent checks."""
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
    return (plan if not problems else None), problems + check_model_fields(raw)
