"""Checkpoints: save and load a run's weights and trainer state, without pickle.

A checkpoint is a directory (``checkpoints/latest/``):

- ``model.safetensors``  the weights (the model as grown so far)
- ``state.safetensors``  every other tensor: optimizer moments and steps, torch/CUDA RNG states
- ``trainer.json``       everything else, typed below (``TrainerState``): position in the plan,
                         history, optimizer hyper-parameters, schedule, plateau detector, task
                         modules, gradient scaler, the numpy RNG's scalars
- ``tasks/<task>.safetensors``  each task's own modules (``task_modules = true``)

Run directories may be shared, so a checkpoint is untrusted input: loading parses JSON and
safetensors only and never executes code. Anything that does not fit the shapes below is a
``CheckpointError`` (one line, naming the file), never a traceback. Writing is atomic: the
directory is built as ``.tmp-<pid>`` and swapped in, so a crash leaves the old checkpoint or the
new one; a failed write (a full disk) removes its partial directory before it reports.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import WidenError
from engine.names import child_path
from engine.runs.rundir import current_umask

FORMAT_VERSION = 2          # 1 was a pickled trainer.pt, which is never loaded
STATE_FILE = "trainer.json"
TENSORS_FILE = "state.safetensors"
WEIGHTS_FILE = "model.safetensors"
TASKS_DIR = "tasks"
LEGACY_FILE = "trainer.pt"
TEMP_PREFIXES = (".tmp-", ".old", ".cache-")   # what an interrupted save or restore leaves behind


class CheckpointError(WidenError, ValueError):
    """A checkpoint that cannot be read or written; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------
# the typed state


@dataclass
class Position:
    """Where the run is in its plan: the next step to train of `stage`."""

    stage: int = 0
    step: int = 0
    ops_applied: bool = False      # the stage's operators are applied (its step count runs)
    initial_done: bool = False     # the "initial" evaluation row exists
    growths: int = 0               # automatic growths of the current stage so far


@dataclass
class History:
    """What the run measured so far; results.json is built from it."""

    matrix: list[dict] = field(default_factory=list)          # R[row][task] -> {loss, ppl, bpb, ...}
    row_labels: list[str] = field(default_factory=list)
    expansions: list[dict] = field(default_factory=list)      # expand reports
    stage_params: list[dict] = field(default_factory=list)
    trained_at: dict[str, int] = field(default_factory=dict)  # task -> first stage that trained it
    tokens: int = 0
    flops: float = 0.0
    wall_s: float = 0.0
    growths: list[dict] = field(default_factory=list)         # {"stage", "growth", "step", ...}
    prefix_cached: bool = False

    def add_row(self, label: str, row: dict) -> None:
        """One row of the evaluation matrix: every task, after `label` ("initial", "after S")."""
        self.matrix.append(row)
        self.row_labels.append(label)

    def add_stage(self, index: int, label: str, task: str, total: int, trainable: int) -> None:
        self.trained_at.setdefault(task, index)
        self.stage_params.append({"stage": index, "name": label, "task": task, "total": total,
                                  "trainable": trainable, "trainable_share": trainable / total})


@dataclass
class TrainerState:
    """All a resume needs beyond the weights. Optimizer and scheduler are torch's own
    ``state_dict()`` forms; ``rng`` is None before training started."""

    position: Position = field(default_factory=Position)
    history: History = field(default_factory=History)
    optimizer: dict | None = None
    scheduler: dict | None = None
    plateau: dict | None = None
    task_modules: dict | None = None
    scaler: dict = field(default_factory=dict)
    rng: dict | None = None        # {"torch": ByteTensor, "numpy": (...), "cuda": [ByteTensor] | None}


def capture_rng() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------------------------------------
# state <-> (JSON, tensors)


