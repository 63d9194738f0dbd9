"""Parameter preview: what each operator of a plan adds, from the model's config alone.

There is no second implementation of the operators here: the model is built from its config on
PyTorch's ``meta`` device (tensors with shapes and no storage, so a 7B model costs nothing) and
the plan's own operators run on it through ``engine.grow.apply.apply_stage(..., measure=False)``.
Parameters are counted as ``model.parameters()`` does (a tensor shared by virtual layers once),
the trainable count by the stage's freeze policy (``engine.grow.apply.Freezer``).

The dataclasses (``PlanPreview``, ``StagePreview``, ``OpPreview``) and their JSON form are
torch-free: the builder's process imports them, and gets the figures from the helper process
``engine.grow.preview_worker``, which runs ``preview_plan`` (torch is imported only there).

``operator_misfits`` runs the same operators in the order a run applies them (growths included,
each as often as the plan allows) and keeps what the engine refuses: ``widen plan check`` and
``widen run`` report it before any weight is loaded (engine.grow.operator_fit).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# Operators that read weight values (a std, a mean) in files that are not meta-safe yet: shown as
# "?" with this reason, not run (a run on meta would fail halfway through the model).
NOT_META_SAFE: dict[str, str] = {}  # ops the preview cannot run on meta yet, with the reason (none now)
UNMEASURED = " — `widen plan show` measures it"


@dataclass
class OpPreview:
    path: str                      # "stages.1.expand.0"
    op: str
    depth: dict                    # stack -> blocks before this operator
    added: int | None              # None: not previewed (invalid settings, or an op the preview cannot run)
    note: str = ""


@dataclass
class StagePreview:
    path: str                      # "stages.1" or "variants.0.stages.0"
    label: str
    variant: str | None
    total_before: int | None
    total_after: int | None
    trainable: int | None          # None: not known (the note says why)
    ops: list[OpPreview] = field(default_factory=list)
    note: str = ""

    @property
    def added(self) -> int | None:
        if self.total_before is None or self.total_after is None:
            return None
        return self.total_after - self.total_before

    @property
    def uncounted(self) -> int:
        """The stage's own operators the preview could not count: the figures leave them out."""
        return sum(1 for op in self.ops if op.added is None and ".grow." not in op.path)

    @property
    def share(self) -> float | None:
        if self.trainable is None or not self.total_after:
            return None
        return self.trainable / self.total_after


@dataclass
class PlanPreview:
    base_total: int | None
    stages: list[StagePreview] = field(default_factory=list)
    error: str = ""                # why nothing could be previewed (e.g. the model config), one line
    error_field: str = ""          # the [model] field at fault when the model could not load ("source")

    def op_depths(self) -> dict[str, dict]:
        return {op.path: op.depth for stage in self.stages for op in stage.ops}


# -- the JSON form (the helper's answers; never pickle) ---------------------------------------------


def to_json(preview: PlanPreview) -> dict:
    def op(o: OpPreview) -> dict:  # depth keys may be None (one stack): pairs, not an object
        return {"path": o.path, "op": o.op, "depth": [[k, v] for k, v in o.depth.items()], "added": o.added,
                "note": o.note}

    stages = [{"path": s.path, "label": s.label, "variant": s.variant, "total_before": s.total_before,
               "total_after": s.total_after, "trainable": s.trainable, "note": s.note,
               "ops": [op(o) for o in s.ops]} for s in preview.stages]
    return {"base_total": preview.base_total, "error": preview.error, "error_field": preview.error_field,
            "stages": stages}


def from_json(data: dict) -> PlanPreview:
    stages = []
    for s in data.get("stages", []):
        ops = [OpPreview(o["path"], o["op"], {k: v for k, v in o["depth"]}, o["added"], o.get("note", ""))
               for o in s.get("ops", [])]
        stages.append(StagePreview(s["path"], s["label"], s["variant"], s["total_before"], s["total_after"],
                                   s["trainable"], ops, s.get("note", "")))
    return PlanPreview(data.get("base_total"), stages, data.get("error", ""), data.get("error_field", ""))


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- the meta model (the helper process only: these import torch) ---------------------------------


