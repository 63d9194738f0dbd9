"""The typed record of each event type in ``events.jsonl`` (pydantic v2): the contract between the
writer (``engine.runs.events.EventWriter``) and every reader.

Every event carries ``type`` and ``t`` (epoch seconds); each type's required keys are its model's
fields without a default. A metric may be null (a non-finite value is written as null). "int"
means an int, not a bool; "num" (``Num``) an int or a float, not a bool — kept as written (an int
stays an int). Optional keys are checked only when present, and keys no model names are kept as
they are (``extra="allow"``: newer engines add keys); a key that is declared ``Any`` is carried
for the readers that use it, unchecked, as before.

``parse_event(data)`` gives one line's record: an unknown ``type`` (from a newer engine) becomes a
``GenericEvent`` that readers skip. ``EventError`` says, in one line, why a line is not an event
("eval event lacks loss", "step event: loss is a string, not a number").
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    PlainValidator,
    PrivateAttr,
    StrictInt,
    StrictStr,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError


class EventError(ValueError):
    """Why a parsed line (or the fields given to the writer) is not an event; one line."""


def _number(value: Any) -> int | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # kept as written: 32 stays 32, never 32.0
    raise PydanticCustomError("number_type", "Input should be a number")


# "num": an int or a float (not a bool), NaN allowed (older files wrote the literal)
Num = Annotated[float, PlainValidator(_number)]


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class EventRecord(BaseModel):
    """What every event carries. ``to_json()`` is the object as written (the keys in their order)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    _keys: tuple[str, ...] = PrivateAttr(default=())  # the keys in the order they were written

    type: StrictStr
    t: Num
    cached: Any = None  # true: copied from the prefix cache (its times are the first run's)

    def number(self, key: str) -> int | float | None:
        """The finite number under `key` (a declared key or an extra one); None when it is absent,
        null, non-finite or not a number. For keys named at run time (a metric, an axis)."""
        value = getattr(self, key, None)
        return value if is_number(value) else None

    def to_json(self) -> dict:
        """The event as a JSON object, as written: its keys only (no defaults), in their order."""
        data = self.model_dump(exclude_unset=True)
        if not self._keys:
            return data
        ordered = {key: data[key] for key in self._keys if key in data}
        return ordered if len(ordered) == len(data) else {**ordered, **data}

    def __eq__(self, other: object) -> bool:  # the same event, however its keys were ordered
        if not isinstance(other, EventRecord):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__ \
            and (self.__pydantic_extra__ or {}) == (other.__pydantic_extra__ or {})


Metric = Num | None  # "num?": a null is a missing (or non-finite) figure


class StartEvent(EventRecord):
    type: Literal["start"]
    run: StrictStr
    plan: StrictStr
    seed: StrictInt | None
    device: StrictStr
    pid: StrictInt | None
    params: Metric
    stages: StrictInt
    resumed: Any
    stage_steps: list | None = None
    world_size: Any = None        # processes under torchrun
    variant: Any = None
    prefix_cached: Any = None     # the shared stages came from the prefix cache


class StageEvent(EventRecord):
    type: Literal["stage"]
    stage: StrictInt
    name: StrictStr
    task: StrictStr
    steps: StrictInt
    phase: StrictStr              # begin | end
    global_step: Metric = None
    tokens: Metric = None
    flops: Metric = None
    params: Metric = None         # the end's model size
    trainable: Metric = None


class StepEvent(EventRecord):
    type: Literal["step"]
    stage: StrictInt
    step: StrictInt
    global_step: Num
    loss: Metric
    lr: Metric
    tokens_per_s: Metric
    tokens: Metric
    flops: Metric
    params: Metric = None
    # a mixture of experts: the loss trained on, `loss` (the language-model loss) plus the routers'
    # weighted losses (engine.train.moe); absent for a dense model and in older files
    total_loss: Metric = None


class EvalEvent(EventRecord):
    type: Literal["eval"]
    stage: StrictInt              # -1: the initial evaluation
    step: StrictInt
    task: StrictStr
    loss: Metric
    ppl: Metric
    bpb: Metric
    global_step: Num | None = None
    tokens: Metric = None
    flops: Metric = None


class ExpandEvent(EventRecord):
    """One operator applied at a stage start, or (with a ``trigger``) one of a growth mid-stage."""

    type: Literal["expand"]
    stage: StrictInt
    op: StrictStr
    params_before: Metric
    params_after: Metric
    params_added: Metric
    trainable: Metric
    exact: Any
    max_abs_logit_delta: Metric
    loss_before: Metric
    loss_after: Metric
    trainable_share: Metric = None
    task: StrictStr | None = None
    max_pairwise_cosine: Metric = None
    max_twin_cosine: Metric = None
    trigger: Any = None           # a growth: what fired it (plateau, at, budget)
    growth: StrictInt | None = None   # a growth's index in its stage, from 0
    step: StrictInt | None = None
    global_step: Num | None = None
    tokens: Metric = None
    flops: Metric = None
    new_grad_norm: Any = None


