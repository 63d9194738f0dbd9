"""The layers of the code (docs/architecture.md), enforced by reading every import, function-level
ones included: nothing imports a layer above its own, engine never imports widen_tui, Textual only
under widen_tui/tui, Typer only under widen_tui/cli, and no import circle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# rank: a module may import its own layer and lower ranks, never a higher one. A module belongs
# to the longest package prefix named here. docs/architecture.md draws this table.
LAYERS: dict[str, int] = {
    "engine.errors": 0, "engine.names": 0, "engine.builtins": 0,   # foundations
    "engine.model": 1,        # families (data), the uniform view, one forward pass, sources
    "engine.ops": 2,          # operators: one descriptor each
    "engine.plan": 3,         # schema, problems, TOML and --set, checks
    "engine.runs": 4,         # run files and every reader of them (no torch)
    "engine.grow": 5,         # applying operators, optimizer state, triggers, task modules, FLOPs, sweep
    "engine.train": 6,        # the loop, the trained model, data, evaluation, checkpoints, the worker
    "engine.exports": 7, "engine.api": 7, "engine.integrations": 7, "engine": 7,  # what users call
    "widen_tui.index": 10, "widen_tui.launcher": 10, "widen_tui.sweeps": 10,  # the index, starting runs
    "widen_tui.views": 11,    # Rich tables, event lines, figures: rendered by both CLI and TUI
    "widen_tui.tui": 12,      # Textual: app, screens, widgets, .tcss, their view-models
    "widen_tui.cli": 13, "widen_tui": 13,  # Typer: one module per group of verbs
}
FRAMEWORK_HOMES = {"textual": "widen_tui.tui", "typer": "widen_tui.cli"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    return None


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("engine", "widen_tui"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported name) for every import in the file; `from a import b` gives a.b when b is a
    module, else a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            # `from engine import builtins` imports a module: engine's __init__ runs for every
            # engine module anyway, so the package itself counts only for names defined in it
            found += [(node.lineno, name if name in MODULES else base) for name in names]
    return found


def _project_module(name: str) -> str | None:
    """The project module `name` refers to (a module, or a name inside one), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {_project_module(name) for _, name in _imports(module, path)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_nothing_imports_a_layer_above_its_own():
    wrong = []
    for module, path in MODULES.items():
        rank = LAYERS[layer_of(module)]
        for line, name in _imports(module, path):
            target = _project_module(name)
            if target and LAYERS[layer_of(target)] > rank:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({layer_of(target)} is above "
                             f"{layer_of(module)})")
    assert wrong == []


def test_frameworks_stay_in_their_folder():
    wrong = []
    for module, path in MODULES.items():
        for line, name in _imports(module, path):
            home = FRAMEWORK_HOMES.get(name.split(".")[0])
            if home and not (module == home or module.startswith(home + ".")):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (only {home} may)")
    assert wrong == []


def test_no_import_circles():
    graph, index, low, stack, on_stack, circles = _graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


@pytest.mark.parametrize("module", ["engine", "engine.grow.apply", "engine.exports"])
def test_no_module_is_callable(module):
    import importlib

    assert not callable(importlib.import_module(module))


def test_paths_found_from_a_module_s_own_file_exist():
    """Modules that find the checkout from their own file (parents[n]) still do after a move."""
    from widen_tui.cli import launch
    from widen_tui.tui import plan_draft, preview_client
    from widen_tui.tui.screens import sweep

    assert (launch.EXPERIMENTS / "quickstart.toml").is_file()
    assert (plan_draft.EXPERIMENTS_DIR / "quickstart.toml").is_file()
    for root in (preview_client.PACKAGE_ROOT, sweep.PACKAGE_ROOT):
        assert (Path(root) / "engine" / "__init__.py").is_file(), root