@dataclass
class MetaModel:
    """A model on the meta device and its architecture view, as the plan grows it. The operators
    applied so far are journaled: an operator that fails halfway is undone by replaying them on a
    fresh build (rare), so the common path copies nothing."""

    model: object
    view: object
    spec: object                   # the ModelSpec and its (pristine) config it was built from
    config: object = None
    journal: list = field(default_factory=list)   # (stage path, stage index, ExpandSpec) applied
    stage: str = ""                                # the stage being previewed ...
    results: list = field(default_factory=list)   # ... and its OpResults (freeze = "base" trains them)

    def begin(self, stage: str) -> None:
        self.stage, self.results = stage, []

    def apply(self, stage_index: int, spec, generator):
        from engine.grow.apply import apply_stage

        growth = apply_stage(self.model, self.view, stage_index, [spec], None, generator, measure=False)
        self.journal.append((self.stage, stage_index, spec))
        self.results += growth.results
        return growth

    def layout(self) -> tuple:
        """Which modules and tensors the model holds (identity and shape): what an operator that
        fails halfway would have changed."""
        return (tuple((name, id(m)) for name, m in self.model.named_modules()),
                tuple((name, id(p), tuple(p.shape)) for name, p in self.model.named_parameters()))

    def rebuilt(self) -> "MetaModel":
        """The same model built again from its config and the journal (after a failed operator)."""
        from engine.grow.apply import op_generator

        fresh = meta_model(self.spec, self.config)
        for stage, index, spec in self.journal:
            if stage != fresh.stage:
                fresh.begin(stage)
            fresh.apply(index, spec, op_generator(0, index))
        if fresh.stage != self.stage:
            fresh.begin(self.stage)
        return fresh

    def clone(self) -> "MetaModel":
        # one memo: the copied view and results hold the copied model's tensors
        model, view, results = copy.deepcopy((self.model, self.view, self.results))
        return MetaModel(model, view, self.spec, self.config, list(self.journal), self.stage, results)

    def total(self) -> int:
        from engine.model.view import count_params

        return count_params(self.model)

    def depths(self) -> dict:
        return {stack.stack: stack.num_layers for stack in self.view.stacks()}


def meta_model(spec, config=None) -> MetaModel:
    """The plan's model (a ModelSpec) built from its config with no storage. `config`: the config
    already loaded for `spec` (the helper caches it); it is copied, since operators change it.
    Built-ins, local directories and hub names take the same path: config only, no weights."""
    import torch
    import transformers

    from engine.model.sources import BUILTIN_MLPS, ModelLoadError, build_builtin_mlp, check_module_tree, load_config
    from engine.model.view import ArchView, UnsupportedArchitecture

    name = spec.source.removeprefix("builtin:")
    if spec.source.startswith("builtin:") and name in BUILTIN_MLPS:
        with torch.device("meta"):
            model = build_builtin_mlp(name, 0)
        return MetaModel(model, ArchView.of(model), spec)
    pristine = config if config is not None else load_config(spec)
    config = copy.deepcopy(pristine)
    try:
        kind = ArchView(config).family.kind
    except UnsupportedArchitecture as e:
        raise ModelLoadError(str(e)) from None
    auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    view = ArchView(model.config, model)
    check_module_tree(model, view)
    return MetaModel(model, view, spec, pristine)


@dataclass
class Applied:
    """One raw operator table tried on the meta model."""

    state: MetaModel               # the model after it (as before it when it failed)
    added: int | None = None       # parameters it added; None: not applied
    note: str = ""
    refusal: str = ""              # the engine refused it here (OperatorError): the operator's own message


def _apply_op(state: MetaModel, raw, stage_index: int, generator, in_growth: bool = False) -> Applied:
    """One raw operator table on `state`. A failure leaves the model as it was, so the later
    operators still apply. `in_growth`: the op takes its [stages.grow] defaults, as in a run."""
    from pydantic import ValidationError

    from engine.grow.apply import OperatorError
    from engine.ops.params import OPS
    from engine.plan import ExpandSpec

    name = raw.get("op") if isinstance(raw, dict) else None
    if name not in OPS:
        return Applied(state, note="unknown op")
    try:
        spec = ExpandSpec.model_validate(raw)
        if in_growth:  # engine.plan.GrowSpec gives a growth's operators these defaults
            spec = ExpandSpec.model_validate({**raw, **spec.params().growth_defaults()})
        spec.params()
    except ValidationError:
        return Applied(state, note="invalid settings")
    if name in NOT_META_SAFE:
        return Applied(state, note=NOT_META_SAFE[name] + UNMEASURED)
    before, layout = state.total(), state.layout()
    try:
        growth = state.apply(stage_index, spec, generator)
    except OperatorError as e:  # "stage i: op: why": the why
        why = one_line(e).split(": ", 2)[-1]
        # operators refuse before they change anything; rebuilt (replayed) only when one did not
        return Applied(state if state.layout() == layout else state.rebuilt(), note=why, refusal=why)
    except Exception as e:  # noqa: BLE001 - an operator that cannot run on meta: one line, keep going
        return Applied(state.rebuilt(), note=f"not previewed ({one_line(e)[:120]}){UNMEASURED}")
    return Applied(state, state.total() - before, "; ".join(r.note for r in growth.results if r.note))


