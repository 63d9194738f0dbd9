"""CLI conventions: `widen --version`, shell completion, and Annotated options everywhere."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WIDEN = str(Path(sys.executable).with_name("widen"))


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, **env})


def test_version_prints_the_package_version_without_torch():
    code = ("import sys, runpy\nsys.argv = ['widen', '--version']\n"
            "try:\n    runpy.run_module('widen_tui.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"widen {version('widen')}"
    installed = _run([WIDEN, "--version"])
    assert installed.returncode == 0 and installed.stdout.strip() == f"widen {version('widen')}"


def test_show_completion_for_bash():
    # the shell named on the command line (Typer's explicit mode)
    proc = _run([WIDEN, "--show-completion", "bash"], _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert proc.returncode == 0, proc.stderr
    assert "_widen_completion()" in proc.stdout and "_WIDEN_COMPLETE=complete_bash" in proc.stdout
    assert "complete -o default -F _widen_completion widen" in proc.stdout
    # detected from the parent shell (`; true` keeps bash from exec'ing widen in its place)
    detected = _run(["bash", "-c", f"{WIDEN} --show-completion; true"])
    assert detected.returncode == 0, detected.stderr
    assert "_widen_completion()" in detected.stdout


def test_completion_completes_commands_and_options():
    proc = _run([WIDEN], _WIDEN_COMPLETE="complete_bash", COMP_WORDS="widen ru", COMP_CWORD="1")
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {"run", "runs"}
    proc = _run([WIDEN], _WIDEN_COMPLETE="complete_bash", COMP_WORDS="widen logs --f", COMP_CWORD="2")
    assert "--follow" in proc.stdout.split()


def test_every_parameter_is_annotated():
    """No `x: T = typer.Option(...)`: options and arguments live in Annotated[T, typer.Option(...)]."""
    old_style = []
    for path in sorted((ROOT / "widen_tui").rglob("*.py")):  # Typer's verbs, wherever they are
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for default in node.args.defaults + node.args.kw_defaults:
                    if isinstance(default, ast.Call) and ast.unparse(default.func) in ("typer.Option",
                                                                                        "typer.Argument"):
                        old_style.append(f"{path.name}:{default.lineno} {node.name}")
    assert not old_style, old_style
