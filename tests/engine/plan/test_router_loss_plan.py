"""[train] router_aux_loss_coef and router_z_loss_coef: bounded, None by default (the model config's
own coefficient), and a plan check when a plan weighs a router loss for a model that never has
experts (engine.plan.checks._router_loss_problems)."""

from __future__ import annotations

import pytest

from engine.plan import plan_from_dict, read_toml
from tests.engine.plan.test_plan_bounds import QUICKSTART, assert_one_problem, problems_of
from tests.tiny_models import tiny_config

FIELDS = ["router_aux_loss_coef", "router_z_loss_coef"]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value, fragments", [("-1", ["got -1"]), ("nan", ["finite"]), ("1e300", ["got 1e+300"]),
                                              ("true", ["got true"])])
def test_the_coefficients_are_bounded(field, value, fragments):
    assert_one_problem(problems_of(QUICKSTART, f"train.{field}={value}"), f"train.{field}", *fragments)


def test_by_default_the_config_decides():
    plan = plan_from_dict(read_toml(QUICKSTART))
    assert plan.train.router_aux_loss_coef is None and plan.train.router_z_loss_coef is None
    assert problems_of(QUICKSTART, "train.router_aux_loss_coef=0", "train.router_z_loss_coef=0") == []  # off


@pytest.mark.parametrize("field", FIELDS)
def test_a_router_loss_for_a_model_without_experts_is_a_problem(field):
    assert_one_problem(problems_of(QUICKSTART, f"train.{field}=0.01"), f"train.{field}",
                       "gpt_neo model has no experts", 'op = "upcycle"', f"remove train.{field}")


def _plan(tmp_path, family: str, stage_ops: str = "") -> str:
    source = tmp_path / family
    tiny_config(family, layers=2, heads=2, head_dim=8, ffn=16).save_pretrained(source)
    path = tmp_path / f"{family}.toml"
    path.write_text(f'name = "p"\n[model]\nsource = "{source}"\n[tasks.prose]\nsource = "builtin:pydoc"\n'
                    f'[train]\nrouter_aux_loss_coef = 0.01\nseq_len = 32\n[[stages]]\ntask = "prose"\nsteps = 4\n'
                    f"{stage_ops}")
    return path


def test_a_moe_model_or_an_upcycle_in_any_stage_has_routers(tmp_path):
    assert problems_of(_plan(tmp_path, "mixtral")) == []
    grow = '[stages.grow]\ntrigger = "at"\nat_steps = [2]\n[[stages.grow.expand]]\nop = "upcycle"\nexperts = 4\n'
    assert problems_of(_plan(tmp_path, "llama", grow)) == []
    assert_one_problem(problems_of(_plan(tmp_path, "llama")), "train.router_aux_loss_coef", "llama model has no experts")
