"""Every check of a plan beyond its schema, on the raw plan dict so that they run even when other
fields are wrong: ``plan check`` reports every problem at once.

- Across fields (``cross_check``, run by every load): stage -> task, op -> its parameters, names
  that become file names, the batch split over processes, growth points inside their stage, and
  with ``task_modules`` what a later stage may add (``stage_problems``, ``task_module_problems``:
  torch-free, over the op descriptors ``engine.ops.params.OPS``).
- What the plan points at (``environment_problems``): task sources, tokenizers, the model source's
  shape, the device, the trackers' packages: existence and configuration, never data. Nothing here
  reads a corpus, loads a tokenizer or touches the network: a hub name that is not a local path
  is checked by its shape only. torch is imported only to answer "is CUDA available?", and only
  when the plan's device or dtype asks it (``device = "cuda"``, or ``dtype = "float16"`` with
  ``device = "auto"``).
- Against the model's config, loaded without weights (``check_model_fields``): layer indices at
  each point of the plan, seq_len against the model's positions, the sweep's mappings.

The environment and task-module checks return ``(field, message — fix)`` pairs; the others Problems.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from engine import builtins
from engine.model.families import residual_scaling_refusal
from engine.model.gguf import INSTALL_HINT as GGUF_INSTALL_HINT
from engine.model.gguf import TOKENIZER_FROM_MODEL, is_gguf_path
from engine.names import label_problem, name_problem
from engine.ops.mapping_families import FAMILY_NAMES, MAX_NON_DECREASING, family_candidates
from engine.ops.mapping_families import parse_spec as parse_family_spec
from engine.ops.params import MAX_DEPTH, OPS
from engine.plan.problems import SHOWN_CHARS, Problem, listing, problems_from_pydantic, shown
from engine.plan.schema import (
    GENERATION_SOURCES,
    MAX_GROWTHS,
    MAX_ROUTER_LOSS_COEF,
    MAX_SEQ_LEN,
    TRACKER_NAMES,
    TRIGGER_FIELDS,
    ModelSpec,
    TrainSpec,
)

# Hub repository ids: "name" or "owner/name"; letters, digits, '-', '_', '.', at most 96 each.
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
# Files a local tokenizer directory holds at least one of (engine.train.data digests the same prefixes).
TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece")
# The package each tracker of `report_to` needs (the module importlib looks for).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
INSTALL_HINT = "pip install 'widen[trackers]'"
# Above this many non-decreasing mappings the sweep draws from the mapping families instead.
SWEEP_MAX_GENERATED = MAX_NON_DECREASING


# ---------------------------------------------------------------------------------------------
# across fields


def cross_check(raw: dict) -> list[Problem]:
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
        problems += _task_module_stage_problems(stages, "stages", first=True)
        for v, variant in enumerate(variants):
            vstages = variant.get("stages") if isinstance(variant, dict) else None
            if isinstance(vstages, list):
                problems += _task_module_stage_problems(vstages, f"variants.{v}.stages", first=not stages)
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


def _stage_op_lists(stage: dict) -> list[tuple[str, list]]:
    """("expand", [ops]) and ("grow.expand", [ops]) of a raw stage: the operators it may apply."""
    out = []
    expand = stage.get("expand")
    out.append(("expand", expand if isinstance(expand, list) else []))
    grow = stage.get("grow")
    if isinstance(grow, dict) and isinstance(grow.get("expand"), list):
        out.append(("grow.expand", grow["expand"]))
    return out


def growth_count(grow: dict) -> int:
    """How many growths a raw ``[stages.grow]`` table allows: one per point of an at/budget
    trigger, else max_growths (default 1); 1 for what the schema refuses."""
    points = next((grow.get(k) for k in ("at_steps", "at_tokens", "at_fractions") if isinstance(grow.get(k), list)),
                  None)
    trigger = grow.get("trigger")
    growths = len(points) if isinstance(trigger, str) and trigger in TRIGGER_FIELDS and points \
        else grow.get("max_growths", 1)
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


# ---------------------------------------------------------------------------------------------
# task modules: after the first stage, only separate paths that can be switched per task


def _task_module_stage_problems(stages: list, where: str, first: bool) -> list[Problem]:
    """With task_modules: after the first stage the base stays frozen and every operator adds a
    module that can be switched per task (``stage_problems`` says which)."""
    problems = []
    for i, stage in enumerate(stages):
        if isinstance(stage, dict):
            index = i if first else i + 1  # a variant's stages come after the shared ones
            for field, message in stage_problems(index, stage):
                path = re.sub(r"\[(\d+)\]", r".\1", field)  # expand[1].mode -> expand.1.mode
                problems.append(Problem(f"{where}.{i}.{path}", message))
    return problems


def stage_problems(index: int, stage) -> list[tuple[str, str]]:
    """(field, message) for stage `index` of a task_modules plan (fields relative to the stage:
    ``freeze``, ``expand[1].mode``, ``grow.expand[0].op``). The first stage builds the shared base
    (any op, any freezing; its switchable modules belong to its task); every later stage must keep
    the base frozen and add only task-specific modules."""
    if index == 0:
        return []
    problems = []
    freeze = _get(stage, "freeze", "none")
    if freeze != "base":
        given = f'"{freeze}"' if isinstance(freeze, str) else str(freeze)
        problems.append(("freeze", f"task_modules keeps the shared base frozen after the first stage: freeze = {given} "
                                   "would let this stage change every task's model — set freeze = \"base\""))
    groups = [("expand", _get(stage, "expand", []) or [])]
    grow = _get(stage, "grow", None)
    if grow is not None:
        groups.append(("grow.expand", _get(grow, "expand", []) or []))
    for prefix, specs in groups:
        if not isinstance(specs, list):
            continue  # the schema names what is wrong with it
        for i, spec in enumerate(specs):
            if not isinstance(spec, Mapping) and not hasattr(spec, "model_dump"):
                continue  # not a table: the schema names it
            for field, message in task_module_problems(spec):
                problems.append((f"{prefix}[{i}].{field}", message))
    return problems


def task_module_problems(op_params) -> list[tuple[str, str]]:
    """(field, message) for an op that cannot be a task-specific module; [] if it can.

    `op_params`: an ``OpParams`` (``ExpandSpec.params()``), an ``ExpandSpec`` or the raw table.
    Unknown ops give [] (the plan checker reports those itself)."""
    data = _op_settings(op_params)
    op = data.get("op")
    descriptor = OPS.get(op) if isinstance(op, str) else None
    if descriptor is None:
        return []  # an unknown op is the plan checker's own error
    if descriptor.task_module and descriptor.parallel_mode:
        if data.get("mode") != "parallel":
            return [("mode", f'task_modules needs mode = "parallel" (in-place widening changes the shared base, '
                             f'which every task uses) — set mode = "parallel" on this {op}')]
        return []
    if descriptor.task_module:
        return []
    return [("op", f"{op} changes the shared base, which task_modules keeps frozen and shared by every task — "
                   f"task-specific modules are {supported_text()}; use one of them, apply {op} in the first "
                   "stage (it then shapes the base), or set task_modules = false")]


def supported_text() -> str:
    """The ops whose additions are separate, switchable paths, as a message lists them (from the
    descriptors: ``task_module``, and ``parallel_mode``: only with mode = "parallel")."""
    parallel = [d.name for d in OPS.values() if d.task_module and d.parallel_mode]
    others = [d.name for d in OPS.values() if d.task_module and not d.parallel_mode]
    return ", ".join(([" / ".join(parallel) + ' with mode = "parallel"'] if parallel else []) + others)


def _op_settings(op_params) -> dict:
    """The op's settings as a dict with the schema's defaults filled in (where they validate)."""
    if isinstance(op_params, Mapping):
        data = dict(op_params)
    elif hasattr(op_params, "model_dump"):
        data = op_params.model_dump()
    else:
        raise TypeError(f"expected op parameters (OpParams, ExpandSpec or a dict), got {type(op_params).__name__}")
    descriptor = OPS.get(data.get("op"))
    schema = descriptor.schema if descriptor is not None else None
    if schema is not None:
        try:  # defaults that follow other settings (widen_ffn's mode follows its init) come out resolved
            return schema.model_validate(data).model_dump()
        except ValueError:
            pass
        for name, field in schema.model_fields.items():
            if name not in data and not field.is_required():
                data[name] = field.get_default(call_default_factory=True)
    return data


def _get(obj, key, default):
    return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)


# ---------------------------------------------------------------------------------------------
# what the plan points at


def environment_problems(raw: dict) -> list[tuple[str, str]]:
    """Task sources, tokenizers, the device and the trackers' packages of a raw plan dict (model sources: see
    ``model_source_problems``, called before the model's config is loaded)."""
    found = []
    tasks = raw.get("tasks")
    if isinstance(tasks, dict):
        for name, task in tasks.items():
            if isinstance(task, dict):
                found += task_source_problems(name, task)
    models = [(raw.get("model"), "model")]
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    models += [(v.get("model"), f"variants.{i}.model") for i, v in enumerate(variants) if isinstance(v, dict)]
    for model, where in models:
        if isinstance(model, dict):
            found += tokenizer_problems(model, where)
    if isinstance(raw.get("train"), dict):
        found += device_problems(raw["train"]) + tracker_problems(raw["train"])
    elif "train" not in raw:
        found += device_problems({})
    return found + speed_problems(raw)


