"""Plan -> model: load the model and tokenizer, the tasks' data, apply (or replay) the stages'
expansions. The training loop, export, the mapping sweep and resume all build through here, so
export and the sweep never import the training loop.

Everything a run draws at random is a pure function of the plan's seed: a stage's operators draw
from ``op_generator(seed, stage)``, its training from ``stage_seed(seed, stage)``, its batches
from (seed, stage, step). A run, a resume, another rank and an export therefore build the same
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import WidenError
from engine.grow.apply import Freezer, StageGrowth, apply_stage, op_generator
from engine.grow.growth import combine_growth, grow_model, growth_generator
from engine.model.forward import batch_to, slice_batch
from engine.model.view import count_params
from engine.plan import Plan, load_plan
from engine.runs.events import ReportProgress
from engine.runs.rundir import RunDir, runs_root
from engine.train import checkpoint
from engine.train.data import eval_batches, load_task, load_tokenizer, train_batch

PROBE_SEQUENCES = 4          # sequences in the fixed probe batch used to measure expansions


class BuildError(WidenError, ValueError):
    """A plan or run whose model cannot be built as asked; the message says why and what to do."""


def stage_seed(seed: int, stage: int) -> int:
    """Torch's RNG is reseeded at each stage start, so a stage trains the same whether the stages
    before it ran in this process, were resumed, or came from the prefix cache."""
    return seed * 7919 + stage


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BuildError("train.device: \"cuda\" but CUDA is not available — use \"auto\" or \"cpu\"")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def load_tokenizer_and_model(plan: Plan, device: str | torch.device = "cpu", world=None,
                              report: ReportProgress | None = None):
    """(tokenizer, model on `device`, its ArchView) for the plan's model, before any stage. In an
    FSDP run (`world` distributed, strategy fsdp) the model comes sharded, loaded unit by unit
    (``engine.train.fsdp.load_sharded``): no rank ever holds it whole. `report` is told as each
    begins (a real model takes a while)."""
    from engine.model.sources import check_vocabulary, load_model

    if report:
        report("load", "tokenizer", 0, None)
    tokenizer = load_tokenizer(plan.model.tokenizer, plan.model)
    if report:
        report("load", "model", 0, None)
    if world is not None and world.distributed and plan.train.strategy == "fsdp":
        from engine.train import fsdp

        model, view = fsdp.load_sharded(plan.model, plan.seed, plan.train.attention, torch.device(device),
                                        world.is_main)
    else:
        model, view = load_model(plan.model, plan.seed, attention=plan.train.attention)
    check_vocabulary(model, tokenizer)
    return tokenizer, model.to(device), view


# ---------------------------------------------------------------------------------------------
# task data


def load_plan_task(name: str, spec, tokenizer, cache_dir: Path | None, model_kind: str,
                   decoder_start_id: int | None = None):
    """A plan's task data: token streams (text) or prompt/continuation pairs (generation)."""
    if spec.task_kind == "generation":
        from engine.train.generation import load_generation_task

        return load_generation_task(name, spec, tokenizer, cache_dir, model_kind, decoder_start_id)
    return load_task(name, spec, tokenizer, cache_dir)


def task_eval_batches(data, train) -> list:
    """A task's fixed eval batches (numpy) for the plan's `train` settings."""
    if hasattr(data, "eval_batches"):  # a generation task: (prompt, continuation) pairs
        return data.eval_batches(train.batch_size, train.seq_len, train.eval_batches)
    return eval_batches(data.eval, train.batch_size, train.seq_len, train.eval_batches)


def task_train_batch(data, train, seed: int, stage: int, step: int):
    """A task's training batch for (seed, stage, step): a pure function of them."""
    if hasattr(data, "train_batch"):
        return data.train_batch(train.batch_size, train.seq_len, seed, stage, step)
    return train_batch(data.train, train.batch_size, train.seq_len, seed, stage, step)


def probe_batch(eval_set: list) -> tuple:
    """The fixed probe batch that measures expansions: the first eval batch, PROBE_SEQUENCES rows."""
    return slice_batch(eval_set[0], PROBE_SEQUENCES)


def cache_dir() -> Path:
    return runs_root() / ".cache"


def stage_probe(plan: Plan, stage: int, tokenizer, device: str = "cpu", cache: Path | None = None):
    """The probe batch of `stage` (its task's first eval batch, PROBE_SEQUENCES rows), as tensors:
    the batch a run measures that stage's expansions on."""
    from engine.model.sources import load_architecture

    name = plan.stages[stage].task
    arch = load_architecture(plan.model)
    start = getattr(arch.config, "decoder_start_token_id", None)
    data = load_plan_task(name, plan.tasks[name], tokenizer, cache or cache_dir(), arch.family.kind, start)
    return batch_to(probe_batch(task_eval_batches(data, plan.train)), device)


# ---------------------------------------------------------------------------------------------
# expansions