class HealthEvent(EventRecord):
    """The new units of a stage's operator, measured after the stage trained."""

    type: Literal["health"]
    stage: StrictInt
    op: StrictStr
    max_pairwise_cosine: Metric
    max_twin_cosine: Metric


class SystemEvent(EventRecord):
    type: Literal["system"]
    rss_mb: Metric
    cpu_percent: Metric
    gpus: list[dict]
    gpu_status: StrictStr | None
    torch_peak_mb: Metric


class CheckpointEvent(EventRecord):
    type: Literal["checkpoint"]
    stage: StrictInt
    step: StrictInt
    path: StrictStr
    reason: StrictStr


class StatusEvent(EventRecord):
    type: Literal["status"]
    state: StrictStr
    error: StrictStr | None = None  # when failed / diverged


class SweepEvent(EventRecord):
    """A mapping sweep after the stages."""

    type: Literal["sweep"]
    task: StrictStr
    depth: StrictInt
    rows: StrictInt
    best: dict | None
    reference_ppl: Any = None
    speedup: Any = None


class ResumeEvent(EventRecord):
    """A resumed run continues from (stage, step); what was logged past it is void."""

    type: Literal["resume"]
    stage: StrictInt
    step: StrictInt
    global_step: Num
    ops_applied: Any = None       # false: the stage's operators are applied again
    from_checkpoint: Any = None   # false: no checkpoint, the run starts over


class RankRow(BaseModel):
    """One rank of a ``ranks`` event (host None when not gathered, gpu_mem_mb None without a GPU)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    rank: StrictInt
    host: StrictStr | None = None
    rss_mb: Metric = None
    gpu_mem_mb: Metric = None


class RanksEvent(EventRecord):
    """A distributed run, at each logged step: every rank's memory, one row per rank."""

    type: Literal["ranks"]
    stage: StrictInt
    step: StrictInt
    global_step: Num
    ranks: list[RankRow]

    @field_validator("ranks")
    @classmethod
    def _each_rank_once(cls, ranks: list[RankRow]) -> list[RankRow]:
        if not ranks:
            raise ValueError("ranks is empty")
        seen: set[int] = set()
        for i, row in enumerate(ranks):
            if row.rank < 0 or row.rank in seen:
                raise ValueError(f"ranks[{i}].rank {row.rank} is {'negative' if row.rank < 0 else 'repeated'}")
            seen.add(row.rank)
        return ranks