def _split(state: TrainerState) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and the flat tensor dict that together hold `state`."""
    tensors: dict[str, torch.Tensor] = {}
    optimizer = None
    if state.optimizer is not None:
        per_param = {}
        for pid, entries in state.optimizer["state"].items():
            kept = {}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{pid}/{key}"] = value.detach().cpu().contiguous()
                    kept[key] = {"tensor": f"optimizer/{pid}/{key}"}
                else:
                    kept[key] = value
            per_param[str(pid)] = kept
        optimizer = {"state": per_param, "param_groups": state.optimizer["param_groups"]}
    rng = None
    if state.rng is not None:
        tensors["rng/torch"] = state.rng["torch"].cpu().contiguous()
        kind, keys, pos, has_gauss, gauss = state.rng["numpy"]
        tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        cuda = state.rng.get("cuda")
        for i, s in enumerate(cuda or []):
            tensors[f"rng/cuda/{i}"] = s.cpu().contiguous()
        rng = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
               "cuda": len(cuda) if cuda is not None else None}
    doc = {"format": FORMAT_VERSION, "position": asdict(state.position), "history": asdict(state.history),
           "optimizer": optimizer, "scheduler": state.scheduler, "plateau": state.plateau,
           "task_modules": state.task_modules, "scaler": state.scaler, "rng": rng}
    return doc, tensors


def _dataclass_from(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise CheckpointError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown))[:5])}")
    values = {}
    defaults = cls()
    for name, value in data.items():
        expected = type(getattr(defaults, name))
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if isinstance(value, bool) and expected is not bool:
            ok = False
        if not ok:
            raise CheckpointError(f"{where}.{name}: expected {expected.__name__}, got {type(value).__name__}")
        values[name] = float(value) if expected is float else value
    return cls(**values)


def _tensor(tensors: dict, key: Any, where: str) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise CheckpointError(f"{where}: tensor {str(key)[:60]!r} missing from {TENSORS_FILE}")
    return tensors[key]


def _join(doc: Any, tensors: dict[str, torch.Tensor]) -> TrainerState:
    """The TrainerState of a parsed trainer.json and its tensors, checked shape by shape."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{STATE_FILE}: expected an object")
    if doc.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{STATE_FILE}: format {str(doc.get('format'))[:20]!r}, this widen reads "
                              f"{FORMAT_VERSION}")
    state = TrainerState(position=_dataclass_from(Position, doc.get("position"), "position"),
                         history=_dataclass_from(History, doc.get("history"), "history"))
    position = state.position
    if min(position.stage, position.step, position.growths) < 0:
        raise CheckpointError(f"{STATE_FILE}: position has a negative count")
    for growth in state.history.growths:  # replayed to rebuild the model: their keys must be there
        if not (isinstance(growth, dict) and all(isinstance(growth.get(k), int) and not isinstance(growth.get(k), bool)
                                                 and growth[k] >= 0 for k in ("stage", "growth", "step"))):
            raise CheckpointError(f"{STATE_FILE}: history.growths has a malformed entry")
    for name in ("scheduler", "plateau", "task_modules"):
        value = doc.get(name)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{STATE_FILE}: {name} must be an object or null")
        setattr(state, name, value)
    scaler = doc.get("scaler") or {}
    if not isinstance(scaler, dict):
        raise CheckpointError(f"{STATE_FILE}: scaler must be an object")
    state.scaler = scaler
    optimizer = doc.get("optimizer")
    if optimizer is not None:
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
                or not isinstance(optimizer.get("param_groups"), list):
            raise CheckpointError(f"{STATE_FILE}: optimizer must hold 'state' and 'param_groups'")
        per_param = {}
        for pid, entries in optimizer["state"].items():
            if not str(pid).isdigit() or not isinstance(entries, dict):
                raise CheckpointError(f"{STATE_FILE}: optimizer.state has a bad entry {str(pid)[:20]!r}")
            per_param[int(pid)] = {
                key: _tensor(tensors, value.get("tensor"), f"optimizer.state.{pid}.{key}")
                if isinstance(value, dict) else value for key, value in entries.items()}
        for group in optimizer["param_groups"]:
            if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                    or not all(isinstance(p, int) and not isinstance(p, bool) for p in group["params"]):
                raise CheckpointError(f"{STATE_FILE}: optimizer.param_groups has a bad group")
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        state.optimizer = {"state": per_param, "param_groups": optimizer["param_groups"]}
    rng = doc.get("rng")
    if rng is not None:
        try:
            numpy_rng = rng["numpy"]
            keys = _tensor(tensors, "rng/numpy_keys", "rng.numpy").numpy().astype(np.uint32)
            cuda = None if rng.get("cuda") is None else [
                _tensor(tensors, f"rng/cuda/{i}", "rng.cuda") for i in range(int(rng["cuda"]))]
            state.rng = {"torch": _tensor(tensors, "rng/torch", "rng.torch").to(torch.uint8),
                         "numpy": (str(numpy_rng["kind"]), keys, int(numpy_rng["pos"]),
                                   int(numpy_rng["has_gauss"]), float(numpy_rng["gauss"])),
                         "cuda": cuda}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{STATE_FILE}: rng is malformed ({e.__class__.__name__})") from None
    return state


# ---------------------------------------------------------------------------------------------
# files


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


