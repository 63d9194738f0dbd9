"""`plan check` applies the plan's operators to the model built on the meta device, in the order a
run applies them, and reports what the engine would refuse only after loading the weights: one
line on the operator's field (engine.grow.operator_fit)."""

from __future__ import annotations

import json

import pytest

from engine.grow.operator_fit import has_operators, operator_fit_problems
from engine.grow.operator_fit import validate_plan_file as validate_file
from engine.runs.events import read_all
from engine.runs.records import StartEvent
from engine.runs.rundir import RunDir
from tests.conftest import ROOT, wait_for, widen

QUICKSTART = ROOT / "experiments" / "quickstart.toml"
PARALLEL_THEN_HIDDEN = [{"op": "widen_ffn", "size": 8, "mode": "parallel"}, {"op": "widen_hidden", "size": 128}]
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def plan(*stage_ops, source: str = "builtin:tiny-neo", grow: dict | None = None, **more) -> dict:
    """A plan of one stage per list of operators; `grow`: the last stage's [stages.grow]."""
    stages = [{"task": "t", "steps": 4, "expand": list(ops)} for ops in stage_ops]
    if grow is not None:
        stages[-1]["grow"] = grow
    return {"name": "fit", "model": {"source": source}, "tasks": {"t": {"source": "builtin:pydoc"}},
            "stages": stages, **more}


def problems_of(raw: dict) -> list[str]:
    return [str(p) for p in operator_fit_problems(raw)]


def assert_one(problems: list[str], field: str, *fragments: str) -> None:
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}: "), problems[0]
    assert " — " in problems[0] and "\n" not in problems[0], problems[0]
    for fragment in fragments:
        assert fragment in problems[0], problems[0]


def test_widen_hidden_after_a_parallel_widen_ffn_is_refused_on_its_op():
    assert_one(problems_of(plan(PARALLEL_THEN_HIDDEN)), "stages.0.expand.1.op",
               "parallel path", "put widen_hidden before it in the plan")
    # in the next stage, and after a growth that added the parallel path: the same refusal
    later = plan([{"op": "widen_ffn", "size": 8}], [{"op": "widen_hidden", "size": 128}])
    assert_one(problems_of(later), "stages.1.expand.0.op", "parallel path")
    grown = plan([], [{"op": "widen_hidden", "size": 128}])
    grown["stages"][0]["grow"] = {"trigger": "at", "at_steps": [1], "expand": [{"op": "widen_ffn", "size": 8}]}
    assert_one(problems_of(grown), "stages.1.expand.0.op", "parallel path")
    # widen_hidden first, or the in-place widen_ffn: the plan fits
    assert problems_of(plan(PARALLEL_THEN_HIDDEN[::-1])) == []
    assert problems_of(plan([{**PARALLEL_THEN_HIDDEN[0], "mode": "inplace"}, PARALLEL_THEN_HIDDEN[1]])) == []


def test_a_size_that_is_not_whole_heads_is_refused_on_size(tmp_path):
    # GPT-Neo derives head_dim from d_model (128 = 4 heads of 32): new dimensions are whole heads
    assert_one(problems_of(plan([{"op": "widen_hidden", "size": 7, "init": "zero"}])), "stages.0.expand.0.size",
               "multiple of head_dim 32")
    # duplicate makes whole copies of d_model: on a Llama config directory (no weights) as well
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert_one(problems_of(plan([{"op": "widen_hidden", "size": 48}], source=str(tmp_path))),
               "stages.0.expand.0.size", "multiple")
    # add_heads on grouped-query attention: whole groups of query heads
    assert_one(problems_of(plan([{"op": "add_heads", "size": 3}], source=str(tmp_path))),
               "stages.0.expand.0.size", "GQA group size 2")


def test_a_module_that_does_not_exist_is_refused_on_modules():
    assert_one(problems_of(plan([{"op": "parallel_linear", "modules": ["mlp.nope"]}])),
               "stages.0.expand.0.modules", "no module 'mlp.nope'")


