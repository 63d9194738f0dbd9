"""Plan validation: every problem on one line with its field path; `--set` overrides."""

from __future__ import annotations

import pytest

from engine.plan import PlanError, apply_overrides, load_plan, parse_override, validate_file
from tests.conftest import ROOT, widen

QUICKSTART = ROOT / "experiments" / "quickstart.toml"


def problems_of(path, *overrides):
    plan, problems = validate_file(path, list(overrides))
    return plan, [str(p) for p in problems]


def test_quickstart_is_valid():
    plan, problems = problems_of(QUICKSTART)
    assert problems == []
    assert plan.stages[1].expand[0].params().size == 128


def test_every_problem_is_reported_with_its_field():
    _, problems = problems_of(QUICKSTART, "stages.1.expand.0.layers=[0, 99]", "stages.1.expand.0.size=-3",
                              "train.bogus=1", "stages.0.task=nope", "train.device=tpu")
    text = "\n".join(problems)
    assert "stages.1.expand.0.layers: layer 99 out of range" in text
    assert "stages.1.expand.0.size: must be greater than 0, got -3" in text
    assert "train.bogus: unknown key" in text
    assert "stages.0.task: unknown task 'nope'" in text and "prose, python" in text
    assert "train.device: must be 'auto', 'cpu' or 'cuda', got 'tpu'" in text
    assert len(problems) == 5


def test_unknown_op_and_misspelt_key_get_suggestions():
    _, problems = problems_of(QUICKSTART, "stages.1.expand.0.op=widen_fn")
    assert problems == ["stages.1.expand.0.op: unknown op 'widen_fn' — did you mean 'widen_ffn'?"]
    _, problems = problems_of(QUICKSTART, "train.batchsize=3")
    assert problems == ["train.batchsize: unknown key — did you mean 'batch_size'?"]
    _, problems = problems_of(QUICKSTART, "stages.1.expand.0.inti=zeros")
    assert problems == ["stages.1.expand.0.inti: unknown key — did you mean 'init'?"]


def test_op_specific_rules():
    _, problems = problems_of(QUICKSTART, "stages.1.expand.0.init=net2net")
    assert len(problems) == 1 and "mode = \"inplace\"" in problems[0]
    _, problems = problems_of(QUICKSTART, "stages.1.expand.0.init=net2net", "stages.1.expand.0.mode=inplace")
    assert problems == []
    _, problems = problems_of(QUICKSTART, "stages.1.expand.0.layers=[1, 1]")
    assert problems == ["stages.1.expand.0.layers: layer indices repeat: [1, 1]"]


def test_unknown_model_is_a_field_error():
    _, problems = problems_of(QUICKSTART, "model.source=builtin:nope")
    from engine.model.sources import BUILTIN_MLPS, BUILTIN_MODELS

    names = ", ".join(f"builtin:{n}" for n in [*BUILTIN_MODELS, *BUILTIN_MLPS])
    assert "builtin:tiny-neo-small" in names and "builtin:mlp" in names
    assert problems == [f"model.source: unknown built-in model 'nope' — built-in models: {names}"]