def _trainable(state: MetaModel, freeze) -> tuple[int | None, str]:
    """Entries that train under the stage's freeze policy, as a run counts them."""
    from engine.grow.apply import Freezer, StageGrowth

    if not (freeze in ("none", "base") or (isinstance(freeze, list) and all(isinstance(g, str) for g in freeze))):
        return None, "freeze: invalid"
    freezer = Freezer()
    try:
        freezer.apply(state.model, freeze, StageGrowth(state.results))
        if any(mask.is_meta for mask in freezer.masked.values()):
            return None, "trainable: an operator's new-entry masks have no values on meta"
        return freezer.trainable(state.model), ""
    finally:
        freezer.apply(state.model, "none", None)  # drop the gradient hooks


def _stage_label(stage: dict, index: int) -> str:
    return str(stage.get("name") or f"{index + 1}:{stage.get('task', '?')}")


def _preview_stages(state: MetaModel, stages: list, where: str, variant: str | None, offset: int,
                    seed: int) -> tuple[MetaModel, list[StagePreview]]:
    from engine.grow.apply import op_generator
    from engine.grow.growth import growth_generator

    out = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        index, path = offset + i, f"{where}.{i}"
        preview = StagePreview(path, _stage_label(stage, index), variant, state.total(), None, None)
        generator = op_generator(seed, index)
        state.begin(path)
        ops = stage.get("expand") if isinstance(stage.get("expand"), list) else []
        for j, raw in enumerate(ops):
            depth = state.depths()
            applied = _apply_op(state, raw, index, generator)
            state = applied.state
            preview.ops.append(OpPreview(f"{path}.expand.{j}", _op_name(raw), depth, applied.added, applied.note))
        preview.total_after = state.total()
        preview.trainable, preview.note = _trainable(state, stage.get("freeze", "none"))
        grow = stage.get("grow")
        if isinstance(grow, dict) and isinstance(grow.get("expand"), list):
            # mid-stage, when the trigger fires: shown per growth, not counted in the stage's figures
            from engine.plan import growth_count

            most, trigger = growth_count(grow), grow.get("trigger", "plateau")
            when = {"at": "at the stage's points", "budget": "at the budget's shares"}.get(
                trigger if isinstance(trigger, str) else "", "on a plateau")
            each = f"per growth, up to {most} growth{'s' * (most != 1)} ({when})"
            trial, generator = state.clone(), growth_generator(seed, index, 0)
            for j, raw in enumerate(grow["expand"]):
                depth = trial.depths()
                applied = _apply_op(trial, raw, index, generator, in_growth=True)
                trial = applied.state
                preview.ops.append(OpPreview(f"{path}.grow.expand.{j}", _op_name(raw), depth, applied.added,
                                             each + (f"; {applied.note}" if applied.note else "")))
        out.append(preview)
    return state, out


def _built(model_raw, load_config=None) -> MetaModel:
    """The meta model of a raw [model] table (ValidationError, ModelLoadError: it cannot build)."""
    from engine.model.sources import BUILTIN_MLPS
    from engine.plan import ModelSpec

    spec = ModelSpec.model_validate(model_raw or {})
    mlp = spec.source.removeprefix("builtin:") in BUILTIN_MLPS and spec.source.startswith("builtin:")
    return meta_model(spec, None if mlp or load_config is None else load_config(spec))


def _op_name(raw) -> str:
    return str(raw.get("op", "?")) if isinstance(raw, dict) else "?"


def preview_plan(raw: dict, load_config=None) -> PlanPreview:
    """Preview every stage of a raw plan dict (shared stages, then each variant's own); lenient:
    invalid parts are skipped, never raised. `load_config(spec)` returns the spec's config
    (default: engine.model.sources.load_config; the helper passes a cached one)."""
    from pydantic import ValidationError

    from engine.model.sources import ModelLoadError

    def build(model_raw) -> MetaModel:
        return _built(model_raw, load_config)

    if not isinstance(raw, dict):
        return PlanPreview(None, error="the plan is not a table")
    try:
        state = build(raw.get("model"))
    except ValidationError as e:
        return PlanPreview(None, error=f"model: {one_line(e)}")
    except ModelLoadError as e:
        return PlanPreview(None, error=one_line(e), error_field=e.field)
    except Exception as e:  # noqa: BLE001 - a config that cannot build: the plan check names it
        return PlanPreview(None, error=one_line(e))
    seed = raw.get("seed") if isinstance(raw.get("seed"), int) else 0
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    result = PlanPreview(state.total())
    after_shared, stages = _preview_stages(state, shared, "stages", None, 0, seed)
    result.stages += stages
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    for v, variant in enumerate(variants):
        if not isinstance(variant, dict):
            continue
        name = str(variant.get("name", v))
        if variant.get("model") is not None:
            try:
                own, _ = _preview_stages(build(variant["model"]), shared, "stages", name, 0, seed)
            except Exception:  # noqa: BLE001 - the plan check names the variant's model
                continue
        else:
            own = after_shared.clone()
        vstages = variant.get("stages") if isinstance(variant.get("stages"), list) else []
        result.stages += _preview_stages(own, vstages, f"variants.{v}.stages", name, len(shared), seed)[1]
    return result


