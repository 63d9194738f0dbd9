"""The shared-prefix cache: variants of a plan train their shared stages once.

A plan's variants share their first stages. The run that trains them publishes the checkpoint
taken at the end of the last shared stage, with the events those stages wrote, under
``<runs root>/.cache/prefix/<key>/`` where ``key = Plan.prefix_key(n)`` is a content hash of
everything the prefix depends on (model, tokenizer, tasks, training settings, seed, stages).
A later run with the same key copies that checkpoint in as its own and continues as a resume
would; its event stream starts with the cached events, marked ``"cached": true``.

Publishing is atomic (a temporary directory renamed into place), so a reader sees a whole entry
or none; two runs racing to publish the same key leave one (identical) entry.

The runs root may be shared, so an entry is untrusted input: only the checkpoint's own files are
copied (regular files, no links; a sharded checkpoint's ``dcp/`` folder too, its ``.metadata`` and
``__<r>_<n>.distcp`` files only), and they are loaded as any checkpoint is — JSON, safetensors and
checked DCP metadata, never unrestricted pickle (``engine.train.checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engine.runs.records import EventRecord
from engine.runs.rundir import dumps_json, mkdtemp_shared
from engine.train import checkpoint as ckpt

ENTRY_FILES = (ckpt.TENSORS_FILE, ckpt.STATE_FILE)   # and the weights: WEIGHTS_FILE, or DCP_DIR (sharded)


def entry_dir(runs_root: Path, key: str) -> Path:
    return Path(runs_root) / ".cache" / "prefix" / key


def lookup(runs_root: Path, key: str) -> Path | None:
    """The cached entry for `key`, if a whole one exists."""
    entry = entry_dir(runs_root, key)
    names = (*ENTRY_FILES, "meta.json", "events.jsonl")
    if all(_regular(entry / name) for name in names) and (
            _regular(entry / ckpt.WEIGHTS_FILE) or _regular(entry / ckpt.DCP_DIR / ckpt.DCP_METADATA)):
        return entry
    return None


def _regular(path: Path) -> bool:
    """A regular file, reached through no link."""
    return path.is_file() and not path.is_symlink() and not path.parent.is_symlink()


def _copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint's own files (and its tasks/*.safetensors), regular files only."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ENTRY_FILES:
        shutil.copyfile(source / name, target / name, follow_symlinks=False)
    if _regular(source / ckpt.WEIGHTS_FILE):
        shutil.copyfile(source / ckpt.WEIGHTS_FILE, target / ckpt.WEIGHTS_FILE, follow_symlinks=False)
    shards = source / ckpt.DCP_DIR
    if shards.is_dir() and not shards.is_symlink():
        (target / ckpt.DCP_DIR).mkdir()
        for item in shards.iterdir():
            if (item.name == ckpt.DCP_METADATA or ckpt.DCP_SHARD.fullmatch(item.name)) and _regular(item):
                shutil.copyfile(item, target / ckpt.DCP_DIR / item.name, follow_symlinks=False)
    tasks = source / ckpt.TASKS_DIR
    if tasks.is_dir() and not tasks.is_symlink():
        (target / ckpt.TASKS_DIR).mkdir()
        for item in tasks.iterdir():
            if item.suffix == ".safetensors" and item.is_file() and not item.is_symlink():
                shutil.copyfile(item, target / ckpt.TASKS_DIR / item.name, follow_symlinks=False)


def publish(runs_root: Path, key: str, checkpoint: Path, events: list[EventRecord], meta: dict) -> Path:
    """Store `checkpoint` (a checkpoints/latest directory) and the prefix's events under `key`."""
    final = entry_dir(runs_root, key)
    if lookup(runs_root, key):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_shared(prefix=f".{key}.", dir=final.parent)
    try:
        _copy_checkpoint(checkpoint, tmp)
        with open(tmp / "events.jsonl", "w") as f:
            for event in events:
                f.write(dumps_json(event.to_json()) + "\n")
        (tmp / "meta.json").write_text(dumps_json(meta, indent=1))
        os.rename(tmp, final)
    except OSError:
        if not lookup(runs_root, key):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def restore(entry: Path, checkpoint: Path) -> tuple[list[EventRecord], dict]:
    """Copy a cached entry in as `checkpoint` (checkpoints/latest); returns (events, meta)."""
    from engine.runs.events import read_all

    tmp = checkpoint.parent / f".cache-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_checkpoint(entry, tmp)
    shutil.rmtree(checkpoint, ignore_errors=True)
    tmp.rename(checkpoint)
    events = read_all(entry / "events.jsonl")  # the tolerant reader: a damaged line is skipped
    try:
        meta = json.loads((entry / "meta.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        meta = {}
    return events, meta if isinstance(meta, dict) else {}