class WholeWeights:
    """A state dict of whole tensors (an FSDP run's, gathered) in the one shape safetensors'
    ``save_model`` reads, so tied entries are written once, as for a plain model."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def parameters(self):
        return iter(self.tensors.values())

    def buffers(self):
        return iter(())


def save(directory: Path, model: torch.nn.Module | WholeWeights, state: TrainerState,
         task_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint to `directory` atomically; on any error the partial copy is removed
    and a CheckpointError says why (the previous checkpoint, if any, stays)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    parent = directory.parent
    tmp = parent / f".tmp-{os.getpid()}"
    old = parent / ".old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / WEIGHTS_FILE))
        doc, tensors = _split(state)
        save_file(tensors, str(tmp / TENSORS_FILE))
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(doc, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        if task_tensors:
            (tmp / TASKS_DIR).mkdir()
            for task, tensors_of_task in task_tensors.items():
                if tensors_of_task:
                    save_file(tensors_of_task, str(child_path(tmp / TASKS_DIR, task, ".safetensors")))
        _follow_umask(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            old.rename(directory)  # the swap was interrupted: put the previous checkpoint back
        if not isinstance(e, (OSError, RuntimeError, SafetensorError)):  # safetensors: its own I/O errors
            raise
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0][:200]
        raise CheckpointError(f"checkpoint not written to {directory}: {reason}"
                              + (" — free disk space, then `widen resume`" if _disk_full(e) else "")) from e
    return directory


def _follow_umask(directory: Path) -> None:
    """safetensors writes its files 0600; a shared runs root needs the modes the umask gives."""
    umask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _disk_full(error: BaseException) -> bool:
    import errno

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def exists(directory: Path) -> bool:
    return (Path(directory) / WEIGHTS_FILE).exists()


def load_state(directory: Path, stages: int | None = None) -> TrainerState | None:
    """The trainer state of the checkpoint in `directory` (None when it has only weights, or none),
    at most at stage `stages` (the plan's count) if given. Never unpickles: a pickled trainer.pt
    of older widen versions is refused, not loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.exists():
        if (directory / LEGACY_FILE).exists():
            raise CheckpointError(f"{directory / LEGACY_FILE}: a pickled checkpoint from an older widen — "
                                  f"it is not loaded (unpickling can run code); start the run again")
        return None
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e.__class__.__name__}) — the checkpoint is damaged; "
                              f"start the run again") from None
    try:
        tensors = load_file(str(directory / TENSORS_FILE)) if (directory / TENSORS_FILE).exists() else {}
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{directory / TENSORS_FILE}: unreadable ({str(e).splitlines()[0][:120]}) — "
                              f"the checkpoint is damaged; start the run again") from None
    try:
        state = _join(doc, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e} — the checkpoint is damaged; start the run again") from None
    if stages is not None and state.position.stage > stages:
        raise CheckpointError(f"checkpoint: stage {state.position.stage} is beyond the plan's {stages} stages — "
                              f"the run directory is damaged")
    return state


def restore_training(saved: TrainerState, optimizer, scheduler, scaler, lr: float, load_optimizer_state) -> None:
    """Continue training where `saved` stopped: the optimizer moments (through
    `load_optimizer_state`, which cuts them to an FSDP run's shards), the schedule at `lr` (a
    resume may lower it), the loss scaler and the random generators."""
    from engine.train.optim import set_learning_rate

    try:
        load_optimizer_state(optimizer, saved.optimizer)
        scheduler.load_state_dict(saved.scheduler or {})
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"checkpoint: the optimizer state does not fit the rebuilt "
                              f"model ({str(e).splitlines()[0][:120]})") from None
    set_learning_rate(optimizer, scheduler, lr)
    if saved.scaler:
        scaler.load_state_dict(saved.scaler)
    if saved.rng is not None:
        restore_rng(saved.rng)


def load_weights(model: torch.nn.Module, directory: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` (shapes must fit: the expansions were replayed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(directory) / WEIGHTS_FILE
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit the rebuilt model or is damaged "
                              f"({str(e).splitlines()[0][:160]})") from None


def finite_weights(model: torch.nn.Module | WholeWeights) -> bool:
    """Whether every parameter and buffer is finite (a diverged model is never saved)."""
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in list(model.parameters()) + list(model.buffers())
                   if t.is_floating_point())


def remove_leftovers(checkpoints: Path) -> list[str]:
    """Delete what interrupted saves and restores left (``.tmp-<pid>``, ``.old``, ``.cache-<pid>``).
    Call only while holding the run's lock (no other worker owns them)."""
    removed = []
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return removed
    for entry in checkpoints.iterdir():
        if entry.name.startswith(TEMP_PREFIXES):
            if entry.name == ".old" and not (checkpoints / "latest").exists():
                entry.rename(checkpoints / "latest")  # a swap killed half-way: the old one is the latest
                continue
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed
