"""Cheap checks of what a plan points at: task sources, tokenizers, the model source's shape and
the device, at `plan check` time — existence and configuration, never data.

Each returns ``(field, message — fix)`` pairs; engine.plan turns them into Problems. Nothing here
reads a corpus, loads a tokenizer or touches the network: a hub name that is not a local path
is checked by its shape only. torch is imported only to answer "is CUDA available?", and only
when the plan's device or dtype asks it (``device = "cuda"``, or ``dtype = "float16"`` with
``device = "auto"``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from engine import builtins

# Hub repository ids: "name" or "owner/name"; letters, digits, '-', '_', '.', at most 96 each.
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
# Files a local tokenizer directory holds at least one of (engine.train.data digests the same prefixes).
TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece")
SHOWN = 60


def _shown(value: str) -> str:
    """A value as the message shows it: its repr, shortened. A path keeps its end (the file name
    tells which one) and up to 200 characters, since the user has to find it."""
    text = repr(value)
    if "/" in value or "\\" in value:
        return text if len(text) <= 200 else "'…" + text[-198:]
    return text if len(text) <= SHOWN else text[:SHOWN - 1] + "…"


def builtin_corpora() -> dict[str, tuple[str, ...]]:
    """Task kind -> the built-in corpora of that kind (engine.builtins: the one list)."""
    return {"text": builtins.TEXT_CORPORA, "generation": builtins.GENERATION_CORPORA}


def builtin_task_sources() -> tuple[str, ...]:
    """Every `builtin:` task source, text corpora first."""
    return tuple(f"builtin:{name}" for names in builtin_corpora().values() for name in names)


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
    return f"{_shown(text)} is neither an existing local path nor a {what} hub name (owner/name) — {fix}"


def task_source_problems(name: str, task: dict) -> list[tuple[str, str]]:
    """A task's `source`: a known builtin of the task's kind, an existing path, or a hub name."""
    source = task.get("source")
    if not isinstance(source, str):
        return []  # the schema says what it should be
    where = f"tasks.{name}.source"
    kinds = builtin_corpora()
    kind = task.get("kind")
    if kind not in kinds:
        from engine.plan import GENERATION_SOURCES

        kind = "generation" if source in GENERATION_SOURCES else "text"
    if source.startswith("builtin:"):
        corpus = source.removeprefix("builtin:")
        if corpus in kinds[kind]:
            return []
        every = ", ".join(f"builtin:{c} ({k})" for k, names in kinds.items() for c in names)
        if kind == "generation" and corpus in kinds["text"]:
            return [(where, f"built-in corpus {_shown(source)} has no prompt/continuation pairs — generation tasks "
                            f"use {', '.join('builtin:' + c for c in kinds['generation'])} or a dataset with "
                            "prompt_column and target_column (or set kind = \"text\")")]
        if kind == "text" and corpus in kinds["generation"]:
            return [(where, f"built-in corpus {_shown(source)} holds prompt/continuation pairs — set "
                            f"kind = \"generation\" or use one of: {every}")]
        return [(where, f"unknown built-in corpus {_shown(corpus)} — built-in corpora: {every}")]
    path = _local(source)
    fix = "give an existing path, a datasets hub name or builtin:pydoc"
    if path is None:
        problem = _hub_name_problem(source, "datasets", fix)
        return [(where, problem)] if problem else []
    if not _exists(path):
        return [(where, f"no such file or directory {_shown(source)} — {fix}")]
    try:
        if path.is_dir():
            if not any(not p.name.startswith(".") for p in path.iterdir()):
                return [(where, f"the directory {_shown(source)} is empty — put text or data files in it, or {fix}")]
        elif path.stat().st_size == 0:
            return [(where, f"the file {_shown(source)} is empty — point it at a file with text in it")]
    except OSError as e:
        return [(where, f"cannot read {_shown(source)} ({e.strerror or e.__class__.__name__}) — {fix}")]
    return []


def tokenizer_problems(model: dict, where: str) -> list[tuple[str, str]]:
    """`tokenizer`: "bytes", a local tokenizer directory with its files, or a hub name."""
    spec = model.get("tokenizer")
    if not isinstance(spec, str) or spec == "bytes":
        return []
    where = f"{where}.tokenizer"
    fix = 'use "bytes", a local tokenizer directory or a hub name'
    path = _local(spec)
    if path is None:
        problem = _hub_name_problem(spec, "tokenizer", fix)
        return [(where, problem)] if problem else []
    if not _exists(path):
        return [(where, f"no such directory {_shown(spec)} — {fix}")]
    if not path.is_dir():
        return [(where, f"{_shown(spec)} is a file — give the directory that holds the tokenizer's files")]
    try:
        names = [p.name for p in path.iterdir() if p.is_file()]
    except OSError as e:
        return [(where, f"cannot read {_shown(spec)} ({e.strerror or e.__class__.__name__}) — {fix}")]
    if not any(n.startswith(TOKENIZER_FILE_PREFIXES) for n in names):
        return [(where, f"no tokenizer files (tokenizer.json, tokenizer_config.json, vocab…) in {_shown(spec)} — "
                        "save one there (tokenizer.save_pretrained) or " + fix)]
    return []


def model_source_problems(model: dict, where: str) -> list[tuple[str, str]]:
    """The shape of a non-builtin model `source` (a missing local directory, a string that cannot
    be a hub name), before anything tries to load its config."""
    source = model.get("source")
    if not isinstance(source, str) or source.startswith("builtin:"):
        return []
    where = f"{where}.source"
    fix = "use builtin:tiny-neo, a local model directory, or a hub name (needs the network)"
    path = _local(source)
    if path is None:
        problem = _hub_name_problem(source, "model", fix)
        return [(where, problem)] if problem else []
    if not _exists(path):
        return [(where, f"no such directory {_shown(source)} — {fix}")]
    if not path.is_dir():
        return [(where, f"{_shown(source)} is a file — give the model's directory (with config.json)")]
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
    """Each tracker in `report_to` whose package is not installed here (engine.runs.trackers)."""
    from engine.runs.trackers import TRACKER_NAMES, package_problem

    names = train.get("report_to")
    names = [names] if isinstance(names, str) else names if isinstance(names, list) else []
    found = [package_problem(n) for n in dict.fromkeys(n for n in names if n in TRACKER_NAMES)]
    return [("train.report_to", problem) for problem in found if problem]


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
