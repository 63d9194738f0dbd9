"""widen's headless engine: plans, models, operators, growth, training and run files. No Textual,
no Typer (docs/architecture.md shows the layers and which may import which).

The Python API (engine.api, docs/python.md) is re-exported here lazily: ``import engine`` stays
cheap (no torch); the first use of ``engine.load`` / ``engine.expand`` / ``engine.export`` / ...
imports it. No submodule is named like an API function, so ``engine.expand`` is always the
function."""

from __future__ import annotations

# name -> module defining it; imported on first attribute access (PEP 562)
_API = {name: "engine.api" for name in ("ExpandReport", "FreezeSummary", "OperatorParamsError", "TaskModules",
                                        "expand", "export", "freeze", "load", "param_groups", "probe_batch")}
_API["GrowthCallback"] = _API["TaskModulesCallback"] = "engine.integrations.hf"

__all__ = sorted(_API)


def __getattr__(name: str):
    import importlib

    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
