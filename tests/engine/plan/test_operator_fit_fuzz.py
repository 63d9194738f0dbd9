"""Property: when `widen plan check` passes a plan, a run applies every one of its operators (each
stage's, then each growth's) without an error; when a run would fail at an operator, the check
names that operator; and when the check refuses operators, the run does fail (no false alarm
from the meta device).

Plans are short random operator orders on a tiny model of every family (engine.model.families),
over every registered operator that applies to the family's kind (engine.ops.params.OPS); each
operator's settings are drawn from its own schema (small sizes, the literal choices, layer lists,
role and module names, some that do not exist). The run's side is the engine's own: the model
loaded by ``load_model`` and the operators applied, measured, by ``apply_stage`` and
``grow_model`` as a run's stages and growths apply them (a `widen run` subprocess per example would
take minutes). ``WIDEN_FIT_EXAMPLES`` raises the number of examples for a longer search.
"""

from __future__ import annotations

import copy
import math
import os
import types
import typing
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from engine.grow.operator_fit import validate_plan_file as validate_file
from engine.model.families import FAMILIES
from engine.ops.params import ADAPTER_ROLES, OPS
from engine.plan import PlanError, plan_from_dict
from tests.tiny_models import VOCAB, tiny_config

EXAMPLES = int(os.environ.get("WIDEN_FIT_EXAMPLES", "60"))  # 10-15 s on 2 cores
LAYERS = 4  # blocks of every tiny model (T5: each stack)

SPECIAL = {  # keys whose values depend on the model, not on their type alone (see _special)
    "layers": st.one_of(st.just("all"), st.lists(st.integers(0, LAYERS - 1), min_size=1, max_size=3, unique=True)),
    "feedforward": st.lists(st.sampled_from(ADAPTER_ROLES), min_size=1, max_size=2, unique=True),
    "mapping": st.lists(st.integers(0, LAYERS - 1), min_size=1, max_size=7),
    "name": st.sampled_from(["a", "b"]),
    "kinds": st.sampled_from(["real", "virtual"]),
    # depth multipliers kept small: a few operators must not make a tiny model thousands of blocks deep
    "k": st.sampled_from([2, 3]),
    "repeat": st.sampled_from([2, 3]),
    "copies": st.sampled_from([2, 3]),
    "drop": st.sampled_from([0, 1, 2, 4]),
}
INTS = [1, 2, 3, 4, 6, 8, 16, 32]  # sizes: some whole heads (4), whole d_model (16) or groups, some not
FLOATS = [0.0, 0.01, 0.1, 0.5, 0.9]


# ---------------------------------------------------------------------------------------------
# operator tables from each operator's schema


def _bounds(field) -> tuple[float, float]:
    """The range a number field takes, both ends included (an open end moved just inside)."""
    low, high = -math.inf, math.inf
    for item in field.metadata:  # annotated_types' Ge, Gt, Le, Lt: one bound each
        if getattr(item, "ge", None) is not None:
            low = item.ge
        if getattr(item, "gt", None) is not None:
            low = item.gt + 1e-9
        if getattr(item, "le", None) is not None:
            high = item.le
        if getattr(item, "lt", None) is not None:
            high = item.lt - 1e-9
    return low, high


