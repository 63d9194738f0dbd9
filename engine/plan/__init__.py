"""The expansion plan: TOML schema, `--set` overrides, and checking with clear messages.

One job per module, each importing only those above it in this list:

- ``problems``: ``Problem`` and ``PlanError``; every problem is reported as ``field.path: message — fix``,
  one line each whatever the plan holds (values echoed are cut to ~60 characters, control
  characters escaped); pydantic's errors become one clear line each (``problems_from_pydantic``).
- ``schema``: the pydantic models (``Plan``, ``StageSpec``, ``GrowSpec``, ...) and the bounds of every
  number (no bools as numbers, no inf/nan).
- ``checks``: every check beyond the schema, on the raw dict: across fields (stage -> task, op ->
  its parameters, names that would become unsafe file names), what the plan points at (task
  sources, tokenizers, the device, the trackers' packages) and what needs the model's config,
  loaded without weights (``check_model_fields``: layer indices, seq_len, the sweep's mappings).
- ``load``: the entry points: reading TOML, `--set` overrides, ``load_plan``, ``plan_from_dict``,
  ``validate_file``.

No torch here: the CLI imports this package at start-up (the device check imports it only to ask
about CUDA, and only when asked).
"""

from __future__ import annotations

from engine.plan.checks import check_model_fields, growth_count
from engine.plan.load import (
                              apply_overrides,
                              check_plan,
                              load_plan,
                              parse_override,
                              plan_from_dict,
                              read_toml,
                              validate_file,
)
from engine.plan.problems import PlanError, Problem, problems_from_pydantic
from engine.plan.schema import (
                              DistributedSpec,
                              ExpandSpec,
                              GrowSpec,
                              ModelSpec,
                              Plan,
                              StageSpec,
                              SweepSpec,
                              TaskSpec,
                              TrainSpec,
                              VariantSpec,
)

__all__ = [
    "DistributedSpec", "ExpandSpec", "GrowSpec", "ModelSpec", "Plan", "PlanError", "Problem", "StageSpec", "SweepSpec",
    "TaskSpec", "TrainSpec", "VariantSpec", "apply_overrides", "check_model_fields", "check_plan", "growth_count",
    "load_plan", "parse_override", "plan_from_dict", "problems_from_pydantic", "read_toml", "validate_file",
]