def _shown_path(value: str) -> str:
    """A value as the message shows it: its repr, shortened. A path keeps its end (the file name
    tells which one) and up to 200 characters, since the user has to find it."""
    text = repr(value)
    if "/" in value or "\\" in value:
        return text if len(text) <= 200 else "'…" + text[-198:]
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def builtin_corpora() -> dict[str, tuple[str, ...]]:
    """Task kind -> the built-in corpora of that kind (engine.builtins: the one list)."""
    return {"text": builtins.TEXT_CORPORA, "generation": builtins.GENERATION_CORPORA}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        return False


def _is_pathlike(text: str) -> bool:
    """Written as a path (not as a hub name): starts with / . ~, holds a backslash, or more than
    one '/' (a hub id has at most one)."""
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def _local(text: str) -> Path | None:
    """The local path `text` names, if it is written as a path or exists."""
    try:
        path = Path(text).expanduser()
    except (RuntimeError, ValueError):  # ~user that does not exist
        return Path(text)
    if _is_pathlike(text) or _exists(path):
        return path
    return None


def _hub_name_problem(text: str, what: str, fix: str) -> str | None:
    if HUB_NAME.fullmatch(text) and ".." not in text and "--" not in text:
        return None
    return f"{_shown_path(text)} is neither an existing local path nor a {what} hub name (owner/name) — {fix}"