def _plain(annotation):
    """The annotation without None and Annotated wrappers."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _plain(args[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return _plain(args[0])
    return annotation


def _module_names(family) -> list:
    """Names a plan may give a Linear of `family`: its roles and dotted paths, one that no block
    has; indices for an nn.Sequential."""
    if family.kind == "mlp":
        return [0, 1, 2, 3]
    ffn, attention, moe = family.ffn, family.attention, family.moe
    paths = [f"{attention.module}.{attention.q or attention.qkv}"]
    if ffn:  # a dense FFN (MoE families: where some blocks have one)
        paths += [f"{ffn.module}.{ffn.up}", f"{ffn.module}.{ffn.down}"]
    if moe:  # the router and fused experts: no Linears; an expert tensor (LoRA only)
        paths += [f"{moe.module}.{moe.router}", f"{moe.module}.{moe.experts}", f"{moe.module}.{moe.down}"]
    return [*ADAPTER_ROLES, *paths, "mlp.nope"]


def _special(family) -> dict:
    names = _module_names(family)
    stacks = [stack.name for stack in family.stacks]
    return {**SPECIAL, "modules": st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True),
            "stack": st.sampled_from(stacks) if stacks else st.nothing()}


def _values(name: str, field, special: dict):
    """Values for one key of an operator's table: the key's own choices and bounds, kept small."""
    if name in special:
        return special[name]
    kind = _plain(field.annotation)
    if typing.get_origin(kind) is typing.Literal:
        return st.sampled_from(typing.get_args(kind))
    if isinstance(kind, type) and issubclass(kind, BaseModel):  # keep_ends, dus: a small table
        return st.fixed_dictionaries({k: _values(k, f, special) for k, f in kind.model_fields.items()})
    low, high = _bounds(field)
    if kind is int:
        return st.sampled_from([v for v in INTS if low <= v <= high] or [int(low)])
    if kind is float:
        return st.sampled_from([v for v in FLOATS if low <= v <= high] or [low])
    return st.nothing()


@st.composite
def op_tables(draw, family) -> dict | None:
    """One [[stages.expand]] table for an operator that applies to `family`'s kind of model, with
    the required keys, `modules` and some other optional ones (settings that do not go together
    are dropped, down to the required keys); None when even those do not validate together."""
    op = draw(st.sampled_from([name for name, d in OPS.items() if family.kind in d.model_kinds]))
    schema, special = OPS[op].schema, _special(family)
    table = {"op": op}
    for key, field in schema.model_fields.items():
        if key == "stack" and not family.stacks:
            continue
        if key != "op" and (field.is_required() or key == "modules" or draw(st.integers(0, 3)) == 0):
            table[key] = draw(_values(key, field, special))
    for keep in (table, {k: v for k, v in table.items() if k == "op" or schema.model_fields[k].is_required()}):
        try:
            schema.model_validate(keep)
            return keep
        except ValidationError:
            continue
    return None


def _op_list(draw, family, most: int) -> list[dict]:
    return [t for t in draw(st.lists(op_tables(family), min_size=1, max_size=most)) if t is not None]


@st.composite
def plans(draw) -> tuple[str, list[dict]]:
    """(family, stages): 1-2 stages of 1-4 operators, the last one maybe growing 1-2 times."""
    family = draw(st.sampled_from(FAMILIES))
    stages = [{"task": "t", "steps": 4, "expand": _op_list(draw, family, 4)} for _ in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        stages[-1]["grow"] = {"trigger": "at", "at_steps": [1, 2][:draw(st.integers(1, 2))],
                              "expand": _op_list(draw, family, 2)}
        if not stages[-1]["grow"]["expand"]:
            del stages[-1]["grow"]
    return family.name, stages


# ---------------------------------------------------------------------------------------------
# the tiny models, and a run's operators on them


def _save_tiny(family: str, path: Path) -> str:
    """A tiny random model of `family` saved with its weights; its plan source."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, T5Config

    if family == "mlp":
        return "builtin:mlp"
    torch.manual_seed(0)
    if family == "t5":
        config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=LAYERS, num_decoder_layers=LAYERS,
                          num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(family, LAYERS, 4, 4, 24))
    model.save_pretrained(path / family)
    return str(path / family)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """family -> (plan source, the model as the engine loads it, its view), built on first use."""
    from engine.model.sources import load_model
    from engine.plan import ModelSpec

    root, loaded = tmp_path_factory.mktemp("fit-models"), {}

    def get(family: str):
        if family not in loaded:
            source = _save_tiny(family, root)
            loaded[family] = (source, *load_model(ModelSpec(source=source), seed=0))
        return loaded[family]

    return get


def apply_as_a_run(plan, model, view) -> tuple[str | None, Exception | None]:
    """Each stage's operators, then each of its growths, measured on a probe batch as a run does
    (one operator per call, the stage's generator going on: the same draws as the run's one call
    with the list). Returns the plan path of the first operator that fails and its error, or
    (None, None)."""
    from engine.grow.apply import apply_stage, op_generator
    from engine.grow.growth import grow_model, growth_generator

    vocab = 259 if view.family.kind == "mlp" else VOCAB
    tokens = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    probe = (tokens, torch.roll(tokens, -1, 1))
    for index, stage in enumerate(plan.stages):
        generator = op_generator(plan.seed, index)
        for j, spec in enumerate(stage.expand):
            try:
                apply_stage(model, view, index, [spec], probe, generator)
            except Exception as e:  # noqa: BLE001 - what the run would stop on
                return f"stages.{index}.expand.{j}", e
        for g in range(stage.grow.max_growths if stage.grow else 0):
            generator = growth_generator(plan.seed, index, g)
            for j, spec in enumerate(stage.grow.expand):
                try:
                    grow_model(model, view, [spec], index, g, probe, generator)
                except Exception as e:  # noqa: BLE001
                    return f"stages.{index}.grow.expand.{j}", e
    return None, None


def _plan(source: str, stages: list[dict]) -> dict:
    return {"name": "fit", "seed": 1, "model": {"source": source, "tokenizer": "bytes"},
            "tasks": {"t": {"source": "builtin:pydoc"}}, "train": {"device": "cpu", "seq_len": 16}, "stages": stages}


# ---------------------------------------------------------------------------------------------
# the property


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(case=plans())
def test_a_checked_plan_applies_every_operator_in_a_run(case, tmp_path, tiny_models):
    family, stages = case
    source, model, view = tiny_models(family)
    raw = _plan(source, stages)
    path = tmp_path / "plan.toml"
    path.write_text(tomli_w.dumps(raw))
    _, problems = validate_file(path)
    described = f"{family}: {stages}"
    for problem in problems:
        assert "\n" not in str(problem) and "Traceback" not in str(problem), (described, str(problem))
    try:
        plan = plan_from_dict(raw)
    except PlanError:
        return  # refused before any operator (not drawn here, but a cross check may find something)
    failed_at, error = apply_as_a_run(plan, *copy.deepcopy((model, view)))
    named = [p.path for p in problems]
    if failed_at is None:
        assert not named, f"{described}\nthe check refused operators the run applies: {[str(p) for p in problems]}"
    else:  # the first operator the run fails at is one the check names (it would never have launched)
        assert any(path.startswith(f"{failed_at}.") for path in named), \
            f"{described}\nthe run fails at {failed_at} ({error!r}) but the check names only {named}"
