"""Export a run from its sharded checkpoint one tensor at a time: the model is never whole.

A run trained under FSDP checkpoints in DCP shards (``engine.train.checkpoint``). Its export is
the plain Hugging Face directory ``hf_directory.export_model`` writes, built without the model's
values in memory:

1. the run's model is rebuilt on the meta device (the base config, its operators and growths
   replayed without values) and materialized there, which gives the exported architecture and
   config;
2. when materializing changed no tensor — no adapter to merge, no parallel path to fold in, no
   weight-tied layer to copy — every exported tensor is a checkpoint tensor as it is, so
   ``model.safetensors`` is written by streaming: its header from the shapes, then each tensor
   read whole from the shards (DCP, no process group), written, and dropped;
3. the parity check reads every tensor back from the file and compares it with the
   checkpoint's, again one at a time.

A model that needs materializing (``stream_run_export`` returns None) is exported whole, the
ordinary way.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from engine.plan import load_plan
from engine.runs.rundir import RunDir
from engine.train import checkpoint

WEIGHTS = "model.safetensors"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def exported_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The (meta) tensors a save writes, by name: a tied tensor once, under its first name."""
    seen: set[int] = set()
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[name] = value
    return out


def write_streamed(path: Path, entries: dict[str, torch.Tensor], read) -> None:
    """A safetensors file of `entries` (meta tensors: names, shapes, dtypes), each value
    `read(name)` in turn: only one tensor is whole at a time."""
    header, offset = {}, 0
    for name, meta in entries.items():
        size = meta.numel() * meta.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, meta in entries.items():
            value = read(name).to(meta.dtype).contiguous()
            if tuple(value.shape) != tuple(meta.shape):
                raise checkpoint.CheckpointError(f"{name}: {list(value.shape)} in the checkpoint, "
                                                 f"{list(meta.shape)} in the rebuilt model")
            f.write(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")


def stream_run_export(run_dir: Path | str, out_dir: Path | str, source: dict | None = None,
                      reports: list[dict] | None = None) -> dict | None:
    """Export the run's sharded checkpoint to `out_dir` tensor by tensor; returns the manifest,
    or None when the model needs materializing (export it whole) or the checkpoint is not sharded."""
    from engine.exports.hf_directory import _check_config_saves, export_manifest, materialize
    from engine.model.sources import load_model
    from engine.model.view import ArchView, count_params
    from engine.train.build import replay_expansions
    from engine.train.data import load_tokenizer

    run = RunDir(run_dir)
    latest = run.checkpoints / "latest"
    if not checkpoint.is_sharded_checkpoint(latest):
        return None
    plan = load_plan(run.plan)
    state = checkpoint.load_state(latest, stages=len(plan.stages))
    stages = state.position.stage + (1 if state.position.ops_applied else 0)
    model, view = load_model(plan.model, plan.seed, attention=plan.train.attention, skeleton=True)
    if not any(p.is_meta for p in model.parameters()):
        return None  # a plain MLP: tiny, exported whole
    replay_expansions(model, view, plan, stages, state.history.growths)
    before = {name: (tuple(t.shape), t.dtype) for name, t in exported_tensors(model).items()}
    params_before = count_params(model)
    materialize(model)
    entries = exported_tensors(model)
    if {name: (tuple(t.shape), t.dtype) for name, t in entries.items()} != before:
        return None
    _check_config_saves(model.config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = latest / checkpoint.DCP_DIR

    def read(name: str) -> torch.Tensor:
        value = torch.empty(entries[name].shape, dtype=entries[name].dtype)
        checkpoint.read_dcp({checkpoint.MODEL_PREFIX + name: value}, shards)
        return value

    write_streamed(out_dir / WEIGHTS, entries, read)
    model.config.save_pretrained(str(out_dir))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(out_dir))
    load_tokenizer(plan.model.tokenizer, plan.model).save(out_dir)
    manifest = export_manifest(model, ArchView(model.config, model), {**(source or {}), "plan_name": plan.name},
                               reports, params_before)
    manifest["streamed"] = {"tensors": len(entries), "max_abs_delta": stream_parity(out_dir, entries, read)}
    from engine.exports.hf_directory import write_manifest

    write_manifest(out_dir, manifest)
    return manifest


def stream_parity(out_dir: Path, entries: dict[str, torch.Tensor], read) -> float:
    """The largest difference between a tensor of the written file and the checkpoint's, read
    back one at a time."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(Path(out_dir) / WEIGHTS), framework="pt") as f:
        for name in entries:
            written, saved = f.get_tensor(name), read(name)
            worst = max(worst, float((written.float() - saved.float()).abs().max()) if written.numel() else 0.0)
    return worst
