"""`widen export` (a grown model as a Hugging Face directory or a GGUF file, checked for parity) and
`widen export-metrics` (a run's metrics mirrored to TensorBoard, MLflow or CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.errors import WidenError
from engine.runs.rundir import RunDir
from widen_tui.cli.common import CLIError, console, find_run, load_plan_or_exit, warn

commands = typer.Typer()

PARITY_TOLERANCE = 1e-4


@commands.command()
def export(
    source: Annotated[str, typer.Argument(metavar="PLAN_OR_RUN",
                                          help="a plan .toml (built and expanded, not trained) or a run (id, prefix, "
                                               "last, name, or run directory)")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT",
                                            help="where to write: a directory (hf; gguf: OUT/model.gguf), or for "
                                                 "gguf a file name ending in .gguf")],
    keep_adapters: Annotated[bool, typer.Option("--keep-adapters",
                                                help="keep adapters separate (PEFT format in OUT/adapter) "
                                                     "instead of merging them (hf only)")] = False,
    format_: Annotated[str, typer.Option("--format", metavar="hf|gguf",
                                         help="hf: a Hugging Face directory; gguf: one GGUF file for llama.cpp "
                                              "(llama, mistral, qwen2, qwen3, gemma2, gemma3)")] = "hf",
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="f32|f16|bf16|q8_0",
                                                 help="gguf only: how weights are stored (default f32; norms and "
                                                      "biases stay f32)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a field of a plan file: key.path=value")] = [],
    variant: Annotated[Optional[str], typer.Option("--variant", help="a plan with variants: the one to build")] = None,
):
    """Export a grown model as a Hugging Face directory (AutoModelForCausalLM.from_pretrained loads
    it; AutoModelForSeq2SeqLM for T5): widened layers merged into wider matrices, copied layers
    materialized, adapters merged — or, with --keep-adapters, each saved under OUT/adapter/<name>
    (PEFT format; widen_export.json lists which are active). With --format gguf, the same
    materialized model is written as one GGUF file (OUT ending in .gguf, else OUT/model.gguf) with
    its tokenizer, and read back with transformers' GGUF loader for the parity check."""
    _check_format(format_, dtype, keep_adapters)
    path = Path(source)
    is_plan = source.endswith(".toml")
    if is_plan:
        if not path.is_file():
            raise CLIError(f"{source}: no such plan file")
        plan = load_plan_or_exit(path, set_, None)
        if plan.variants:
            if not variant:
                raise CLIError(f"{source} has variants ({', '.join(v.name for v in plan.variants)}) — "
                               "pick one with --variant NAME")
            try:
                plan = plan.for_variant(variant)
            except KeyError as e:
                raise CLIError(f"--variant: {e.args[0]}") from None
    else:
        if set_:
            raise CLIError("--set applies to a plan file; a run's plan is fixed")
        run = RunDir(path) if path.is_dir() and (path / "plan.toml").exists() else find_run(source)
    from engine.exports import hf_directory as ex

    ex.quiet_transformers()
    try:
        if is_plan:
            model, view, tokenizer, reports = ex.build_from_plan(plan)
            origin = {"plan": str(path.resolve()), "plan_name": plan.name, "overrides": list(set_),
                      "trained": False}
        else:
            origin = {"run": run.id, "run_dir": str(run.path), "run_state": run.status().get("state"), "trained": True}
            if format_ == "hf" and not keep_adapters and _streamed(run, out_dir, origin):
                return
            model, view, tokenizer, plan = ex.load_run_model(run.path)
            reports = (run.results() or {}).get("expansions") or ex.plan_op_summary(plan)
            origin["plan_name"] = plan.name
        stage = len(plan.stages) - 1
        batch = ex.stage_probe(plan, stage, tokenizer)
        reference = ex.reference_logits(model, batch)
        if format_ == "gguf":
            return _export_gguf(model, tokenizer, out_dir, dtype or "f32", origin, reports, batch, reference,
                                plan.stages[stage].task)
        manifest = ex.export_model(model, tokenizer, out_dir, keep_adapters=keep_adapters,
                                   source=origin, reports=reports)
        delta = ex.verify_export(out_dir, batch, reference)
    except WidenError as e:
        raise CLIError(str(e)) from None
    console.print(f"wrote {out_dir}: {manifest['model_type']} model, {manifest['num_layers']} layers, FFN "
                  f"{manifest['ffn_size']}, {manifest['params']:,} parameters, adapters {manifest['adapters']}",
                  highlight=False)
    loader = manifest["model_class"] + (" + PeftModel" if manifest["kept_adapters"] else "")
    console.print(f"parity: max |Δlogits| {delta:.2e} — reloaded with {loader}.from_pretrained vs "
                  f"the in-widen model, on {batch[0].shape[0]} probe sequences of task "
                  f"'{plan.stages[stage].task}'", highlight=False)
    if not delta <= PARITY_TOLERANCE:
        raise CLIError(f"export parity failed: max |Δlogits| {delta:.2e} > {PARITY_TOLERANCE:g} — the "
                       f"export in {out_dir} does not compute what the grown model computes")


