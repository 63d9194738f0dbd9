"""widen from Python: load a model, grow it with any operator, freeze, train it in your own loop,
switch task modules, export a plain Hugging Face directory. docs/python.md has runnable examples.

The functions are the plan's machinery without a plan: ``load`` is a plan's ``[model] source``
(engine.model.sources), ``expand`` one ``[[stages.expand]]`` table (its keyword parameters validated by
the op's schema, ``OPS[op].schema``, and measured as a run measures it: engine.grow.apply), ``freeze``
a stage's ``freeze``, ``export`` ``widen export`` (engine.exports.hf_directory), ``TaskModules`` the plan's
``task_modules = true`` (engine.grow.task_modules). Re-exported lazily by ``engine`` (torch is
imported on first use, not by ``import engine``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from engine.errors import WidenError
from engine.grow.apply import Freezer, StageGrowth, apply_stage
from engine.grow.task_modules import TaskModules as _TaskModules
from engine.model.view import ArchView, count_params
from engine.ops.params import OPS
from engine.train.optim import weight_decay_groups

__all__ = ["ExpandReport", "FreezeSummary", "OperatorParamsError", "TaskModules", "expand", "export", "freeze",
           "load", "param_groups", "probe_batch"]

PROBE_SHAPE = (4, 32)   # default probe batch: sequences × tokens, drawn from the vocabulary


class OperatorParamsError(WidenError, ValueError):
    """Keyword parameters an operator's schema refuses (or an unknown op): one line per problem,
    each naming the field, as ``widen plan check`` words it."""


# ---------------------------------------------------------------------------------------------
# loading


def load(source: str, *, seed: int = 0, family: str | None = None, revision: str | None = None,
         attention: str = "sdpa") -> tuple[torch.nn.Module, ArchView]:
    """Load a model as a plan's ``[model] source`` names it: ``"builtin:tiny-neo"`` (built from a
    config, seeded with `seed`), a local Hugging Face directory, or a hub name (the same
    ``from_pretrained`` path as a local directory). `family`: a plan's ``[model] family``, for a
    model type widen does not know by name. Returns ``(model, view)``: the model in train mode
    and its architecture view (what ``expand`` operates on)."""
    from engine.model.sources import load_model
    from engine.plan import ModelSpec

    spec = ModelSpec(source=str(source), family=family, revision=revision)
    model, view = load_model(spec, seed, attention=attention)
    return model, view


def probe_batch(model: torch.nn.Module, shape: tuple[int, int] = PROBE_SHAPE, seed: int = 0) -> tuple:
    """A fixed batch ``(inputs, targets)`` of random token ids from the model's vocabulary (next-
    token targets), for measuring an expansion when you pass none."""
    vocab = _vocab_size(model)
    ids = torch.randint(0, vocab, (shape[0], shape[1] + 1), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def _vocab_size(model) -> int:
    if isinstance(model, torch.nn.Sequential) and isinstance(model[0], torch.nn.Embedding):
        return model[0].num_embeddings
    return model.get_input_embeddings().num_embeddings


# ---------------------------------------------------------------------------------------------
# expanding


@dataclass
class ExpandReport:
    """What one operator did, measured on the probe batch: the fields (and names) of a run's
    ``expand`` event (engine.runs.records.ExpandEvent). ``as_event()`` gives that dict; ``growth`` is
    what the op added (for ``freeze(model, "base", report)`` and ``TaskModules.own``), not part of it."""

    stage: int
    op: str
    layers: Any
    settings: dict
    params_before: int
    params_after: int
    params_added: int
    trainable: int
    trainable_share: float
    exact: bool
    max_abs_logit_delta: float
    loss_before: float
    loss_after: float
    ppl_before: float
    ppl_after: float
    new_grad_norm: float | None = None
    dead_share: float | None = None
    max_pairwise_cosine: float | None = None
    max_twin_cosine: float | None = None
    note: str = ""
    growth: StageGrowth = field(default_factory=StageGrowth, repr=False, compare=False)

    def as_event(self) -> dict:
        """The report as an ``expand`` event's fields (JSON-ready; without `growth`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "growth"}

    def as_dict(self) -> dict:
        """Alias of ``as_event``."""
        return self.as_event()


