"""The plan's schema: the pydantic models of a plan.toml and the bounds of its numbers.

Every number is bounded (no bools as numbers, no inf/nan); a field's own rules live on its model
(a trigger's points, a tracker named twice). What spans several fields or needs the model's config
is engine.plan.checks; turning pydantic's errors into one line each is engine.plan.problems.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine import builtins
from engine.ops.mapping_families import FAMILY_NAMES, HANDFUL, MAX_NON_DECREASING, parse_spec
from engine.ops.params import MAX_DEPTH, MAX_STEPS, OPS, Float, Int, OpParams
from engine.plan.problems import shown

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
MAX_ROUTER_LOSS_COEF = 100.0    # router_aux_loss_coef, router_z_loss_coef (models use 0.001 to 0.01)

# What `[train] report_to` takes (engine.runs.trackers mirrors to them; engine.plan.checks asks
# whether each one's package is installed).
TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(Strict):
    source: str = Field("builtin:tiny-neo", description="builtin:<name>, a hub name, a local directory, "
                        "or a .gguf file")
    tokenizer: str = Field("bytes", description='"bytes", a tokenizer hub name / directory, "gguf" (the model\'s '
                           'GGUF file) or a .gguf file')
    revision: str | None = None
    gguf_file: str | None = Field(None, description="a GGUF file's name inside `source` (a directory or hub name)")
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

    @field_validator("gguf_file")
    @classmethod
    def _gguf_file_name(cls, v):
        if v is not None and (not v.lower().endswith(".gguf") or "/" in v or "\\" in v or v.startswith(".")):
            raise ValueError(f"'{v}' is not a GGUF file's name — give the name of a .gguf file inside source "
                             "(no folders), or put the file's path in source")
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
    generate_examples: Int = Field(16, ge=0, le=MAX_GENERATE_EXAMPLES, description="generation tasks: held-out "
                                   "examples decoded and scored (exact match, BLEU-4) at each stage end; 0 disables")
    max_new_tokens: Int = Field(96, gt=0, le=MAX_NEW_TOKENS,
                                description="generation tasks: decoding budget per example")

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


Fraction1 = Annotated[Float, Field(gt=0, le=1)]   # a share that may be all of it
WSD_DECAY_FRACTION, WSD_DECAY_SHAPE = 0.2, "linear"   # schedule = "wsd" without decay_fraction / decay_shape


class TrainSpec(Strict):
    batch_size: Int = Field(16, gt=0, le=MAX_BATCH_SIZE)
    seq_len: Int = Field(128, gt=1, le=MAX_SEQ_LEN, description="tokens per sequence (at most the model's positions)")
    lr: Float = Field(1e-3, gt=0, le=MAX_LR)
    weight_decay: Float = Field(0.0, ge=0, le=MAX_WEIGHT_DECAY)
    schedule: Literal["constant", "linear", "cosine", "wsd"] = Field(
        "cosine", description="the lr after the warm-up: constant; linear to 0; cosine to 0.1 of the peak; wsd: "
        "warmup-stable-decay, the peak held, then a decay to 0 over the last decay_fraction of each stage")
    decay_fraction: Fraction1 | None = Field(None, validate_default=True, description="wsd: the share of each "
                                             "stage's steps the decay takes (default 0.2)",
                                             json_schema_extra={"default_text": "0.2 under wsd"})
    decay_shape: Literal["linear", "cosine", "sqrt"] | None = Field(
        None, validate_default=True, description="wsd: the decay's shape — linear 1-p, cosine (1+cos πp)/2, "
        "sqrt 1-√p (p: the share of the decay done; default linear)",
        json_schema_extra={"default_text": "linear under wsd"})
    warmup_steps: Int = Field(0, ge=0, le=MAX_STEPS)
    residual_scaling: Literal["none", "depth_mup"] = Field(
        "none", description="depth_mup: every block's residual branches read through (base/depth)^½ and its "
        "AdamW lr scaled alike (depth-µP), folded into the weights and the optimizer's groups so the model "
        "stays a standard one; a growth in depth keeps the function (docs/growth.md)")
    residual_base_depth: Int | None = Field(None, ge=1, le=MAX_DEPTH, description="depth_mup: the depth whose "
                                            "multiplier is 1 (default: the model's depth as loaded)",
                                            json_schema_extra={"default_text": "the loaded model's depth"})
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
    router_aux_loss_coef: Float | None = Field(
        None, ge=0, le=MAX_ROUTER_LOSS_COEF, description="mixture of experts: the weight of the routers' "
        "load-balancing loss (E·Σ f_e·P_e, as transformers computes it) in the training loss; default: the model "
        "config's own (router_aux_loss_coef: 0.001 for Mixtral, 0.01 for OLMoE); 0 turns it off",
        json_schema_extra={"default_text": "the model config's"})
    router_z_loss_coef: Float | None = Field(
        None, ge=0, le=MAX_ROUTER_LOSS_COEF, description="mixture of experts: the weight of the router z-loss "
        "(ST-MoE: mean logsumexp(router logits)²) in the training loss; default: the config's own where the family "
        "has one, else 0 (off)", json_schema_extra={"default_text": "the model config's, else 0"})
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

    @field_validator("decay_fraction", "decay_shape")
    @classmethod
    def _belongs_to_wsd(cls, value, info: ValidationInfo):
        schedule = info.data.get("schedule")
        if schedule is None:
            return value  # the schedule itself is wrong: reported there
        if value is not None and schedule != "wsd":
            raise ValueError(f'belongs to schedule = "wsd" (this one is "{schedule}") — remove it or set '
                             'schedule = "wsd"')
        if schedule == "wsd" and value is None:
            return WSD_DECAY_FRACTION if info.field_name == "decay_fraction" else WSD_DECAY_SHAPE
        return value

    @field_validator("residual_base_depth")
    @classmethod
    def _belongs_to_depth_mup(cls, value, info: ValidationInfo):
        scaling = info.data.get("residual_scaling")
        if value is not None and scaling is not None and scaling != "depth_mup":
            raise ValueError(f'belongs to residual_scaling = "depth_mup" (this one is "{scaling}") — remove it or '
                             'set residual_scaling = "depth_mup"')
        return value

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
        "decaying over the stage's steps left (LEMON); under wsd: back to the peak, the decay where it was")
    rewarm_steps: Int = Field(0, ge=0, le=MAX_STEPS, description="rewarm: the lr climbs from 0 back to the peak "
                              "over these steps after a growth (SPARKLING's re-warm-up; 0: at once)")
    optimizer_state: Literal["carry", "reset", "asymmetric"] = Field(
        "carry", description="AdamW's moments at a growth — carry: every old entry's state follows it, copies "
        "take their source's (Staged Training); reset: a fresh AdamW for the whole model; asymmetric: old "
        "entries keep theirs, every new entry (new units, copies, blocks) starts at zero (SPARKLING)")
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

    @field_validator("rewarm_steps")
    @classmethod
    def _rewarm_needs_rewarm(cls, value, info: ValidationInfo):
        after = info.data.get("schedule_after")
        if value and after is not None and after != "rewarm":
            raise ValueError(f'belongs to schedule_after = "rewarm" (this one is "{after}") — remove it or set '
                             'schedule_after = "rewarm"')
        return value

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
    train: dict | None = Field(None, description="this variant's changes to [train] (e.g. residual_scaling, lr, "
                               "schedule), over the plan's; checked as the merged [train]")
    stages: list[StageSpec] = Field(default_factory=list)


def _family_spec(text: str) -> str:
    """A `[sweep] families` entry: "all" or a family spec (engine.ops.mapping_families)."""
    if text != "all":
        parse_spec(text, where="")  # FamilyError is a ValueError: pydantic names the field
    return text


FamilySpecText = Annotated[str, AfterValidator(_family_spec)]


class SweepSpec(Strict):
    """Score layer mappings of the trained model without training (after the last stage)."""

    task: str = Field(..., description="the task whose held-out text scores each mapping")
    depth: Int = Field(..., gt=0, le=MAX_DEPTH, description="layers of the stacked models")
    keep_ends: StrictBool = Field(True, description="keep the first and last source layers in place")
    mappings: list[list[Int]] | None = Field(None, max_length=MAX_SWEEP_MAPPINGS,
                                             description="explicit mappings (default: generated)")
    limit: Int | None = Field(None, gt=0, le=MAX_SWEEP_MAPPINGS, description="at most this many generated mappings")
    families: list[FamilySpecText] | None = Field(
        None, min_length=1, max_length=len(FAMILY_NAMES) * 8,
        description="mapping families to draw from: " + ", ".join(FAMILY_NAMES) + ', or "all"; a name may fix '
                    'parameters, e.g. "band:times=3" (default: every non-decreasing mapping, or every family when '
                    f"growing and those are over {MAX_NON_DECREASING})")
    per_family: Int | None = Field(None, gt=0, le=MAX_SWEEP_MAPPINGS,
                                   description=f"at most this many mappings of each family (default {HANDFUL})")

    @model_validator(mode="after")
    def _mappings_or_families(self):
        if self.mappings is not None and self.families is not None:
            raise ValueError("give mappings or families, not both — explicit mappings are scored as they are")
        return self


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

    @model_validator(mode="after")
    def _variant_train(self):
        """A variant's [train] changes must make a valid [train] with the plan's: the first problem,
        named by its path (``variants[i].train.<field>``)."""
        for i, variant in enumerate(self.variants):
            if variant.train:
                try:
                    self.variant_train(variant)
                except ValidationError as e:
                    first = e.errors()[0]
                    where = ".".join(str(part) for part in first["loc"])
                    raise ValueError(f"variants[{i}].train{'.' + where if where else ''}: "
                                     f"{first['msg'].removeprefix('Value error, ')}") from None
        return self

    def variant_train(self, variant: "VariantSpec") -> TrainSpec:
        """The [train] a variant runs: the plan's, with the variant's changes."""
        if not variant.train:
            return self.train
        return TrainSpec.model_validate({**self.train.model_dump(exclude_unset=True), **variant.train})

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
        if variant.train:
            data["train"] = self.variant_train(variant).model_dump(exclude_unset=True)
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


# Bump when what a cached prefix checkpoint holds, or how stages train, changes (2: a mixture of
# experts trains with its routers' losses, engine.train.moe).
PREFIX_FORMAT = 2
