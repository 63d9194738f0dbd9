"""widen's headless engine: plans, architectures, operators, training. No Textual, no Typer.

The Python API (engine.api, docs/python.md) is re-exported here lazily: ``import engine`` stays
cheap (no torch), the first use of ``engine.load`` / ``engine.freeze`` / ... imports it.
``engine.expand`` and ``engine.export`` are also the modules of those names (the machinery
under the API): those two modules are callable, a call being ``engine.api.expand`` /
``engine.api.export`` (``callable_module``), so both readings hold."""

from __future__ import annotations

import sys
import types

# name -> module defining it; imported on first attribute access (PEP 562)
_API = {name: "engine.api" for name in ("ExpandReport", "FreezeSummary", "OperatorParamsError", "TaskModules",
                                        "freeze", "load", "param_groups", "probe_batch")}
_API["GrowthCallback"] = _API["TaskModulesCallback"] = "engine.integrations.hf"
_CALLABLE_MODULES = ("expand", "export")   # submodules that are also API functions

__all__ = sorted([*_API, *_CALLABLE_MODULES])


def __getattr__(name: str):
    import importlib

    if name in _CALLABLE_MODULES:  # the submodule itself (callable): importing it sets the attribute
        return importlib.import_module(f"engine.{name}")
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallableModule(types.ModuleType):
    """A module whose call is the engine.api function of the same name."""

    def __call__(self, *args, **kwargs):
        from engine import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def callable_module(name: str) -> None:
    """Make module `name` (engine.expand, engine.export) callable as its engine.api function."""
    sys.modules[name].__class__ = _CallableModule