def replay_expansions(model, view, plan, stages: int, growths: list[dict] | None = None) -> StageGrowth:
    """Apply the operators of the first `stages` stages unmeasured (to fit a checkpoint's shape),
    each stage followed by the automatic growths it had (`growths`: [{"stage", "growth"}]);
    returns what the last stage added (its operators and growths)."""
    growth = StageGrowth()
    for index in range(stages):
        growth = apply_stage(model, view, index, plan.stages[index].expand, None,
                             op_generator(plan.seed, index), measure=False)
        for g in sorted((g for g in growths or [] if g["stage"] == index), key=lambda g: g["growth"]):
            before = dict(model.named_parameters())
            grown = grow_model(model, view, plan.stages[index].grow.expand, index, g["growth"], None,
                               growth_generator(plan.seed, index, g["growth"]))
            growth = combine_growth(growth, grown, before, model)
    return growth


def build_from_plan(plan: Plan, upto_stage: int | None = None, device: str = "cpu"):
    """Build the plan's model and apply the operators of every stage (through `upto_stage`,
    inclusive; None: all) in order, without training. Each operator is measured on its stage's
    probe batch, as in a run; `trainable` follows the stage's freeze policy.

    Returns (model, view, tokenizer, reports)."""
    tokenizer, model, view = load_tokenizer_and_model(plan, device)
    last = len(plan.stages) - 1 if upto_stage is None else upto_stage
    if not 0 <= last < len(plan.stages):
        raise BuildError(f"upto_stage {upto_stage}: the plan has stages 0..{len(plan.stages) - 1}")
    freezer, reports, probes = Freezer(), [], {}
    for index in range(last + 1):
        stage = plan.stages[index]
        if not stage.expand:
            continue
        if stage.task not in probes:
            probes[stage.task] = stage_probe(plan, index, tokenizer, device)
        growth = apply_stage(model, view, index, stage.expand, probes[stage.task], op_generator(plan.seed, index))
        model.to(device)
        freezer.apply(model, stage.freeze, growth)
        trainable, total = freezer.trainable(model), count_params(model)
        for report in growth.reports:
            report.update(trainable=trainable, trainable_share=trainable / total)
            reports.append(report)
    freezer.apply(model, "none", None)  # drop the gradient-mask hooks; the export trains nothing
    model.eval()
    return model, view, tokenizer, reports


def load_run_model(run_dir: Path | str, device: str = "cpu"):
    """A run's latest weights: build from the run's plan.toml, replay the expansions its
    checkpoint had (as a resume does), load checkpoints/latest's weights — model.safetensors, or
    an FSDP run's DCP shards (read whole in this one process: no process group needed).

    Returns (model, view, tokenizer, plan)."""
    run = RunDir(run_dir)
    if not run.plan.exists():
        raise BuildError(f"{run.path} is not a run directory (no plan.toml)")
    latest = run.checkpoints / "latest"
    if not checkpoint.exists(latest):
        raise BuildError(f"run {run.id} has no checkpoint yet — wait for a stage to end "
                         f"(`widen watch {run.id}`)")
    plan = load_plan(run.plan)
    stages, growths = len(plan.stages), []
    state = checkpoint.load_state(latest)
    if state is not None:
        stages = state.position.stage + (1 if state.position.ops_applied else 0)
        growths = state.history.growths  # automatic growths during stages
    if stages > len(plan.stages):
        raise BuildError(f"run {run.id}: its checkpoint is at stage {stages} but its plan has "
                         f"{len(plan.stages)} stages — the run directory is damaged")
    tokenizer, model, view = load_tokenizer_and_model(plan, device)
    try:
        replay_expansions(model, view, plan, stages, growths)
    except (KeyError, TypeError, IndexError) as e:
        raise BuildError(f"run {run.id}: its checkpoint's growth record is damaged ({e.__class__.__name__})") from None
    model.to(device)
    checkpoint.load_weights(model, latest, device)
    model.eval()
    return model, view, tokenizer, plan


@dataclass
class Prepared:
    """Everything a run trains and evaluates with, before any stage: the model on its device, the
    tokenizer, each task's data and fixed eval batches (on the device), and bytes per token of
    each eval stream (a loss converts to bits per byte with it)."""

    device: torch.device
    tokenizer: object
    model: torch.nn.Module
    view: object
    tasks: dict
    eval_sets: dict[str, list]
    bytes_per_token: dict[str, float]


def prepare(plan: Plan, cache: Path, world=None, report: ReportProgress | None = None) -> Prepared:
    """Load the plan's model and tokenizer and its tasks' data (tokenized, or from the cache).
    `report` (a run's ``ThrottledProgress``) is told as loading and each task's tokenizing
    begin; without it nothing is reported."""
    from engine.model.forward import model_kind

    device = pick_device(plan.train.device)
    fsdp_run = world is not None and world.distributed and plan.train.strategy == "fsdp"
    tokenizer, model, view = load_tokenizer_and_model(plan, device if fsdp_run else "cpu", world, report)
    kind = model_kind(model)
    start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    tasks = {}
    for done, (name, spec) in enumerate(plan.tasks.items()):
        if report:
            report("tokenize", name, done, len(plan.tasks))
        tasks[name] = load_plan_task(name, spec, tokenizer, cache, kind, start)
    model.to(device)
    eval_sets = {name: [batch_to(b, device) for b in task_eval_batches(data, plan.train)]
                 for name, data in tasks.items()}
    return Prepared(device, tokenizer, model, view, tasks, eval_sets,
                    {n: d.eval_bytes / max(1, d.eval_tokens) for n, d in tasks.items()})
