"""Checkpoints: save and load a run's weights and trainer state, without pickle.

A checkpoint is a directory (``checkpoints/latest/``) in one of two layouts.

Whole (one process, DDP, or an FSDP run whose model is whole at the moment), written by rank 0:

- ``model.safetensors``  the weights (the model as grown so far)
- ``state.safetensors``  every other tensor: optimizer moments and steps, torch/CUDA RNG states
- ``trainer.json``       everything else, typed below (``TrainerState``): position in the plan,
                         history, optimizer hyper-parameters, schedule, plateau detector, task
                         modules, gradient scaler, the numpy RNG's scalars
- ``tasks/<task>.safetensors``  each task's own modules (``task_modules = true``)

Sharded (an FSDP2 run, ``save_sharded``: a collective, no rank ever holds the whole state):

- ``dcp/``               a torch.distributed.checkpoint (DCP): ``__<rank>_0.distcp``, each rank's
                         own shards of the weights (``model.<fqn>``) and of the optimizer's tensors
                         (``optimizer.state.<fqn>.<key>``), and ``.metadata`` (which rank holds what)
- ``state.safetensors``  the RNG states only
- ``trainer.json``       as above; the optimizer's param groups and non-tensor per-parameter state
                         are here, keyed by parameter FQN (``ShardedMoments``)
- ``tasks/``             as above (task modules are small: gathered whole)

Either layout loads into either kind of model (``load_weights``, ``load_sharded_moments``): a
whole one (one process, DDP ranks, export — no process group needed) or a sharded one (each rank
reads its own slices), so a resume may change the number of processes and the strategy.

Run directories may be shared, so a checkpoint is untrusted input: loading never executes code.
JSON and safetensors are parsed; for DCP, ``.metadata`` is a pickle, read by ``_MetadataUnpickler``:
it resolves only DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts (through torch's own
``_get_layout``), the memory-format enum, ``OrderedDict`` and ``PosixPath`` — any other global is
refused, so nothing outside that list can be called — and it sets attributes (BUILD) only of
instances of those dataclasses, never of an allowed class or function (torch's global state).
The result is then checked entry by entry:
every entry must be a tensor (a ``BytesStorageMetadata`` entry, which DCP would read with
``torch.load(weights_only=False)``, is refused: we never save one), every storage a
``__<r>_<n>.distcp`` regular file inside ``dcp/``, with no stream transforms. The shards' tensors
are then read by DCP with ``torch.load(weights_only=True)``: torch's restricted unpickler, which
builds tensors and nothing else. Anything that does not fit is a ``CheckpointError`` (one line,
naming the file), never a traceback.

Writing is atomic. Whole: the directory is built as ``.tmp-<pid>`` and swapped in, so a crash
leaves the old checkpoint or the new one; a failed write (a full disk) removes its partial
directory before it reports. Sharded: rank 0 clears ``.tmp-sharded`` (the same name on every
rank), every rank writes its shards into ``.tmp-sharded/dcp/`` (fsynced); ``dcp.save`` returns on
a rank only after the coordinator (rank 0) gathered every rank's write results and wrote
``.metadata``. Then rank 0 writes trainer.json and the rest and swaps the directory in as above.
A kill of any rank before that swap leaves the previous checkpoint as ``latest``, and
``remove_leftovers`` deletes the partial one at the next start.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil
import warnings
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
DCP_DIR = "dcp"                 # a sharded checkpoint's torch.distributed.checkpoint
DCP_METADATA = ".metadata"
SHARDED_TEMP = ".tmp-sharded"   # where every rank of a sharded save writes (one name on all ranks)
MODEL_PREFIX, MOMENTS_PREFIX = "model.", "optimizer.state."
DCP_SHARD = re.compile(r"__\d+_\d+\.distcp")
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


@dataclass(frozen=True)
class DcpRef:
    """A tensor of a loaded ``ShardedMoments``: stored in the checkpoint's dcp/ under `key`."""

    key: str


