"""The expansion plan: TOML schema, `--set` overrides, and checking with clear messages.

``load_plan`` parses and validates; every problem is reported as ``field.path: message — fix``
in one ``PlanError``, one line each whatever the plan holds (values echoed are cut to ~60
characters, control characters escaped). The schema bounds every number (no bools as numbers,
no inf/nan) and the cross checks refuse names that would become unsafe file names.
``check_model_fields`` adds what needs the model's config (layer indices, seq_len against the
model's positions, the sweep's mappings), loaded without weights, and what the plan points at
(task sources, tokenizers, the device: engine.plan.checks). No torch here: the CLI imports this
module at start-up (the device check imports it only to ask about CUDA, and only when asked).
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import tomli_w
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from engine import builtins
from engine.errors import WidenError
from engine.names import label_problem, name_problem
from engine.ops.params import MAX_DEPTH, MAX_STEPS, OPS, Float, Int, OpParams
from engine.runs.trackers import TRACKER_NAMES

# Bounds of the plan's numbers (the operators' own are in engine.ops.params).
MAX_SEED = 2 ** 32 - 1          # numpy seeds (default_rng([seed, stage, step])) are 32-bit words
MAX_LR = 1e4
MAX_WEIGHT_DECAY = 1e4
MAX_BATCH_SIZE = 1 << 16
MAX_SEQ_LEN = 1 << 20           # and at most the model's positions (check_model_fields)
MAX_EVAL_BATCHES = 10_000
MAX_DOCS = 10 ** 9
MAX_GENERATE_EXAMPLES = 10_000
MAX_NEW_TOKENS = 1 << 16
MAX_CHECKS = 10 ** 6            # plateau checks (patience, cooldown, warm-up)
MAX_GROWTHS = 100
MAX_TOKENS = 10 ** 15           # at_tokens points
MAX_FLOPS = 1e30                # budget_flops
MAX_SWEEP_MAPPINGS = 10_000     # explicit mappings, and `limit`
# engine.grow.sweep.MAX_MAPPINGS (that module imports torch): more generated mappings than this
# without a limit fail the sweep, so the plan check asks for a limit up front.
SWEEP_MAX_GENERATED = 1000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(Strict):
    source: str = Field("builtin:tiny-neo", description="builtin:<name>, a hub name or a local directory")
    tokenizer: str = Field("bytes", description='"bytes" or a tokenizer hub name / directory')
    revision: str | None = None
    family: str | None = Field(None, description="the family description to use for a model type widen does not "
                               "list (its module tree is checked against it), e.g. \"llama\"")

    @field_validator("family")
    @classmethod
    def _listed_family(cls, v):
        from engine.model.families import FAMILIES

        names = [f.name for f in FAMILIES if f.kind != "mlp"]
        if v is not None and v not in names:
            raise ValueError(f"no family '{v}' — families: {', '.join(names)}")
        return v


GENERATION_SOURCES = builtins.sources(builtins.GENERATION_CORPORA)


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
    eval_fraction: Float = Field(0.1, gt=0, lt=0.9, description="share of documents held out")
    max_docs: Int | None = Field(None, gt=0, le=MAX_DOCS)
    generate_examples: Int = Field(16, ge=0, le=MAX_GENERATE_EXAMPLES, description="generation tasks: held-out examples decoded "
                                   "and scored (exact match, BLEU-4) at each stage end; 0 disables")
    max_new_tokens: Int = Field(96, gt=0, le=MAX_NEW_TOKENS, description="generation tasks: decoding budget per example")

    @property
    def task_kind(self) -> str:
        if self.kind is not None:
            return self.kind
        return "generation" if self.source in GENERATION_SOURCES else "text"


class DistributedSpec(Strict):
    """Train on several processes under torchrun: each takes its share of every global batch."""

    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: every process holds the whole model; fsdp: "
                                             "FSDP2 fully_shard, each process holds a shard of every block")
    nproc: Int = Field(1, ge=1, le=1024, description="processes per machine (one per GPU); train.batch_size "
                       "is the global batch and must divide by nproc × nnodes")
    nnodes: Int = Field(1, ge=1, le=1024, description="machines; above 1 every machine runs `widen join RUN`")
    rdzv_endpoint: str | None = Field(None, max_length=255, description="host:port of the c10d rendezvous "
                                      "(needed when nnodes > 1; any free port on the first machine)")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


class TrainSpec(Strict):
    batch_size: Int = Field(16, gt=0, le=MAX_BATCH_SIZE)
    seq_len: Int = Field(128, gt=1, le=MAX_SEQ_LEN, description="tokens per sequence (at most the model's positions)")
    lr: Float = Field(1e-3, gt=0, le=MAX_LR)
    weight_decay: Float = Field(0.0, ge=0, le=MAX_WEIGHT_DECAY)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: Int = Field(0, ge=0, le=MAX_STEPS)
    grad_clip: Float = Field(1.0, ge=0, description="0 disables clipping")
    grad_accum: Int = Field(1, ge=1, le=1024, description="micro-batches per step: each process's share of "
                            "the global batch is split into this many (same figures, less memory)")
    eval_interval: Int = Field(50, ge=0, le=MAX_STEPS, description="steps between evaluations (0: stage ends only)")
    eval_batches: Int = Field(4, gt=0, le=MAX_EVAL_BATCHES)
    log_interval: Int = Field(10, gt=0, le=MAX_STEPS)
    checkpoint_interval: Int = Field(0, ge=0, le=MAX_STEPS, description="steps between checkpoints (0: stage ends)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="sdpa: PyTorch's fused attention where the "
                                                "family supports it (else eager); eager: the reference kernels")
    checkpointing: StrictBool = Field(False, description="activation checkpointing of every block (less memory, "
                                "one more forward)")
    compile: StrictBool = Field(False, description="torch.compile the model (compiled again after a growth)")
    distributed: DistributedSpec | None = Field(None, description="processes under torchrun (default: one)")
    report_to: list[Literal[TRACKER_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="trackers that get a copy of the run's metrics: tensorboard, mlflow, "
        "wandb (pip install 'widen[trackers]'); widen's own events stay the record")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_more_trackers(cls, v):
        if isinstance(v, str):  # report_to = "tensorboard", as Hugging Face's TrainingArguments takes it
            v = [v]
        if isinstance(v, list) and len(set(map(repr, v))) != len(v):
            raise ValueError("names a tracker twice — list each once")
        return v

    @property
    def nproc(self) -> int:
        return self.distributed.nproc if self.distributed else 1

    @property
    def world_size(self) -> int:
        return self.distributed.world_size if self.distributed else 1

    @property
    def strategy(self) -> str | None:
        return self.distributed.strategy if self.distributed else None


class ExpandSpec(BaseModel):
    """One operator application; its keys beyond `op` are checked against ``OPS[op].schema``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    op: str

    def params(self) -> OpParams:
        return OPS[self.op].schema.model_validate(self.model_dump())