def task_source_problems(name: str, task: dict) -> list[tuple[str, str]]:
    """A task's `source`: a known builtin of the task's kind, an existing path, or a hub name."""
    source = task.get("source")
    if not isinstance(source, str):
        return []  # the schema says what it should be
    where = f"tasks.{name}.source"
    kinds = builtin_corpora()
    kind = task.get("kind")
    if kind not in kinds:
        kind = "generation" if source in GENERATION_SOURCES else "text"
    if source.startswith("builtin:"):
        corpus = source.removeprefix("builtin:")
        if corpus in kinds[kind]:
            return []
        every = ", ".join(f"builtin:{c} ({k})" for k, names in kinds.items() for c in names)
        if kind == "generation" and corpus in kinds["text"]:
            return [(where, f"built-in corpus {_shown_path(source)} has no prompt/continuation pairs — generation "
                            f"tasks use {', '.join('builtin:' + c for c in kinds['generation'])} or a dataset with "
                            "prompt_column and target_column (or set kind = \"text\")")]
        if kind == "text" and corpus in kinds["generation"]:
            return [(where, f"built-in corpus {_shown_path(source)} holds prompt/continuation pairs — set "
                            f"kind = \"generation\" or use one of: {every}")]
        return [(where, f"unknown built-in corpus {_shown_path(corpus)} — built-in corpora: {every}")]
    path = _local(source)
    fix = "give an existing path, a datasets hub name or builtin:pydoc"
    if path is None:
        problem = _hub_name_problem(source, "datasets", fix)
        return [(where, problem)] if problem else []
    if not _exists(path):
        return [(where, f"no such file or directory {_shown_path(source)} — {fix}")]
    try:
        if path.is_dir():
            if not any(not p.name.startswith(".") for p in path.iterdir()):
                return [(where, f"the directory {_shown_path(source)} is empty — put text or data files in it, "
                                f"or {fix}")]
        elif path.stat().st_size == 0:
            return [(where, f"the file {_shown_path(source)} is empty — point it at a file with text in it")]
    except OSError as e:
        return [(where, f"cannot read {_shown_path(source)} ({e.strerror or e.__class__.__name__}) — {fix}")]
    return []