def _validated(op: str, params: dict):
    """The op's parameters through its schema (``OPS[op].schema``), or one clear error."""
    from pydantic import ValidationError

    from engine.plan import problems_from_pydantic

    if op not in OPS:
        hint = difflib.get_close_matches(str(op), list(OPS), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"ops: {', '.join(OPS)}"
        raise OperatorParamsError(f"op: unknown operator '{op}' — {fix}")
    schema = OPS[op].schema
    try:
        return schema.model_validate({"op": op, **params})
    except ValidationError as e:
        problems = problems_from_pydantic(e.errors(), prefix=op, model=schema)
        raise OperatorParamsError("\n".join(f"{p.path}: {p.message}" for p in problems)) from None


def expand(model: torch.nn.Module, op: str, *, view: ArchView | None = None, probe=None,
           generator: torch.Generator | None = None, seed: int = 0, stage: int = 0, **params) -> ExpandReport:
    """Apply operator `op` to `model` in place, with the keyword `params` of a plan's
    ``[[stages.expand]]`` table (``size=64, init="zero_out"``, ``layers=[0, 2]``...), validated
    by ``OPS[op].schema``: an unknown or mistyped parameter raises ``OperatorParamsError``
    naming the field (``widen_ffn.sise: unknown key — did you mean 'size'?``).

    Measured as in a run on `probe` (``(inputs, targets)`` tensors; default ``probe_batch(model)``):
    parameters added, exact, max |Δlogits|, loss before/after, the new units' health. `generator`
    (or `seed`) is what the op draws from; `stage` names adapters ("lora_stage1") and the report.
    `view`: the model's ArchView (from ``load``; default: made from the model). Build the
    optimizer after expanding: new parameters are new tensors."""
    spec = _validated(op, params)
    view = view if view is not None else ArchView.of(model)
    view.model = model
    batch = probe if probe is not None else probe_batch(model)
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    class _Spec:  # apply_stage reads `.params()`, as a plan's ExpandSpec has
        def params(self):
            return spec

    growth = apply_stage(model, view, stage, [_Spec()], batch, generator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_params(model)
    report = growth.reports[0]
    report.update(trainable=trainable, trainable_share=trainable / total)
    known = {f.name for f in dataclasses.fields(ExpandReport)}
    return ExpandReport(**{k: v for k, v in report.items() if k in known}, growth=growth)


# ---------------------------------------------------------------------------------------------
# freezing

_FREEZERS: "weakref.WeakKeyDictionary[torch.nn.Module, Freezer]" = weakref.WeakKeyDictionary()

Reports = Union[ExpandReport, StageGrowth, Sequence[ExpandReport], None]


@dataclass
class FreezeSummary:
    """What trains after ``freeze``: entries (a grown tensor counts its new entries only), of
    `total`, and the names of tensors that train only some entries (their gradients masked: keep
    them out of weight decay — ``param_groups`` does)."""

    trainable: int
    total: int
    masked: list[str]

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def _growth_of(reports: Reports) -> StageGrowth:
    if reports is None:
        return StageGrowth()
    if isinstance(reports, StageGrowth):
        return reports
    if isinstance(reports, ExpandReport):
        reports = [reports]
    merged = StageGrowth()
    for report in reports:
        merged.results += report.growth.results
        merged.reports += report.growth.reports
    return merged


def freeze(model: torch.nn.Module, policy: Union[str, Sequence[str]] = "none", report: Reports = None) -> FreezeSummary:
    """A plan stage's ``freeze``: ``"none"`` (everything trains), ``"base"`` (only what `report`
    added trains — an ExpandReport or a list of them; tensors grown in place train only their new
    entries, through a gradient mask), or a list of name globs to freeze (``["*.wte.*"]``).
    Calling it again replaces the previous policy (and its masks)."""
    if isinstance(policy, str) and policy not in ("none", "base"):
        policy = [policy]  # one glob
    if policy == "base" and report is None:
        raise WidenError('freeze: policy "base" trains what an expansion added — pass its report: '
                         'freeze(model, "base", report)')
    freezer = _FREEZERS.get(model)
    if freezer is None:
        freezer = _FREEZERS[model] = Freezer()
    freezer.apply(model, policy if isinstance(policy, str) else list(policy), _growth_of(report))
    masked = [name for name, p in model.named_parameters() if id(p) in freezer.masked]
    return FreezeSummary(trainable=freezer.trainable(model), total=count_params(model), masked=masked)


def param_groups(model: torch.nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """Optimizer groups over what trains, as widen's own AdamW takes them: weight decay for
    matrices; none for biases, norms and tensors that train only their grown entries (decay would
    move their frozen entries). ``torch.optim.AdamW(param_groups(model), lr=...)``."""
    freezer = _FREEZERS.get(model)
    masked = set(freezer.masked) if freezer is not None else set()
    return weight_decay_groups(model, masked, weight_decay)


# ---------------------------------------------------------------------------------------------
# exporting


class _HFTokenizerSaver:
    """export_model saves a tokenizer with `.save(dir)`: a Hugging Face tokenizer's save_pretrained."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def save(self, directory) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))


def export(model: torch.nn.Module, out_dir: Union[str, Path], *, tokenizer=None, keep_adapters: bool = False,
           probe=None, in_place: bool = False) -> dict:
    """Write `model` as a plain Hugging Face directory that ``AutoModelForCausalLM.from_pretrained``
    (``AutoModelForSeq2SeqLM`` for T5) reloads without widen: parallel paths merged into wider
    matrices, virtual layers made real, adapters merged (or kept in PEFT format under
    ``out_dir/adapter`` with `keep_adapters`). `tokenizer`: widen's (``"bytes"``) or a Hugging
    Face tokenizer, saved alongside. The export is reloaded and compared on `probe` (default
    ``probe_batch(model)``); returns the manifest (``widen_export.json``) with
    ``parity.max_abs_logit_delta``. The model you pass is left as it is (a copy is
    materialized) unless `in_place`."""
    from engine.exports import hf_directory as ex

    ex.quiet_transformers()
    batch = probe if probe is not None else probe_batch(model)
    reference = ex.reference_logits(model, batch)
    target = model if in_place else copy.deepcopy(model)
    saver = tokenizer if hasattr(tokenizer, "save") and not hasattr(tokenizer, "save_pretrained") \
        else _HFTokenizerSaver(tokenizer)
    manifest = ex.export_model(target, saver, out_dir, keep_adapters=keep_adapters, source={"api": "engine.export"})
    manifest["parity"] = {"max_abs_logit_delta": ex.verify_export(out_dir, batch, reference)}
    return manifest


# ---------------------------------------------------------------------------------------------
# task modules


class TaskModules(_TaskModules):
    """Task-specific modules from Python (engine.grow.task_modules.TaskModules with a directory):
    ``own(task, *reports)`` records what expansions added as `task`'s modules, ``switch(task)``
    turns on exactly its modules (None: all), ``save(task)`` / ``load(task)`` write and read
    ``<directory>/<task>.safetensors``. Only separate paths can belong to a task (``widen_ffn`` /
    ``widen_mlp`` with mode = "parallel", ``parallel_linear``, ``concat_linear``, ``lora``, ``ia3``);
    the first task may own nothing (the base)."""

    def __init__(self, model: torch.nn.Module | None = None, directory: Union[str, Path, None] = None):
        super().__init__(model)
        self.directory = Path(directory) if directory is not None else None

    def own(self, task: str, *reports: ExpandReport, shared: bool = False) -> dict:
        """Record what `reports` added as `task`'s modules (no reports: the task runs on the
        base). `shared`: additions that are not separate paths join the shared base instead of
        raising. Returns {"task", "modules", "adapters", "params"}."""
        return self.claim(task, self._model(None), _growth_of(list(reports)), allow_shared=shared)

    def switch(self, task: str | None) -> None:
        """Turn on exactly `task`'s modules (every other task's off; None: every module on)."""
        self.activate(self._model(None), task)

    def _path(self, task: str, path) -> Path:
        if path is not None:
            return Path(path)
        if self.directory is None:
            raise WidenError(f"TaskModules.save/load('{task}'): no directory — TaskModules(model, directory=...) "
                             "or pass path=")
        from engine.names import child_path

        return child_path(self.directory, task, ".safetensors")

    def save(self, task: str, path=None, model=None) -> Path:
        """`task`'s module tensors to `path` (default ``<directory>/<task>.safetensors``); returns the path."""
        target = self._path(task, path)
        super().save(task, target, model)
        return target

    def load(self, task: str, path=None, model=None) -> None:
        """Load `task`'s module tensors saved by ``save`` (strict: keys and shapes must match)."""
        super().load(task, self._path(task, path), model)