class ExpertLayer(BaseModel):
    """One sparse block of an ``experts`` event: what its router did over the window."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    layer: StrictInt              # the block's index
    load: list[Num]               # per expert: its share of the routed (token, slot) pairs (they sum to 1)
    dead: list[StrictInt] = []    # experts that got no token in the window
    entropy: Metric = None        # mean entropy of the router's distribution per token, in nats (max ln E)
    tokens: StrictInt | None = None   # tokens routed in the window

    @field_validator("dead")
    @classmethod
    def _dead_are_experts(cls, dead: list[int], info) -> list[int]:
        if "load" not in info.data:
            return dead  # the load is wrong: said there
        experts = len(info.data["load"])
        wrong = [e for e in dead if not 0 <= e < experts]
        if wrong:
            raise ValueError(f"dead expert {wrong[0]} is not one of the layer's {experts} experts")
        return dead


class ExpertsEvent(EventRecord):
    """A mixture of experts, at each logged step: per sparse block, the share of tokens each expert
    got, the experts that got none and the router's entropy, over the `steps` training steps since
    the previous one (engine.train.moe); the load-balancing loss (and z-loss) over them, unweighted,
    with the coefficients the training loss used."""

    type: Literal["experts"]
    stage: StrictInt
    step: StrictInt
    global_step: Num
    steps: StrictInt              # training steps the window covers
    top_k: StrictInt              # experts per token
    layers: list[ExpertLayer]
    aux_loss: Metric = None
    aux_coef: Metric = None
    z_loss: Metric = None
    z_coef: Metric = None

    @field_validator("layers")
    @classmethod
    def _each_layer_once(cls, layers: list[ExpertLayer]) -> list[ExpertLayer]:
        if not layers:
            raise ValueError("layers is empty")
        seen: set[int] = set()
        for i, row in enumerate(layers):
            if row.layer < 0 or row.layer in seen:
                raise ValueError(f"layers[{i}].layer {row.layer} is {'negative' if row.layer < 0 else 'repeated'}")
            if not row.load:
                raise ValueError(f"layers[{i}].load is empty")
            seen.add(row.layer)
        return layers


class WarningEvent(EventRecord):
    """Something went wrong beside the run, which goes on (a tracker that failed)."""

    type: Literal["warning"]
    source: StrictStr
    message: StrictStr


# what a `progress` event's `phase` says the worker is doing (a reader shows another one as written)
ProgressPhase = Literal["load", "tokenize", "evaluate", "generate"]


class ProgressEvent(EventRecord):
    """What the worker is busy with where no step comes for a while: loading the model or the
    tokenizer (``load``: `what` is "model", "tokenizer" or "checkpoint"), tokenizing a task's
    corpus (``tokenize``: `done` tasks of `total` before this one), scoring a task's eval batches
    (``evaluate``: `done` batches of `total`), decoding a generation task's examples
    (``generate``). Live only: rank 0 writes it throttled (a phase's start at once, its updates at
    most about once a second), readers show the latest until a step, eval or stage event follows;
    the trackers and the prefix cache leave it out."""

    type: Literal["progress"]
    phase: StrictStr              # a ProgressPhase; another (a newer engine's) is kept as written
    what: StrictStr
    done: StrictInt
    total: StrictInt | None = None   # None: not known (a model loading)


class GenericEvent(EventRecord):
    """An event of a type this engine does not know (a newer engine's): kept, skipped by readers."""

    t: Any = None


EVENT_TYPES: dict[str, type[EventRecord]] = {
    "start": StartEvent, "stage": StageEvent, "step": StepEvent, "eval": EvalEvent, "expand": ExpandEvent,
    "health": HealthEvent, "system": SystemEvent, "checkpoint": CheckpointEvent, "status": StatusEvent,
    "sweep": SweepEvent, "resume": ResumeEvent, "ranks": RanksEvent, "warning": WarningEvent,
    "progress": ProgressEvent, "experts": ExpertsEvent,
}
_OTHER = "other"


def _tag(data: Any) -> str:
    kind = data.get("type") if isinstance(data, dict) else getattr(data, "type", None)
    return kind if kind in EVENT_TYPES else _OTHER


AnyEvent = Annotated[Union[tuple(Annotated[model, Tag(kind)] for kind, model in EVENT_TYPES.items())
                           + (Annotated[GenericEvent, Tag(_OTHER)],)],
                     Discriminator(_tag)]
_ADAPTER: TypeAdapter[EventRecord] = TypeAdapter(AnyEvent)

# interned key orders: the writer writes few distinct ones, so records share them
_KEY_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _keep_order(record: EventRecord, data: dict) -> EventRecord:
    keys = tuple(data)
    record._keys = _KEY_ORDERS.setdefault(keys, keys) if len(_KEY_ORDERS) < 4096 else keys
    return record


def parse_event(data: Any) -> EventRecord:
    """The record of one parsed line; raises ``EventError`` saying why it is not an event. An
    object of an unknown type is a ``GenericEvent``."""
    if not isinstance(data, dict):
        raise EventError(f"not an object but {_what(data)}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise EventError("no event type" if kind is None else f"type is {_what(kind)}")
    try:
        return _keep_order(_ADAPTER.validate_python(data), data)
    except ValidationError as e:  # the union names the member first: ("step", "loss") -> ("loss",)
        errors = [{**x, "loc": x["loc"][1:]} for x in e.errors(include_url=False)]
        raise EventError(_explain(kind, data, errors)) from None


def build_event(kind: str, data: dict) -> EventRecord:
    """The writer's record: `data` must be a known event type's (raises ``EventError``)."""
    model = EVENT_TYPES.get(kind)
    if model is None:
        raise EventError(f"unknown event type {kind!r}")
    try:
        return _keep_order(model.model_validate(data), data)
    except ValidationError as e:
        raise EventError(_explain(kind, data, e.errors(include_url=False))) from None


# ---------------------------------------------------------------------------------------------
# one line saying what is wrong

_EXPECTED = {"int_type": "an integer", "number_type": "a number", "string_type": "a string", "list_type": "a list",
             "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
             "literal_error": "its type"}


def _what(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _path(loc: tuple) -> str:
    text = str(loc[0])
    for part in loc[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _explain(kind: str, data: dict, errors: list[dict]) -> str:
    """"<kind> event lacks a, b" when required keys are missing, else "<kind> event: x is a
    string, not a number, ..." (in the order the keys were written)."""
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    if missing:
        return f"{kind} event lacks {', '.join(missing)}"
    order = {key: i for i, key in enumerate(data)}
    wrong: list[str] = []
    for e in sorted(errors, key=lambda e: order.get(e["loc"][0], len(order)) if e["loc"] else -1):
        if e["type"] == "value_error":  # a check of our own: its message says it all
            text = str(e.get("ctx", {}).get("error", e["msg"]))
        elif e["type"] == "missing":
            text = f"{_path(e['loc'][:-1])} lacks {e['loc'][-1]}"
        else:
            text = f"{_path(e['loc'])} is {_what(e['input'])}, not {_EXPECTED.get(e['type'], 'valid')}"
        if text not in wrong:
            wrong.append(text)
    return f"{kind} event: {', '.join(wrong)}"