PointSteps = Annotated[Int, Field(ge=1, le=MAX_STEPS)]
PointTokens = Annotated[Int, Field(ge=1, le=MAX_TOKENS)]
Fraction = Annotated[Float, Field(gt=0, lt=1)]
TRIGGER_FIELDS = {"at": ("at_steps", "at_tokens"), "budget": ("budget_flops", "at_fractions")}


class GrowSpec(Strict):
    """Progressive growth inside a stage: apply `expand` each time the trigger fires
    (engine.grow.triggers). "plateau": the training loss plateaus (the test of torch's
    ReduceLROnPlateau: `patience` checks of `check_interval` steps without an improvement larger
    than `threshold`, relative or absolute, then `cooldown` checks of rest); "at": after the
    stage steps `at_steps`, or once the run has seen the tokens `at_tokens` (G_stack, Staged
    Training); "budget": once the run has spent the shares `at_fractions` of `budget_flops`.
    The plateau settings are read by trigger = "plateau" only. `schedule_after`: the lr after a
    growth continues the stage's schedule, or goes back to its peak and decays over the steps
    left (LEMON) — engine.grow.growth. Inside a growth, operators that copy units break the copies'
    symmetry by default (``OpParams.growth_defaults``: widen_ffn net2net/copy_halve, widen_hidden
    duplicate/lossless take symmetry = "noise" unless the plan sets it)."""

    trigger: Literal["plateau", "at", "budget"] = "plateau"
    at_steps: list[PointSteps] | None = Field(None, min_length=1, max_length=MAX_GROWTHS, validate_default=True,
                                              description="at: grow after these stage steps (increasing)")
    at_tokens: list[PointTokens] | None = Field(None, min_length=1, max_length=MAX_GROWTHS, validate_default=True,
                                                description="at: grow once the run has seen these many tokens")
    budget_flops: Float | None = Field(None, gt=0, le=MAX_FLOPS, validate_default=True,
                                       description="budget: the compute budget, in training FLOPs of the run")
    at_fractions: list[Fraction] | None = Field(None, min_length=1, max_length=MAX_GROWTHS, validate_default=True,
                                                description="budget: grow when these shares of it are spent")
    patience: Int = Field(3, ge=1, le=MAX_CHECKS, description="plateau: checks without improvement before growing")
    threshold: Float = Field(0.01, ge=0, le=1e9, description="plateau: the improvement that counts (see mode)")
    mode: Literal["rel", "abs"] = Field("rel", description="plateau: rel: best·(1-threshold); abs: best-threshold")
    cooldown: Int = Field(2, ge=0, le=MAX_CHECKS, description="plateau: checks to wait after a growth before "
                          "counting again")
    check_interval: Int = Field(10, gt=0, le=MAX_STEPS, description="plateau: steps per check (mean training loss "
                                "over them)")
    warmup_checks: Int = Field(2, ge=0, le=MAX_CHECKS, description="plateau: checks at the start of the stage that "
                               "never trigger")
    max_growths: Int | None = Field(None, ge=1, le=MAX_GROWTHS, validate_default=True,
                                    description="at most this many growths in the stage (plateau: default 1; at, "
                                    "budget: one per point)", json_schema_extra={"default_text": "1 or one per point"})
    schedule_after: Literal["continue", "rewarm"] = Field(
        "continue", description="the lr after a growth: continue the schedule, or rewarm: back to the peak, "
        "decaying over the stage's steps left (LEMON)")
    expand: list[ExpandSpec] = Field(..., min_length=1, description="the operators applied at each growth")

    @field_validator("at_steps", "at_tokens", "budget_flops", "at_fractions")
    @classmethod
    def _belongs_to_its_trigger(cls, value, info: ValidationInfo):
        trigger, name = info.data.get("trigger"), info.field_name
        if trigger is None:
            return value  # the trigger itself is wrong: reported there
        owner = next(kind for kind, names in TRIGGER_FIELDS.items() if name in names)
        if value is not None and trigger != owner:
            raise ValueError(f'belongs to trigger = "{owner}" (this one is "{trigger}") — remove it or set '
                             f'trigger = "{owner}"')
        if isinstance(value, list) and any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"must increase strictly, got {shown(value)} — one growth per point, in order")
        if trigger == "at" and name == "at_tokens":
            steps = info.data.get("at_steps")
            if value is not None and steps is not None:
                raise ValueError("give at_steps or at_tokens, not both — one schedule per stage")
            if value is None and steps is None and "at_steps" in info.data:
                raise ValueError('trigger = "at" needs at_steps (stage steps) or at_tokens (tokens seen) — e.g. '
                                 'at_steps = [200, 400]')
        if trigger == "budget" and owner == "budget" and value is None:
            example = "budget_flops = 1e15" if name == "budget_flops" else "at_fractions = [0.25, 0.5]"
            raise ValueError(f'is required by trigger = "budget" — add it, e.g. {example}')
        return value

    @field_validator("max_growths")
    @classmethod
    def _growths_follow_the_points(cls, value, info: ValidationInfo):
        points = next((info.data.get(n) for n in ("at_steps", "at_tokens", "at_fractions")
                       if info.data.get(n) is not None), None)
        if info.data.get("trigger") in TRIGGER_FIELDS and points is not None:
            if value is not None and value != len(points):
                raise ValueError(f"is {value} but the trigger has {len(points)} points — one growth per point: "
                                 "remove max_growths or make them agree")
            return len(points)
        return 1 if value is None else value

    @model_validator(mode="after")
    def _growth_defaults(self):
        """Give each operator the settings it takes by default inside a growth (the plan dump
        then says them): a mid-run growth must not leave its new units twins of old ones."""
        specs = []
        for spec in self.expand:
            try:
                defaults = spec.params().growth_defaults() if spec.op in OPS else {}
            except ValidationError:
                defaults = {}  # reported by the operator check
            specs.append(ExpandSpec.model_validate({**spec.model_dump(), **defaults}) if defaults else spec)
        self.expand = specs
        return self