def test_two_adapters_with_one_name_are_refused_on_name():
    twice = [{"op": "lora", "name": "shared", "layers": [0]}, {"op": "lora", "name": "shared", "layers": [0]}]
    assert_one(problems_of(plan(twice)), "stages.0.expand.1.name", "adapter 'shared' already exists")
    # one name on other layers joins the same adapter; other settings under it do not
    assert problems_of(plan([twice[0], {**twice[1], "layers": [1]}])) == []
    assert_one(problems_of(plan([twice[0], {**twice[1], "layers": [1], "r": 4}])), "stages.0.expand.1.r",
               "already has r = 8")


def test_a_growth_that_misfits_only_when_repeated_names_the_growth():
    grow = {"trigger": "at", "at_steps": [1, 2], "expand": [{"op": "widen_hidden", "size": 128, "init": "zero"},
                                                             {"op": "widen_ffn", "size": 8}]}
    assert_one(problems_of(plan([], grow=grow)), "stages.0.grow.expand.0.op", "at growth 2 of up to 2",
               "parallel path")


def test_variants_are_checked_from_the_shared_stages_on():
    raw = plan([{"op": "widen_ffn", "size": 8}], variants=[
        {"name": "deeper", "stages": [{"task": "t", "steps": 4, "expand": [{"op": "insert_identity"}]}]},
        {"name": "wider", "stages": [{"task": "t", "steps": 4, "expand": [{"op": "widen_hidden", "size": 128}]}]}])
    assert_one(problems_of(raw), "variants.1.stages.0.expand.0.op", "parallel path")


def test_one_line_per_operator_and_a_fitting_plan_passes():
    """An operator the config checks already named is not named again; the shipped plans pass."""
    _, problems = validate_file(QUICKSTART, ["stages.1.expand.0.layers=[0, 99]"])
    assert [p.path for p in problems] == ["stages.1.expand.0.layers"]
    assert validate_file(QUICKSTART)[1] == []


def test_a_plan_without_operators_builds_nothing():
    """No model to build, so no torch (test_plan_bounds.py: test_cpu_plan_check_does_not_import_torch)."""
    assert not has_operators(plan([]) | {"variants": [{"name": "v", "stages": [{"task": "t", "expand": []}]}]})
    assert has_operators({"variants": [{"name": "v", "stages": [{"grow": {"expand": [{"op": "unshare"}]}}]}]})
    assert not has_operators({"stages": "x", "variants": [3]})


@pytest.mark.slow
def test_widen_run_refuses_the_misfit_before_launching(tmp_path, widen_home):
    """The CLI's one check: `widen run` prints the problem and starts nothing (no run directory)."""
    path = misfit_plan(tmp_path)
    proc = widen("run", str(path), env_home=widen_home)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stages.1.expand.1.op: " in proc.stderr and "parallel path" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not widen_home.exists() or not any(p.is_dir() and not p.name.startswith(".") for p in widen_home.iterdir())


@pytest.mark.slow
def test_a_detached_misfit_fails_in_its_worker_before_loading(tmp_path, widen_home):
    """`--detach` returns at once (no torch in the CLI): the worker makes the same check first, and
    the run fails on the operator's field before any model is loaded (no `start` event)."""
    proc = widen("run", str(misfit_plan(tmp_path)), "--detach", env_home=widen_home, check=True)
    run = RunDir(widen_home / proc.stdout.strip())
    assert wait_for(run, ("done", "failed", "lost")) == "failed"
    error = run.status()["error"]
    assert error.startswith("stages.1.expand.1.op: ") and "parallel path" in error, error
    assert not any(isinstance(e, StartEvent) for e in read_all(run.events)) if run.events.exists() else True


def misfit_plan(tmp_path):
    path = tmp_path / "misfit.toml"
    path.write_text(QUICKSTART.read_text() + "\n[[stages.expand]]\nop = \"widen_hidden\"\nsize = 128\n")
    return path