def tokenizer_problems(model: dict, where: str) -> list[tuple[str, str]]:
    """`tokenizer`: "bytes", a local tokenizer directory with its files, or a hub name."""
    spec = model.get("tokenizer")
    if not isinstance(spec, str) or spec == "bytes":
        return []
    where = f"{where}.tokenizer"
    if spec == TOKENIZER_FROM_MODEL:
        source = model.get("source")
        if isinstance(source, str) and not (is_gguf_path(source) or model.get("gguf_file")):
            return [(where, 'tokenizer = "gguf" reads the tokenizer from the model\'s GGUF, but model.source is not '
                            'a GGUF — give a .gguf source (or gguf_file), or a tokenizer directory')]
        return []
    if is_gguf_path(spec):
        return _gguf_file_problems(spec, where, "tokenizer")
    fix = 'use "bytes", a local tokenizer directory or a hub name'
    path = _local(spec)
    if path is None:
        problem = _hub_name_problem(spec, "tokenizer", fix)
        return [(where, problem)] if problem else []
    if not _exists(path):
        return [(where, f"no such directory {_shown_path(spec)} — {fix}")]
    if not path.is_dir():
        return [(where, f"{_shown_path(spec)} is a file — give the directory that holds the tokenizer's files")]
    try:
        names = [p.name for p in path.iterdir() if p.is_file()]
    except OSError as e:
        return [(where, f"cannot read {_shown_path(spec)} ({e.strerror or e.__class__.__name__}) — {fix}")]
    if not any(n.startswith(TOKENIZER_FILE_PREFIXES) for n in names):
        return [(where, f"no tokenizer files (tokenizer.json, tokenizer_config.json, vocab…) in {_shown_path(spec)} — "
                        "save one there (tokenizer.save_pretrained) or " + fix)]
    return []


def model_source_problems(model: dict, where: str) -> list[tuple[str, str]]:
    """The shape of a non-builtin model `source` (a missing local directory, a string that cannot
    be a hub name), before anything tries to load its config."""
    source = model.get("source")
    if not isinstance(source, str) or source.startswith("builtin:"):
        return []
    where = f"{where}.source"
    if is_gguf_path(source):
        return _gguf_file_problems(source, where, "model")
    fix = "use builtin:tiny-neo, a local model directory, a .gguf file, or a hub name (needs the network)"
    path = _local(source)
    if path is None:
        problem = _hub_name_problem(source, "model", fix)
        return [(where, problem)] if problem else []
    if not _exists(path):
        return [(where, f"no such directory {_shown_path(source)} — {fix}")]
    if not path.is_dir():
        return [(where, f"{_shown_path(source)} is a file — give the model's directory (with config.json)")]
    return []


def _gguf_file_problems(name: str, where: str, what: str) -> list[tuple[str, str]]:
    """A `.gguf` path given as a model source or a tokenizer: a local file that exists."""
    path = Path(name).expanduser()
    if not path.is_file():
        return [(where, f"no such GGUF file {_shown_path(name)} — give the path of a .gguf file, or a directory "
                        f"with gguf_file naming the file in it")]
    if importlib.util.find_spec("gguf") is None:
        return [(where, f"reading the {what} from a GGUF needs the gguf package, which is not installed — "
                        f"{GGUF_INSTALL_HINT}")]
    return []


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    import torch  # only here: the one question a plan check asks torch

    return bool(torch.cuda.is_available())


def device_problems(train: dict) -> list[tuple[str, str]]:
    """`device` and `dtype` against this machine: float16 autocast needs CUDA."""
    device = train.get("device", "auto")
    dtype = train.get("dtype", "float32")
    if device not in ("auto", "cpu", "cuda") or dtype not in ("float32", "bfloat16", "float16"):
        return []  # the schema reports the value
    if device == "cpu" and dtype == "float16":
        return [("train.dtype", 'float16 needs a CUDA device and train.device = "cpu" — use "bfloat16" or '
                                '"float32" on CPU, or train.device = "cuda"')]
    if device == "cuda" and not cuda_available():
        return [("train.device", '"cuda" but CUDA is not available on this machine — use "auto" or "cpu"')]
    if device == "auto" and dtype == "float16" and not cuda_available():
        return [("train.dtype", 'float16 needs a CUDA device and this machine has none (train.device = "auto" '
                                'picks the CPU) — use "bfloat16" or "float32"')]
    return []