def _check_format(format_: str, dtype: str | None, keep_adapters: bool) -> None:
    """--format / --dtype / --keep-adapters that do not go together: one line, before building anything."""
    if format_ not in ("hf", "gguf"):
        raise CLIError(f"--format {format_}: give hf (a Hugging Face directory) or gguf (one GGUF file)")
    if format_ == "hf" and dtype is not None:
        raise CLIError("--dtype applies to --format gguf; a Hugging Face export keeps the model's own dtype")
    if format_ == "gguf":
        from engine.exports.gguf import DTYPES

        if dtype is not None and dtype not in DTYPES:
            raise CLIError(f"--dtype {dtype}: give one of {', '.join(DTYPES)}")
        if keep_adapters:
            raise CLIError("--keep-adapters applies to --format hf; a GGUF holds one model, with its adapters merged")


def _export_gguf(model, tokenizer, out: Path, dtype: str, origin: dict, reports, batch, reference, task: str) -> None:
    """Write the GGUF, read it back with transformers, and report the parity against the dtype's tolerance."""
    from engine.exports import gguf

    manifest = gguf.export_gguf(model, tokenizer, out, dtype, source=origin, reports=reports)
    delta = gguf.verify_gguf(manifest["path"], batch, reference)
    tolerance, basis = gguf.parity_tolerance(dtype, reference)
    stored = ", ".join(f"{count} {kind}" for kind, count in sorted(manifest["tensor_types"].items()))
    console.print(f"wrote {manifest['path']}: {manifest['model_type']} model as GGUF architecture "
                  f"'{manifest['gguf_architecture']}', {manifest['num_layers']} layers, FFN {manifest['ffn_size']}, "
                  f"{manifest['params']:,} parameters, adapters {manifest['adapters']}; tensors {stored}",
                  highlight=False, soft_wrap=True)
    console.print(f"parity: max |Δlogits| {delta:.2e} (tolerance {tolerance:.2e} for {dtype}: {basis}) — read back "
                  f"with AutoModelForCausalLM.from_pretrained(gguf_file=...) vs the in-widen model, on "
                  f"{batch[0].shape[0]} probe sequences of task '{task}'", highlight=False, soft_wrap=True)
    if not delta <= tolerance:
        raise CLIError(f"export parity failed: max |Δlogits| {delta:.2e} > {tolerance:.2e} ({dtype}) — the GGUF "
                       f"{manifest['path']} does not compute what the grown model computes")


def _streamed(run, out_dir: Path, origin: dict) -> bool:
    """A run whose latest checkpoint is sharded (FSDP) and whose model needs no materializing is
    exported tensor by tensor from the shards (engine.exports.streamed): the model is never whole."""
    from engine.exports.streamed import stream_run_export

    manifest = stream_run_export(run.path, out_dir, origin, (run.results() or {}).get("expansions"))
    if manifest is None:
        return False
    streamed = manifest["streamed"]
    console.print(f"wrote {out_dir}: {manifest['model_type']} model, {manifest['num_layers']} layers, FFN "
                  f"{manifest['ffn_size']}, {manifest['params']:,} parameters — streamed from the sharded "
                  f"checkpoint, {streamed['tensors']} tensors one at a time", highlight=False)
    console.print(f"parity: every tensor read back from the file, max |Δ| {streamed['max_abs_delta']:.2e} "
                  f"against the checkpoint's", highlight=False)
    if streamed["max_abs_delta"] != 0.0:
        raise CLIError(f"export parity failed: a tensor of {out_dir} differs from the checkpoint's by "
                       f"{streamed['max_abs_delta']:.2e}")
    return True


@commands.command("export-metrics")
def export_metrics(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="a run: id, prefix, last, name, or run directory")],
    to: Annotated[str, typer.Option("--to", metavar="tensorboard|mlflow|csv", help="where to mirror the metrics")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output directory (default: RUN_DIR/export-TOOL; "
                                                "mlflow: MLFLOW_TRACKING_URI when set)")] = None,
):
    """Mirror a run's metrics after the fact (engine.runs.metrics_export): loss, lr, tokens/s, evals per
    task, expansions and growths, memory samples, and the final forgetting matrix."""
    from engine.runs.metrics_export import export_run

    path = Path(run_ref)
    run = RunDir(path) if path.is_dir() and (path / "plan.toml").exists() else find_run(run_ref)
    summary = export_run(run.path, to, out)
    for problem in summary.problems[:5]:
        warn(f"{run.id}: skipped {problem}")
    console.print(summary.line(), highlight=False)
