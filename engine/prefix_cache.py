"""The shared-prefix cache: variants of a plan train their shared stages once.

A plan's variants share their first stages. The run that trains them publishes the checkpoint
taken at the end of the last shared stage, with the events those stages wrote, under
``<runs root>/.cache/prefix/<key>/`` where ``key = Plan.prefix_key(n)`` is a content hash of
everything the prefix depends on (model, tokenizer, tasks, training settings, seed, stages).
A later run with the same key copies that checkpoint in as its own and continues as a resume
would; its event stream starts with the cached events, marked ``"cached": true``.

Publishing is atomic (a temporary directory renamed into place), so a reader sees a whole entry
or none; two runs racing to publish the same key leave one (identical) entry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

ENTRY_FILES = ("model.safetensors", "trainer.pt")


def entry_dir(runs_root: Path, key: str) -> Path:
    return Path(runs_root) / ".cache" / "prefix" / key


def lookup(runs_root: Path, key: str) -> Path | None:
    """The cached entry for `key`, if a whole one exists."""
    entry = entry_dir(runs_root, key)
    if all((entry / name).exists() for name in ENTRY_FILES) and (entry / "meta.json").exists():
        return entry
    return None


def publish(runs_root: Path, key: str, checkpoint: Path, events: list[dict], meta: dict) -> Path:
    """Store `checkpoint` (a checkpoints/latest directory) and the prefix's events under `key`."""
    final = entry_dir(runs_root, key)
    if lookup(runs_root, key):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        for name in ENTRY_FILES:
            shutil.copy2(checkpoint / name, tmp / name)
        for extra in checkpoint.iterdir():  # per-task module files, if any
            if extra.is_dir():
                shutil.copytree(extra, tmp / extra.name)
        with open(tmp / "events.jsonl", "w") as f:
            for event in events:
                f.write(json.dumps(event) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, final)
    except OSError:
        if not lookup(runs_root, key):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def restore(entry: Path, checkpoint: Path) -> tuple[list[dict], dict]:
    """Copy a cached entry in as `checkpoint` (checkpoints/latest); returns (events, meta)."""
    tmp = checkpoint.parent / f".cache-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(entry, tmp, ignore=shutil.ignore_patterns("events.jsonl", "meta.json"))
    shutil.rmtree(checkpoint, ignore_errors=True)
    tmp.rename(checkpoint)
    events = [json.loads(line) for line in (entry / "events.jsonl").read_text().splitlines() if line.strip()]
    return events, json.loads((entry / "meta.json").read_text())