def speed_problems(raw: dict) -> list[tuple[str, str]]:
    """Speed settings the model cannot take: activation checkpointing needs transformer blocks
    (the built-in MLP has none)."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    source = raw.get("model", {}).get("source") if isinstance(raw.get("model"), dict) else None
    if train.get("checkpointing") is True and isinstance(source, str) and source.startswith("builtin:mlp"):
        return [("train.checkpointing", f"{source} has no blocks to checkpoint — set train.checkpointing = false")]
    return []


def tracker_problems(train: dict) -> list[tuple[str, str]]:
    """Each tracker in `report_to` whose package is not installed here."""
    names = train.get("report_to")
    names = [names] if isinstance(names, str) else names if isinstance(names, list) else []
    found = [package_problem(n) for n in dict.fromkeys(n for n in names if n in TRACKER_NAMES)]
    return [("train.report_to", problem) for problem in found if problem]


def missing_package(name: str) -> str | None:
    """The package tracker `name` needs when it is not installed (None when it is)."""
    package = TRACKER_PACKAGES.get(name)
    if package is None:
        return None
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken half-install
        found = False
    return None if found else package


def package_problem(name: str) -> str | None:
    """One line for the plan check when tracker `name` cannot be opened here."""
    package = missing_package(name)
    return f"'{name}' needs the {package} package — {INSTALL_HINT}" if package else None


# ---------------------------------------------------------------------------------------------
# against the model's config


def check_model_fields(raw: dict) -> list[Problem]:
    """The checks beyond the schema, on a raw plan dict so that they run even when other fields
    are wrong: what the plan points at (task sources, tokenizers, the device: ``environment_problems``)
    and what needs the model's config (loaded without weights). Each operator's layers are
    checked against the depth at that point of the plan (shared stages, then each variant's own,
    on the variant's model when it names one); seq_len against the model's positions; the
    sweep's mappings against the depth after the last stage."""
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
    problems += _router_loss_problems(raw, [own for own, _, _ in arms] or ([arch] if arch else []))
    problems += _residual_scaling_problems(raw, variants, arms, arch)
    sweep = raw.get("sweep")
    if isinstance(sweep, dict):
        for own, final, label in arms:
            problems += [p for p in _sweep_problems(sweep, own, final, label) if p not in problems]
    return problems


def _architecture(model_raw, where: str):
    """(ArchView from the config alone, problems) for a raw model table."""
    from engine.model.sources import ModelLoadError, load_architecture

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
    refusal = arch.base_family.refusal(spec["op"]) if hasattr(arch.base_family, "refusal") else None
    if refusal:  # the family's own (ArchFamily.refused_ops): said before any work is done, and alone
        return problems + [Problem(f"{where}.op", refusal)]
    model_problems = getattr(params, "model_problems", None)
    for field, message in (model_problems(arch.family) if model_problems else []):
        problems.append(Problem(f"{where}.{field}", message))
    return problems


ROUTER_LOSS_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef")
UPCYCLE_OP = "upcycle"   # the operator that gives a dense model experts (engine.ops.experts)


def _router_loss_problems(raw: dict, archs: list) -> list[Problem]:
    """A router loss weighed in (train.router_aux_loss_coef / router_z_loss_coef above 0) for
    models that never have routers: no arm's family has experts and no stage upcycles one."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    weighed = [k for k in ROUTER_LOSS_FIELDS if isinstance(train.get(k), (int, float))
               and not isinstance(train.get(k), bool) and 0 < train[k] <= MAX_ROUTER_LOSS_COEF]  # else: the schema
    if not weighed or not archs or any(a.family.moe is not None for a in archs):
        return []
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    lists = [raw.get("stages")] + [v.get("stages") for v in variants if isinstance(v, dict)]
    stages = [s for stages in lists if isinstance(stages, list) for s in stages if isinstance(s, dict)]
    if any(isinstance(spec, dict) and spec.get("op") == UPCYCLE_OP
           for stage in stages for _, ops in _stage_op_lists(stage) for spec in ops):
        return []
    names = " / ".join(dict.fromkeys(a.family.name for a in archs))
    return [Problem(f"train.{k}", f"weighs a router loss, but the {names} model has no experts and no stage "
                                  f"upcycles it (op = \"{UPCYCLE_OP}\") — remove train.{k}") for k in weighed]


EXPERT_OPS = ("upcycle", "add_experts")  # operators after which the blocks are a mixture of experts


def _residual_scaling_problems(raw: dict, variants: list, arms: list, arch) -> list[Problem]:
    """``train.residual_scaling = "depth_mup"`` (the plan's, or a variant's own ``train``) on models
    without one stack of plain residual blocks (``residual_scaling_refusal``), or with a stage that
    gives them experts. `arms`: (arch, depths, "variant v" or "") as check_model_fields builds them."""
    plan_train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    fix = 'set residual_scaling = "none"'
    for own, _, where in arms or ([(arch, None, "")] if arch else []):
        v = int(where.split()[-1]) if where else None
        variant = variants[v] if v is not None and isinstance(variants[v], dict) else {}
        train = {**plan_train, **(variant.get("train") if isinstance(variant.get("train"), dict) else {})}
        if train.get("residual_scaling") != "depth_mup":
            continue
        path = f"variants.{v}.train.residual_scaling" if "residual_scaling" in (variant.get("train") or {}) \
            else "train.residual_scaling"
        reason = residual_scaling_refusal(own.base_family)
        if reason:
            return [Problem(path, f'"depth_mup" needs plain residual blocks — {reason}; {fix}')]
        own_stages = variant.get("stages") if isinstance(variant.get("stages"), list) else []
        stages = [s for s in [*shared, *own_stages] if isinstance(s, dict)]
        ops = dict.fromkeys(spec.get("op") for stage in stages for _, specs in _stage_op_lists(stage)
                            for spec in specs if isinstance(spec, dict) and spec.get("op") in EXPERT_OPS)
        if ops:
            return [Problem(path, f'"depth_mup" needs plain residual blocks — {" and ".join(ops)} makes the '
                                  f"blocks a mixture of experts; {fix} or drop that stage")]
    return []


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
        in_label = f" in {label}" if label else ""
        return [Problem("sweep", f"the mapping sweep supports decoder-only transformers (GPT-Neo, GPT-2, GPT-NeoX, "
                                 f"Llama/Mistral/Qwen2) — {family.name} ({family.kind}){in_label} is not supported; "
                                 "remove [sweep]")]
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
                problems.append(Problem(where, f"has {len(mapping)} entries — every mapping needs {depth} "
                                        "(sweep.depth); fix the mapping or the depth"))
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
    families = sweep.get("families")
    if isinstance(families, list) and families:
        return _sweep_family_problems(families, num_layers, depth, after)
    # growing, over SWEEP_MAX_GENERATED, the families stand in for the non-decreasing set, if one fits
    fits = depth > num_layers and any(family_candidates(name, num_layers, depth) for name in FAMILY_NAMES)
    if sweep.get("limit") is None and total > SWEEP_MAX_GENERATED and not fits:
        return [Problem("sweep.limit", f"{total:,} mappings of {depth} layers over {num_layers}{after} and no "
                                       f"mapping family fits — too many to score all (at most {SWEEP_MAX_GENERATED}): "
                                       "set limit (e.g. 50) or give mappings")]
    return []


def _sweep_family_problems(families: list, num_layers: int, depth: int, after: str) -> list[Problem]:
    """A named family that gives no mapping of `depth` layers over `num_layers` (its parameters
    do not fit that shape); names and parameters are the schema's to report."""
    problems = []
    for i, text in enumerate(families):
        try:
            spec = parse_family_spec(text) if text != "all" else None
        except ValueError:
            continue
        if spec is not None and not family_candidates(spec, num_layers, depth):
            problems.append(Problem(f"sweep.families.{i}", f"{spec} gives no mapping of {depth} layers over "
                                    f"{num_layers}{after} — {spec.name} fits {spec.family.fits}; pick another "
                                    "family or depth"))
    return problems