def test_missing_required_fields(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\n[[stages]]\nsteps = 3\n')
    _, problems = problems_of(path)
    assert "tasks: is required — add it" in problems
    assert "stages.0.task: is required — add it" in problems


def test_toml_syntax_error_and_missing_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x\n')
    _, problems = problems_of(path)
    assert len(problems) == 1 and "TOML syntax error" in problems[0]
    _, problems = problems_of(tmp_path / "absent.toml")
    assert "no such plan file" in problems[0]


def test_overrides():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("stages.0.expand.0.layers=[0, 2]") == ("stages.0.expand.0.layers", [0, 2])
    assert parse_override("model.source=builtin:tiny-neo") == ("model.source", "builtin:tiny-neo")
    raw = {"stages": [{"steps": 1}, {"steps": 2}], "train": {}}
    out = apply_overrides(raw, ["stages.1.steps=30", "train.lr=0.5", "new.key=1"])
    assert out["stages"][1]["steps"] == 30 and out["train"]["lr"] == 0.5 and out["new"]["key"] == 1
    assert raw["stages"][1]["steps"] == 2  # the input is not modified
    with pytest.raises(PlanError, match="has 2 items"):
        apply_overrides(raw, ["stages.5.steps=1"])
    with pytest.raises(PlanError, match="key.path=value"):
        apply_overrides(raw, ["stages"])


def test_resolved_plan_round_trips(tmp_path):
    plan = load_plan(QUICKSTART, ["stages.0.steps=7"], seed=11)
    path = tmp_path / "resolved.toml"
    path.write_text(plan.to_toml())
    again = load_plan(path)
    assert again == plan and again.seed == 11 and again.stages[0].steps == 7


def test_plan_check_cli(tmp_path):
    ok = widen("plan", "check", str(QUICKSTART), env_home=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(QUICKSTART.read_text().replace('layers = "all"', "layers = [0, 99]")
                   .replace("size = 128", "size = -1"))
    out = widen("plan", "check", str(bad), "--set", "stages.1.expand.0.init=bogus", env_home=tmp_path)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, out.stderr
    assert any("layers: layer 99" in line for line in lines)
    assert any("size: must be greater than 0" in line for line in lines)
    assert any("init: must be" in line for line in lines)
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_start_up_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, runpy; sys.argv = ['widen', '--help']\n"
            "try:\n    runpy.run_module('widen_tui.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "widen" in proc.stdout


@pytest.mark.parametrize("change, field", [
    ({"task_modules": True, "stages": [{"task": "t", "steps": 2},
                                       {"task": "t", "steps": 2, "freeze": "base", "expand": ["lora"]}]},
     "stages.1.expand.0"),
    ({"stages": [{"task": "t", "steps": 4, "grow": {"trigger": ["at"], "expand": [{"op": "widen_ffn", "size": 4}]}}]},
     "stages.0.grow.trigger"),
])
def test_malformed_tables_get_one_line_not_a_traceback(change, field):
    """An expand entry that is not a table (under task_modules) and a trigger that is a list used to
    crash the cross-checks with a TypeError before the schema could name the field."""
    from engine.plan import check_model_fields, plan_from_dict

    raw = {"name": "p", "model": {"source": "builtin:tiny-neo"}, "tasks": {"t": {"source": "builtin:pydoc"}}, **change}
    with pytest.raises(PlanError) as error:
        plan_from_dict(raw)
    assert any(p.path == field for p in error.value.problems), error.value
    check_model_fields(raw)  # no TypeError either


def test_a_variant_changes_train_for_itself_checked_as_the_merged_train():
    from engine.plan import PlanError, plan_from_dict

    raw = {"name": "v", "tasks": {"t": {"source": "builtin:stdlib-python"}}, "train": {"schedule": "wsd", "lr": 2e-3},
           "variants": [{"name": "a", "train": {"residual_scaling": "depth_mup", "decay_fraction": 0.5},
                         "stages": [{"task": "t", "steps": 4}]},
                        {"name": "b", "stages": [{"task": "t", "steps": 4}]}]}
    plan = plan_from_dict(raw)
    a, b = plan.for_variant("a").train, plan.for_variant("b").train
    assert (a.residual_scaling, a.decay_fraction, a.lr, a.schedule) == ("depth_mup", 0.5, 2e-3, "wsd")
    assert (b.residual_scaling, b.decay_fraction) == ("none", 0.2)
    assert plan.for_variant("a").prefix_key(0) != plan.for_variant("b").prefix_key(0)
    raw["train"]["schedule"] = "cosine"  # decay_fraction now belongs to nothing
    with pytest.raises(PlanError, match=r'variants\[0\]\.train\.decay_fraction: belongs to schedule = "wsd"'):
        plan_from_dict(raw)
    raw["train"]["schedule"] = "wsd"
    raw["variants"][0]["train"] = {"lr": -1}
    with pytest.raises(PlanError, match=r"variants\[0\]\.train\.lr"):
        plan_from_dict(raw)