# -- misfits: what the engine would refuse, found before any weight is loaded ----------------------


@dataclass
class Misfit:
    """An operator the engine refuses at its point of the plan (its OperatorError)."""

    path: str                      # the operator's table: "stages.1.expand.2", "stages.0.grow.expand.0"
    op: str
    reason: str                    # the operator's own message, one line ("size: ... — fix")
    when: str = ""                 # "at growth 2 of up to 3", "on variants.0.model": where the plan gets there


def operator_misfits(raw: dict, load_config=None) -> list[Misfit]:
    """Every operator of a raw plan dict applied to its model on the meta device, in the order a
    run applies them: each stage's operators, then its [stages.grow] operators once per growth
    the plan allows (a run may grow that often, and the next stage starts from the grown model);
    the shared stages, then each variant's own (on the variant's model when it names one). One
    Misfit per operator the engine refuses (first refusal only); the model stays as it was before
    it, so the later operators are still checked. Lenient like ``preview_plan``: a model that
    cannot build, an unknown op or invalid settings are skipped (the other checks name them).

    Only the operators' own refusals (OperatorError) count. Anything else raised on meta would be
    an artifact of tensors without values, so it is not reported: the operators skip their
    value-dependent work on meta (``shapes_only``, ``is_meta``: a std, a mean gain), and
    apply_stage measures nothing here (measure=False: no probe, no health figures). The fuzz test
    (tests/engine/plan/test_operator_fit_fuzz.py) holds this to the real run both ways."""
    if not isinstance(raw, dict):
        return []
    try:
        state = _built(raw.get("model"), load_config)
    except Exception:  # noqa: BLE001 - a model that cannot build: check_model_fields names it
        return []
    shared = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    variants = raw.get("variants") if isinstance(raw.get("variants"), list) else []
    misfits: list[Misfit] = []
    after_shared = _fit_stages(state, shared, "stages", 0, "", misfits)
    for v, variant in enumerate(variants):
        if not isinstance(variant, dict):
            continue
        if variant.get("model") is not None:  # the shared stages again, on the variant's own model
            label = f"on variants.{v}.model"
            try:
                own = _built(variant["model"], load_config)
            except Exception:  # noqa: BLE001 - a model that cannot build: check_model_fields names it
                continue
            own = _fit_stages(own, shared, "stages", 0, label, misfits)
        else:
            label, own = "", after_shared.clone()
        stages = variant.get("stages") if isinstance(variant.get("stages"), list) else []
        _fit_stages(own, stages, f"variants.{v}.stages", len(shared), label, misfits)
    first: dict[str, Misfit] = {}
    for misfit in misfits:
        first.setdefault(misfit.path, misfit)
    return list(first.values())


def _fit_stages(state: MetaModel, stages: list, where: str, offset: int, label: str,
                misfits: list[Misfit]) -> MetaModel:
    """Apply `stages` to `state` as a run does, adding a Misfit for each refused operator. Seed 0:
    meta tensors hold no draws, so a fit cannot depend on them (nor on a seed the schema refuses)."""
    from engine.grow.apply import op_generator
    from engine.grow.growth import growth_generator
    from engine.plan import growth_count

    seed = 0

    def run(ops: list, path: str, index: int, generator, when: str, in_growth: bool = False) -> bool:
        nonlocal state
        refused = False
        for j, raw in enumerate(ops):
            applied = _apply_op(state, raw, index, generator, in_growth)
            state = applied.state
            if applied.refusal:
                misfits.append(Misfit(f"{path}.{j}", _op_name(raw), applied.refusal, when))
                refused = True
        return refused

    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        index, path = offset + i, f"{where}.{i}"
        state.begin(path)
        ops = stage.get("expand") if isinstance(stage.get("expand"), list) else []
        run(ops, f"{path}.expand", index, op_generator(seed, index), label)
        grow = stage.get("grow")
        if isinstance(grow, dict) and isinstance(grow.get("expand"), list):
            most = growth_count(grow)
            for g in range(most):
                when = ", ".join(x for x in (f"at growth {g + 1} of up to {most}" if most > 1 else "", label) if x)
                if run(grow["expand"], f"{path}.grow.expand", index, growth_generator(seed, index, g), when, True):
                    break  # one refusal per growth operator: the later growths would repeat it
    return state