@dataclass
class ShardedMoments:
    """An optimizer state whose tensors live in a sharded checkpoint's DCP shards: torch's
    ``state_dict()`` form with the per-parameter state keyed by the parameter's FQN (its name in
    ``module.named_parameters()``: a tied parameter's first name) instead of its position.
    ``state[fqn][key]`` is a JSON value or a tensor — when saving, the tensor itself (a DTensor
    of this rank's shard); when loaded, a ``DcpRef`` to ``directory``, read by
    ``load_sharded_moments`` into whatever optimizer the resume has (sharded or whole).
    ``param_groups`` are torch's, their ``params`` positions in the optimizer's order."""

    state: dict[str, dict[str, Any]]
    param_groups: list[dict]
    directory: Path | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The DCP entries of the tensors being saved: ``optimizer.state.<fqn>.<key>``."""
        return {moment_key(fqn, key): value for fqn, entries in self.state.items()
                for key, value in entries.items() if isinstance(value, torch.Tensor)}


def moment_key(fqn: str, key: str) -> str:
    return f"{MOMENTS_PREFIX}{fqn}.{key}"


@dataclass
class TrainerState:
    """All a resume needs beyond the weights. Optimizer and scheduler are torch's own
    ``state_dict()`` forms (the optimizer's ``ShardedMoments`` in a sharded checkpoint, whose
    ``directory`` says where its moments are); ``rng`` is None before training started."""

    position: Position = field(default_factory=Position)
    history: History = field(default_factory=History)
    optimizer: dict | ShardedMoments | None = None
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
    if isinstance(state.optimizer, ShardedMoments):  # its tensors go to the DCP shards
        optimizer = {"dcp": True, "param_groups": state.optimizer.param_groups, "state": {
            fqn: {key: {"dcp": moment_key(fqn, key)} if isinstance(value, torch.Tensor) else value
                  for key, value in entries.items()} for fqn, entries in state.optimizer.state.items()}}
    elif state.optimizer is not None:
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


_FQN = re.compile(r"[^\x00-\x1f]{1,1000}")  # a parameter name: any printable text


def _dcp_ref(value: dict, fqn: str, key: str) -> DcpRef:
    if value.get("dcp") != moment_key(fqn, key):
        raise CheckpointError(f"{STATE_FILE}: optimizer.state.{fqn[:60]}.{str(key)[:20]} names a tensor it "
                              f"does not own")
    return DcpRef(value["dcp"])


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
        sharded = optimizer.get("dcp") is True
        per_param: dict = {}
        for pid, entries in optimizer["state"].items():
            if not isinstance(entries, dict) or (not sharded and not str(pid).isdigit()) \
                    or (sharded and not _FQN.fullmatch(pid)):
                raise CheckpointError(f"{STATE_FILE}: optimizer.state has a bad entry {str(pid)[:20]!r}")
            if sharded:
                per_param[pid] = {key: _dcp_ref(value, pid, key) if isinstance(value, dict) else value
                                  for key, value in entries.items()}
            else:
                per_param[int(pid)] = {
                    key: _tensor(tensors, value.get("tensor"), f"optimizer.state.{pid}.{key}")
                    if isinstance(value, dict) else value for key, value in entries.items()}
        for group in optimizer["param_groups"]:
            if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                    or not all(isinstance(p, int) and not isinstance(p, bool) for p in group["params"]):
                raise CheckpointError(f"{STATE_FILE}: optimizer.param_groups has a bad group")
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        state.optimizer = ShardedMoments(per_param, optimizer["param_groups"]) if sharded else \
            {"state": per_param, "param_groups": optimizer["param_groups"]}
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


class ShardedWeights:
    """An FSDP run's weights as its ranks hold them: ``get_model_state_dict`` of the sharded
    model (FQN-keyed DTensors, this rank's shards; a tied entry under each of its names)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def local(self) -> list[torch.Tensor]:
        return [t.to_local() if hasattr(t, "to_local") else t for t in self.tensors.values()]


def sharded_weights(module: torch.nn.Module) -> ShardedWeights:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return ShardedWeights(get_model_state_dict(module))


def sharded_moments(module: torch.nn.Module, optimizer) -> ShardedMoments:
    """`optimizer`'s state as it is on this rank (moments: DTensor shards), keyed by FQN. Not
    ``get_optimizer_state_dict``: on an optimizer with no state yet (a cancel before a stage's
    first step) it would take a zero-gradient step first, so the saved state would say step 1."""
    names = {id(p): name for name, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = optimizer.state_dict()
    return ShardedMoments({names[id(params[pid])]: dict(entries) for pid, entries in saved["state"].items()},
                          saved["param_groups"])


def save(directory: Path, model: torch.nn.Module | WholeWeights, state: TrainerState,
         task_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a whole checkpoint to `directory` atomically; on any error the partial copy is
    removed and a CheckpointError says why (the previous checkpoint, if any, stays)."""
    from safetensors.torch import save_model

    directory = Path(directory)
    tmp = directory.parent / f".tmp-{os.getpid()}"

    def build():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / WEIGHTS_FILE))
        _write_state(tmp, state, task_tensors)

    return _build_and_swap(directory, tmp, build)


def save_sharded(directory: Path, world, weights: ShardedWeights, state: TrainerState,
                 task_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a sharded checkpoint to `directory` (a collective: every rank calls it, with its own
    `weights` and ``state.optimizer`` shards; rank 0's `state` and `task_tensors` are written).
    Each rank writes only its shards, into ``.tmp-sharded/dcp/``; once ``dcp.save`` has returned
    (every rank's shards synced, ``.metadata`` written by rank 0) rank 0 adds the rest and swaps
    it in. Any failure is a CheckpointError on every rank (the previous checkpoint stays)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    tmp = directory.parent / SHARDED_TEMP
    failure: BaseException | None = None
    if world.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial one of an earlier failed save
            (tmp / DCP_DIR).mkdir(parents=True)
        except OSError as e:
            failure = e
    if not world.broadcast_flag(failure is None):  # and no rank writes before rank 0 cleared it
        raise _write_error(directory, failure) if failure else \
            CheckpointError(f"checkpoint not written to {directory}: rank 0 could not create {tmp}")
    entries = {MODEL_PREFIX + name: value for name, value in weights.tensors.items()}
    if isinstance(state.optimizer, ShardedMoments):
        entries.update(state.optimizer.tensors())
    try:
        dcp.save(entries, storage_writer=dcp.FileSystemWriter(tmp / DCP_DIR, single_file_per_rank=True,
                                                               sync_files=True))
    except CheckpointException as e:  # a rank's write failed: DCP raises it on every rank
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(directory, _first_failure(e)) from None
    # Every rank's shards and .metadata are on disk: the coordinator wrote .metadata after it
    # gathered all ranks' write results, and dcp.save returns only after that step.
    if world.is_main:
        try:
            _build_and_swap(directory, tmp, lambda: _write_state(tmp, state, task_tensors))
        except Exception as e:
            failure = e
    if not world.broadcast_flag(failure is None):  # every rank learns whether it was written
        raise failure if failure else CheckpointError(f"checkpoint not written to {directory}: rank 0 "
                                                      f"could not write it (its stderr.log says why)")
    return directory


def _write_state(tmp: Path, state: TrainerState, task_tensors: dict | None) -> None:
    """trainer.json (fsynced), state.safetensors and tasks/ into the directory being built."""
    from safetensors.torch import save_file

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


def _build_and_swap(directory: Path, tmp: Path, build) -> Path:
    """Run `build` (which fills `tmp`), then swap `tmp` in as `directory`; on any error the
    partial copy is removed and a CheckpointError says why (the previous checkpoint stays)."""
    from safetensors import SafetensorError

    old = directory.parent / ".old"
    try:
        build()
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
        raise _write_error(directory, e) from e
    return directory


def _write_error(directory: Path, e: BaseException) -> CheckpointError:
    reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else (str(e).splitlines() or [""])[0][:200]
    return CheckpointError(f"checkpoint not written to {directory}: {reason}"
                           + (" — free disk space, then `widen resume`" if _disk_full(e) else ""))


def _first_failure(error) -> BaseException:
    """The first rank's exception inside a DCP CheckpointException."""
    for failure in getattr(error, "failures", {}).values():
        if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
            return failure[0]
    return error


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
    """Whether `directory` holds a checkpoint's weights: whole, or sharded (DCP)."""
    directory = Path(directory)
    return (directory / WEIGHTS_FILE).exists() or (directory / DCP_DIR / DCP_METADATA).exists()


def is_sharded_checkpoint(directory: Path) -> bool:
    directory = Path(directory)
    return not (directory / WEIGHTS_FILE).exists() and (directory / DCP_DIR / DCP_METADATA).exists()


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
    if isinstance(state.optimizer, ShardedMoments):
        state.optimizer.directory = directory / DCP_DIR
    return state


def restore_training(saved: TrainerState, optimizer, scheduler, scaler, lr: float, load_optimizer_state) -> None:
    """Continue training where `saved` stopped: the optimizer moments (through
    `load_optimizer_state`, which cuts them to an FSDP run's shards or reads them from a sharded
    checkpoint's DCP shards), the schedule at `lr` (a resume may lower it), the loss scaler and
    the random generators."""
    from engine.train.optim import set_learning_rate

    try:
        load_optimizer_state(optimizer, saved.optimizer)
        scheduler.load_state_dict(saved.scheduler or {})
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"checkpoint: the optimizer state does not fit the rebuilt "
                              f"model ({str(e).splitlines()[0][:120]})") from None
    set_learning_rate(optimizer, scheduler, lr)
    if saved.scaler:
        scaler.load_state_dict(saved.scaler)
    if saved.rng is not None:
        restore_rng(saved.rng)


def load_weights(model: torch.nn.Module, directory: Path, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's weights into `model` (shapes must fit: the expansions were replayed),
    whichever the layouts: model.safetensors or dcp/, into a whole model or a sharded one (FSDP2:
    each rank reads its own slices; DCP into a sharded model is a collective). No process group
    is needed for a whole model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if is_sharded_checkpoint(directory):
        _load_dcp_weights(model, directory / DCP_DIR)
        return
    try:
        if _has_shards(model):
            _load_whole_into_shards(model, path)
        else:
            load_model(model, str(path), strict=True, device=str(device))
    except CheckpointError:
        raise
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit the rebuilt model or is damaged "
                              f"({str(e).splitlines()[0][:160]})") from None


def _has_shards(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _load_whole_into_shards(model: torch.nn.Module, path: Path) -> None:
    """model.safetensors into a sharded model, tensor by tensor: each rank reads a tensor whole
    and keeps its own slice (no collective; a tied entry may be stored once, as save_model does)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    entries = model.state_dict(keep_vars=True)
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        source: dict[int, str] = {}
        for name, value in entries.items():
            if name in stored:
                source.setdefault(id(value), name)
        missing = [name for name, value in entries.items() if id(value) not in source]
        unexpected = sorted(stored - set(entries))
        if missing or unexpected:
            raise CheckpointError(f"{path}: does not fit the rebuilt model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, value in entries.items():
                whole = f.get_tensor(name if name in stored else source[id(value)])
                if tuple(whole.shape) != tuple(value.shape):
                    raise CheckpointError(f"{path}: {name} is {list(whole.shape)}, the rebuilt model's "
                                          f"{list(value.shape)} — it does not fit")
                if isinstance(value, DTensor):
                    whole = distribute_tensor(whole.to(value.device, value.dtype), value.device_mesh,
                                              value.placements, src_data_rank=None)
                value.copy_(whole)


def _load_dcp_weights(model: torch.nn.Module, directory: Path) -> None:
    """A sharded checkpoint's weights into `model`: DCP reads into ``get_model_state_dict``'s
    tensors (a sharded model's own slices, or whole ones), then ``set_model_state_dict``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    values = get_model_state_dict(model)
    read_dcp({MODEL_PREFIX + name: value for name, value in values.items()}, directory, exact=MODEL_PREFIX)
    try:
        set_model_state_dict(model, values)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: does not fit the rebuilt model "
                              f"({str(e).splitlines()[0][:160]})") from None


def load_sharded_moments(module: torch.nn.Module, optimizer, moments: ShardedMoments) -> None:
    """A sharded checkpoint's optimizer state into `optimizer` over `module`, whether sharded or
    whole (any number of processes, either strategy): each tensor is read from DCP into a tensor
    laid out as its parameter is (a DTensor: this rank's slices, a collective; else whole), the
    JSON rest as saved. Parameters are matched by FQN; the groups' hyper-parameters by position."""
    directory = moments.directory
    if directory is None:
        raise CheckpointError("checkpoint: the optimizer state's DCP shards are not located")
    groups = moments.param_groups
    if len(groups) != len(optimizer.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(groups, optimizer.param_groups)):
        raise CheckpointError(f"{directory}: the optimizer state does not fit the rebuilt model "
                              f"(its parameter groups differ)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    position = {id(p): i for i, p in enumerate(params)}
    by_name = {name: p for name, p in module.named_parameters() if id(p) in position}
    metadata = safe_reader(directory).read_metadata().state_dict_metadata
    targets: dict[str, torch.Tensor] = {}
    for fqn, entries in moments.state.items():
        param = by_name.get(fqn)
        if param is None:
            raise CheckpointError(f"{directory}: optimizer moments of {fqn[:80]!r}, which the rebuilt model "
                                  f"does not train — it does not fit")
        for value in entries.values():
            if isinstance(value, DcpRef):
                entry = metadata.get(value.key)
                if entry is None:
                    raise CheckpointError(f"{directory}: holds no {value.key[:100]} — the checkpoint is "
                                          f"damaged; start the run again")
                dtype, like_param = entry.properties.dtype, param.dim() > 0 and tuple(entry.size) == tuple(param.shape)
                targets[value.key] = torch.empty_like(param, dtype=dtype, requires_grad=False) if like_param else \
                    torch.empty(tuple(entry.size), dtype=dtype)  # a step count: plain, whole on every rank
    read_dcp(targets, directory)
    state = {position[id(by_name[fqn])]: {key: targets[value.key] if isinstance(value, DcpRef) else value
                                         for key, value in entries.items()}
             for fqn, entries in moments.state.items()}
    optimizer.load_state_dict({"state": state, "param_groups": [
        {**saved, "params": [position[id(p)] for p in group["params"]]}
        for saved, group in zip(groups, optimizer.param_groups)]})


# ---------------------------------------------------------------------------------------------
# DCP, read without unrestricted pickle


class _Refused(pickle.UnpicklingError):
    pass


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
}


def _allowed_global(module: str, name: str):
    """The object an allowed global of DCP's .metadata names, else None. Resolved here by exact
    name, never imported by name: DCP's metadata dataclasses and enum, torch.Size, dtypes and
    memory formats (plain values), torch's layout reconstructor, OrderedDict, PosixPath."""
    import collections
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata
    import torch.serialization

    if name in _METADATA_CLASSES.get(module, ()):
        return getattr(dcp_metadata if module.endswith(".metadata") else dcp_filesystem, name)
    if module == "torch":
        if name == "Size":
            return torch.Size
        value = torch.__dict__.get(name)
        return value if isinstance(value, (torch.dtype, torch.memory_format)) else None
    fixed = {("torch.serialization", "_get_layout"): torch.serialization._get_layout,
             ("collections", "OrderedDict"): collections.OrderedDict,
             ("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "PurePosixPath"): pathlib.PurePosixPath}
    return fixed.get((module, name))


@functools.cache
def _buildable() -> tuple[type, ...]:
    """What a BUILD opcode may set the state of: instances of DCP's metadata dataclasses."""
    import collections

    from torch.distributed.checkpoint import filesystem, metadata

    return (*(getattr(metadata, name) for name in _METADATA_CLASSES[metadata.__name__] if name != "_MEM_FORMAT_ENCODING"),
            filesystem._StorageInfo, collections.OrderedDict)


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP's .metadata and nothing else: every global outside ``_allowed_global`` is
    refused before it is looked up, so no other callable can run, and BUILD (which sets an
    object's attributes) applies only to instances of the metadata dataclasses — never to an
    allowed class or function itself, whose attributes are torch's global state. Python's
    own unpickler (not the C one) so that BUILD can be checked."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        value = _allowed_global(module, name)
        if value is None:
            raise _Refused(f"it names {str(module)[:60]}.{str(name)[:60]}, which is not DCP metadata")
        return value

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent reference")

    def load_build(self):
        target = self.stack[-2]  # the object below its state
        if type(target) not in _buildable():
            raise _Refused(f"it sets attributes of a {type(target).__name__}, which is not DCP metadata")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_dcp_metadata(directory: Path):
    """The checked DCP ``Metadata`` of `directory` (see the module's docstring), or a one-line
    CheckpointError naming the file."""
    path = Path(directory) / DCP_METADATA
    damaged = " — the checkpoint is damaged; start the run again"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"{path}: refused ({e}){damaged}") from None
    except Exception as e:  # truncated, garbage, a refused shape: any unpickling failure
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else e.__class__.__name__
        raise CheckpointError(f"{path}: unreadable ({reason}){damaged}") from None
    problem = _metadata_problem(metadata, Path(directory))
    if problem:
        raise CheckpointError(f"{path}: {problem}{damaged}")
    return metadata


def _is_size(value, dims: int | None = None) -> bool:
    return isinstance(value, torch.Size) and (dims is None or len(value) == dims) and all(
        isinstance(n, int) and n >= 0 for n in value)


def _metadata_problem(metadata, directory: Path) -> str | None:
    """What makes unpickled DCP metadata unfit to read from, or None."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    if type(metadata) is not Metadata or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        return "not a DCP checkpoint's metadata"
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            return "an entry without a name"
        if isinstance(entry, BytesStorageMetadata):
            return f"entry {key[:80]!r} is not a tensor (widen saves tensors only; DCP would unpickle it)"
        if type(entry) is not TensorStorageMetadata or type(entry.properties) is not TensorProperties \
                or not isinstance(entry.properties.dtype, torch.dtype) or not _is_size(entry.size) \
                or not isinstance(entry.chunks, list) or not all(
                    type(c) is ChunkStorageMetadata and _is_size(c.offsets, len(entry.size))
                    and _is_size(c.sizes, len(entry.size)) for c in entry.chunks):
            return f"entry {key[:80]!r} is malformed"
    files: dict[str, bool] = {}
    for index, info in metadata.storage_data.items():
        if type(index) is not MetadataIndex or index.fqn not in metadata.state_dict_metadata:
            return "a storage entry names no tensor"
        if type(info) is not _StorageInfo or not isinstance(info.relative_path, str) \
                or not DCP_SHARD.fullmatch(info.relative_path) or any(
                    not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in (info.offset, info.length)):
            return f"a storage entry of {index.fqn[:80]!r} is malformed"
        if getattr(info, "transform_descriptors", None):
            return f"{index.fqn[:80]!r} is stored transformed (widen never writes that)"
        if info.relative_path not in files:
            shard = directory / info.relative_path
            files[info.relative_path] = shard.is_file() and not shard.is_symlink()
        if not files[info.relative_path]:
            return f"{info.relative_path} is missing"
    return None


@functools.cache
def _dcp_reader_class():
    """Built on first use: importing torch.distributed.checkpoint takes a second."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader with ``read_metadata`` through ``read_dcp_metadata`` (checked, no
        unrestricted pickle); tensor data is DCP's own: ``torch.load(weights_only=True)``."""

        def __init__(self, path):
            super().__init__(path)
            self._checked = None

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # a rank-local metadata file: widen never writes one
                raise CheckpointError(f"{Path(self.path)}: has no {DCP_METADATA} — the checkpoint is damaged; "
                                      f"start the run again")
            if self._checked is None:
                self._checked = read_dcp_metadata(Path(self.path))
            from torch.distributed.checkpoint.metadata import StorageMeta

            if self._checked.storage_meta is None or type(self._checked.storage_meta) is not StorageMeta:
                self._checked.storage_meta = StorageMeta()
            self._checked.storage_meta.load_id = self.load_id
            return self._checked

    return SafeReader


def safe_reader(path: Path):
    """A ``SafeReader`` of the DCP checkpoint in `path`."""
    return _dcp_reader_class()(path)


def read_dcp(targets: dict[str, torch.Tensor], directory: Path, exact: str | None = None) -> None:
    """Fill `targets` in place from the DCP checkpoint in `directory`: plain tensors whole (no
    process group needed), DTensors with this rank's slices (then a collective). `exact`: the
    checkpoint's entries under that prefix must be exactly the targets'."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.tensor import DTensor

    directory = Path(directory)
    reader = safe_reader(directory)
    entries = reader.read_metadata().state_dict_metadata
    for key, target in targets.items():
        entry = entries.get(key)
        if entry is None:
            raise CheckpointError(f"{directory}: holds no {key[:100]} — it does not fit the rebuilt model")
        if tuple(entry.size) != tuple(target.shape):
            raise CheckpointError(f"{directory}: {key[:100]} is {list(entry.size)}, the rebuilt model's "
                                  f"{list(target.shape)} — it does not fit")
    if exact is not None:
        extra = sorted(k for k in entries if k.startswith(exact) and k not in targets)
        if extra:
            raise CheckpointError(f"{directory}: holds {extra[0][:100]}, which the rebuilt model lacks — "
                                  f"it does not fit")
    if not targets:
        return
    sharded = any(isinstance(t, DTensor) for t in targets.values())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=reader, no_dist=not sharded)
    except CheckpointException as e:  # a read failed (on some rank): one line, no traceback
        failure = _first_failure(e)
        if isinstance(failure, CheckpointError):
            raise failure from None
        reason = (str(failure).splitlines() or [failure.__class__.__name__])[0][:160]
        raise CheckpointError(f"{directory}: unreadable ({reason}) — the checkpoint is damaged; "
                              f"start the run again") from None


def finite_weights(model: torch.nn.Module | WholeWeights | ShardedWeights) -> bool:
    """Whether every parameter and buffer is finite (a diverged model is never saved). Of
    ShardedWeights: this rank's shards (the caller combines the ranks' answers)."""
    with torch.no_grad():
        tensors = model.local() if isinstance(model, ShardedWeights) else \
            list(model.parameters()) + list(model.buffers())
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


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