class StageSpec(Strict):
    name: str | None = None
    task: str
    steps: Int = Field(..., ge=0, le=MAX_STEPS)
    freeze: Union[Literal["none", "base"], list[str]] = Field(
        "none", description='"none", "base" (only what this stage adds trains) or name globs to freeze')
    lr: Float | None = Field(None, gt=0, le=MAX_LR, description="overrides train.lr for this stage")
    expand: list[ExpandSpec] = Field(default_factory=list)
    grow: GrowSpec | None = Field(None, description="grow the model mid-stage when a trigger fires (plateau, at, "
                                  "budget)")


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
    depth: Int = Field(..., gt=0, le=MAX_DEPTH, description="layers of the stacked models")
    keep_ends: StrictBool = Field(True, description="keep the first and last source layers in place")
    mappings: list[list[Int]] | None = Field(None, max_length=MAX_SWEEP_MAPPINGS,
                                             description="explicit mappings (default: generated)")
    limit: Int | None = Field(None, gt=0, le=MAX_SWEEP_MAPPINGS, description="at most this many generated mappings")


class Plan(Strict):
    name: str = Field(..., min_length=1)
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="0..2**32-1 (numpy seeds)")
    description: str | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    tasks: dict[str, TaskSpec] = Field(..., min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    stages: list[StageSpec] = Field(default_factory=list, description="shared stages (before any variant)")
    variants: list[VariantSpec] = Field(default_factory=list, description="arms that share the stages")
    task_modules: StrictBool = Field(False, description="each stage's expansion modules belong to its task; "
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
        data["train"].pop("report_to", None)  # where metrics are mirrored changes no result
        data["stages"] = [s.model_dump(mode="json", exclude={"name"}) for s in self.stages[:stages]]
        data["format"] = PREFIX_FORMAT
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Bump when what a cached prefix checkpoint holds, or how stages train, changes.
PREFIX_FORMAT = 1


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
        fix = f" — did you mean '{hint[0]}'?" if hint else (f" — allowed: {', '.join(known)}" if known else " — remove it")
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
        for attr, is_low, is_open in (("gt", True, True), ("ge", True, False), ("lt", False, True), ("le", False, False)):
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


def _check_op(raw: dict, path: str) -> list[Problem]:
    name = raw.get("op")
    if not isinstance(name, str) or name not in OPS:
        hint = difflib.get_close_matches(str(name)[:100], list(OPS), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"known ops: {', '.join(sorted(OPS))}"
        return [Problem(f"{path}.op", f"unknown op {shown(name)} — {fix}")]
    try:
        OPS[name].schema.model_validate(raw)
    except ValidationError as e:
        return problems_from_pydantic(e.errors(), path, OPS[name].schema)
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


def _distributed_problems(train) -> list[Problem]:
    """The global batch is split evenly over the processes and, on each, over the micro-batches
    (so the figures do not depend on how the run is launched)."""
    if not isinstance(train, dict):
        return []
    spec = train.get("distributed") if isinstance(train.get("distributed"), dict) else {}
    counts = {"nproc": spec.get("nproc", 1), "nnodes": spec.get("nnodes", 1),
              "grad_accum": train.get("grad_accum", 1), "batch": train.get("batch_size", 16)}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in counts.values()):
        return []
    problems = []
    parts = counts["nproc"] * counts["nnodes"] * counts["grad_accum"]
    if counts["batch"] % parts:
        problems.append(Problem("train.batch_size", f"{counts['batch']} does not divide into {parts} equal parts "
                                f"(train.distributed.nproc {counts['nproc']} × nnodes {counts['nnodes']} × "
                                f"train.grad_accum {counts['grad_accum']}) — use a multiple of {parts}"))
    if counts["nnodes"] > 1 and not spec.get("rdzv_endpoint"):
        problems.append(Problem("train.distributed.rdzv_endpoint", "several machines meet at a rendezvous — "
                                "set it to host:port on the first machine (`--rdzv-endpoint HOST:PORT`)"))
    endpoint = spec.get("rdzv_endpoint")
    if isinstance(endpoint, str) and not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", endpoint):
        problems.append(Problem("train.distributed.rdzv_endpoint", f"{endpoint!r} is not host:port — e.g. "
                                "10.0.0.1:29500"))
    return problems


def _cross_check(raw: dict) -> list[Problem]:
    """Checks across fields (stage -> task, op -> its parameters), on the raw dict so that they
    run even when other fields are wrong: `plan check` reports every problem at once."""
    problems: list[Problem] = []
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    problems += _name_problems(raw, tasks)
    problems += _distributed_problems(raw.get("train"))
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
        if isinstance(name, str) and name in names:
            problems.append(Problem(f"variants.{v}.name", f"{shown(name)} names two variants — make names unique"))
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
        problems.append(Problem("sweep.task", f"unknown task {shown(sweep['task'])} — use one of: {listing(tasks)}"))
    return problems


def _name_problems(raw: dict, tasks: dict) -> list[Problem]:
    """Names that become file names (plan, tasks, variants; adapters are checked with their op)
    and stage names (labels), each one line with the fix."""
    found = []
    if "name" in raw and isinstance(raw["name"], str) and raw["name"]:
        found.append(("name", name_problem(raw["name"])))
    for task in tasks:
        found.append((f"tasks.{task}", name_problem(task)))
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    stage_lists = [("stages", shared)]
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    for v, variant in enumerate(variants):
        if isinstance(variant, dict):
            if isinstance(variant.get("name"), str) and variant["name"]:
                found.append((f"variants.{v}.name", name_problem(variant["name"])))
            if isinstance(variant.get("stages"), list):
                stage_lists.append((f"variants.{v}.stages", variant["stages"]))
    for where, stages in stage_lists:
        for i, stage in enumerate(stages):
            if isinstance(stage, dict) and isinstance(stage.get("name"), str):
                found.append((f"{where}.{i}.name", label_problem(stage["name"])))
    return [Problem(path, message) for path, message in found if message]


def _check_stages(stages: list, where: str, tasks: dict) -> list[Problem]:
    problems = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        task = stage.get("task")
        if isinstance(task, str) and tasks and task not in tasks:
            shown_task = task if name_problem(task) is None else "<name>"
            problems.append(Problem(f"{where}.{i}.task", f"unknown task {shown(task)} — define "
                                    f"[tasks.{shown_task}] or use one of: {listing(tasks)}"))
        for key, ops in _stage_op_lists(stage):
            for j, spec in enumerate(ops):
                if isinstance(spec, dict) and "op" in spec:
                    problems.extend(_check_op(spec, f"{where}.{i}.{key}.{j}"))
        problems += _grow_problems(stage.get("grow"), stage.get("steps"), f"{where}.{i}.grow")
    return problems


def _task_module_problems(stages: list, where: str, first: bool) -> list[Problem]:
    """With task_modules: after the first stage the base stays frozen and every operator adds a
    module that can be switched per task (engine.grow.task_modules says which)."""
    import re

    from engine.grow.task_modules import stage_problems

    problems = []
    for i, stage in enumerate(stages):
        if isinstance(stage, dict):
            index = i if first else i + 1  # a variant's stages come after the shared ones
            for field, message in stage_problems(index, stage):
                path = re.sub(r"\[(\d+)\]", r".\1", field)  # expand[1].mode -> expand.1.mode
                problems.append(Problem(f"{where}.{i}.{path}", message))
    return problems


def growth_count(grow: dict) -> int:
    """How many growths a raw ``[stages.grow]`` table allows: one per point of an at/budget
    trigger, else max_growths (default 1); 1 for what the schema refuses."""
    points = next((grow.get(k) for k in ("at_steps", "at_tokens", "at_fractions") if isinstance(grow.get(k), list)),
                  None)
    growths = len(points) if grow.get("trigger") in TRIGGER_FIELDS and points else grow.get("max_growths", 1)
    valid = isinstance(growths, int) and not isinstance(growths, bool) and 0 < growths <= MAX_GROWTHS
    return growths if valid else 1


def _grow_problems(grow, steps, where: str) -> list[Problem]:
    """at_steps inside the stage: a growth happens between two of its steps."""
    if not isinstance(grow, dict) or grow.get("trigger") != "at" or not isinstance(grow.get("at_steps"), list):
        return []
    if not isinstance(steps, int) or isinstance(steps, bool):
        return []
    late = [s for s in grow["at_steps"] if isinstance(s, int) and not isinstance(s, bool) and s >= steps]
    if not late:
        return []
    return [Problem(f"{where}.at_steps", f"step {', '.join(map(str, late[:8]))} is not inside the stage (steps = "
                                         f"{steps}): a growth happens between two of its steps — use steps below "
                                         f"{steps}, or grow at the next stage's start with [[stages.expand]]")]


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


def check_model_fields(raw: dict) -> list[Problem]:
    """The checks beyond the schema, on a raw plan dict so that they run even when other fields
    are wrong: what the plan points at (task sources, tokenizers, the device: engine.plan.checks)
    and what needs the model's config (loaded without weights). Each operator's layers are
    checked against the depth at that point of the plan (shared stages, then each variant's own,
    on the variant's model when it names one); seq_len against the model's positions; the
    sweep's mappings against the depth after the last stage."""
    from engine.plan.checks import environment_problems

    problems = [Problem(path, message) for path, message in environment_problems(raw)]
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    arch, found = _architecture(raw.get("model") or {}, "model")
    problems += found
    depths = {view.stack: view.num_layers for view in arch.stacks()} if arch else {}
    if arch:
        problems += _check_stage_ops(shared, "stages", depths, arch)
        problems += _seq_len_problems(raw, arch, "")
    arms = []  # (arch, depths after the last stage, where a problem of this arm is reported)
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    for v, variant in enumerate(variants):
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
            problems += [p for p in _seq_len_problems(raw, own, f" (variants.{v}.model)") if p not in problems]
            arms.append((own, own_depths, f"variant {v}"))
        elif arch:
            final = dict(depths)
            problems += _check_stage_ops(stages, f"variants.{v}.stages", final, arch)
            arms.append((arch, final, f"variant {v}"))
    if not variants and arch:
        arms.append((arch, depths, ""))
    sweep = raw.get("sweep")
    if isinstance(sweep, dict):
        for own, final, label in arms:
            problems += [p for p in _sweep_problems(sweep, own, final, label) if p not in problems]
    return problems


def _seq_len_problems(raw: dict, arch, label: str) -> list[Problem]:
    """train.seq_len at most the model's positions, when its config has a limit."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    seq_len = train.get("seq_len", TrainSpec.model_fields["seq_len"].default)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 1 < seq_len <= MAX_SEQ_LEN:
        return []  # the schema reports it
    config = getattr(arch, "config", None)
    for field in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, field, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if seq_len > limit:
                return [Problem("train.seq_len", f"{seq_len} is longer than the model's {limit} positions "
                                f"({field}){label} — use seq_len <= {limit}")]
            return []
    return []


def _sweep_problems(sweep: dict, arch, depths: dict, label: str) -> list[Problem]:
    """What the sweep after the last stage would trip on: the model kind, each mapping's length
    and indices (source layers 0..depth-1 after the last stage), too many generated mappings."""
    from math import comb

    after = f" after the last stage{f' of {label}' if label else ''}"
    family = arch.family
    if family.kind != "causal_lm" or family.final_norm is None or len(depths) != 1:
        return [Problem("sweep", f"the mapping sweep supports decoder-only transformers (GPT-Neo, GPT-2, GPT-NeoX, "
                                 f"Llama/Mistral/Qwen2) — {family.name} ({family.kind}){f' in {label}' if label else ''} "
                                 "is not supported; remove [sweep]")]
    num_layers = next(iter(depths.values()))
    depth = sweep.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 < depth <= MAX_DEPTH:
        return []  # the schema reports it
    mappings = sweep.get("mappings")
    problems = []
    if isinstance(mappings, list) and mappings:
        for m, mapping in enumerate(mappings):
            if not isinstance(mapping, list):
                continue  # the schema reports it
            where = f"sweep.mappings.{m}"
            if len(mapping) != depth:
                problems.append(Problem(where, f"has {len(mapping)} entries — every mapping needs {depth} (sweep.depth); "
                                        "fix the mapping or the depth"))
            entries = [x for x in mapping if isinstance(x, int) and not isinstance(x, bool)]
            bad = sorted({x for x in entries if not 0 <= x < num_layers})
            if bad:
                problems.append(Problem(where, f"uses layer {', '.join(shown(x) for x in bad[:8])} — the model has "
                                        f"{num_layers} layers{after} (0..{num_layers - 1}); use those indices"))
        return problems
    keep_ends = sweep.get("keep_ends", True)
    if keep_ends is True and num_layers > 1 and depth < 2:
        return [Problem("sweep.depth", f"depth {depth} cannot keep both the first and the last source layer — "
                                       "use depth >= 2 or keep_ends = false")]
    middle = depth - 2 if keep_ends is True and num_layers > 1 else depth
    total = comb(num_layers + middle - 1, middle) if middle > 0 else 1
    if sweep.get("limit") is None and total > SWEEP_MAX_GENERATED:
        return [Problem("sweep.limit", f"{total:,} mappings of {depth} layers over {num_layers}{after} — too many "
                                       f"to score all (at most {SWEEP_MAX_GENERATED}): set limit (e.g. 50) or give mappings")]
    return []


def _architecture(model_raw, where: str):
    """(ArchView from the config alone, problems) for a raw model table."""
    from engine.model.sources import ModelLoadError, load_architecture
    from engine.plan.checks import model_source_problems

    try:
        model = ModelSpec.model_validate(model_raw)
    except ValidationError:
        return None, []  # reported by the schema check
    shape = model_source_problems(model.model_dump(), where)
    if shape:
        return None, [Problem(path, message) for path, message in shape]
    try:
        return load_architecture(model), []
    except ModelLoadError as e:
        return None, [Problem(f"{where}.{e.field}", str(e))]
    except Exception as e:  # noqa: BLE001 - a config transformers cannot read is a problem of the plan
        reason = " ".join(str(e).split())[:160] or e.__class__.__name__
        return None, [Problem(f"{where}.source", f"cannot read the model's config ({e.__class__.__name__}: {reason}) "
                                                 "— use builtin:tiny-neo or a model directory with a valid config.json")]


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
                repeats = growth_count(stage["grow"])
            for _ in range(repeats):
                found = []
                for j, spec in enumerate(ops):
                    found += _check_one_op(spec, f"{where}.{i}.{key}.{j}", depths, arch)
                problems += [p for p in found if p not in problems]
    return problems


def _check_one_op(spec, where: str, depths: dict, arch) -> list[Problem]:
    if not isinstance(spec, dict) or not isinstance(spec.get("op"), str) or spec["op"] not in OPS:
        return []  # reported by the schema check
    problems = []
    op_class = OPS[spec["op"]].schema
    try:
        params = op_class.model_validate(spec)
        source_layers = params.source_layers()
    except ValidationError:  # other fields are reported by the schema check; indices still here
        params = None
        raw_layers = spec.get(op_class.source_field)
        source_layers = [k for k in raw_layers if isinstance(k, int)] if isinstance(raw_layers, list) else []
    stack = spec.get("stack")
    if stack is not None and not isinstance(stack, str):
        return []  # reported by the schema check
    if stack is not None and stack not in depths:
        names = ", ".join(str(n) for n in depths if n) or "none (one stack of blocks)"
        return [Problem(f"{where}.stack", f"{shown(stack)} is not a stack of this model — stacks: {names}")]
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
    refusal = arch.base_family.refusal(spec["op"]) if hasattr(arch.base_family, "refusal") else None
    if refusal:  # the family's own (ArchFamily.refused_ops): said before any work is done
        problems.append(Problem(f"{where}.op", refusal))
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
    problems += check_model_fields(raw)
    return (plan if not problems else None), problems
