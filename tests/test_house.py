"""House rules a reviewer would otherwise check by hand: ruff is clean, psp_core never imports Ray,
jobs/ has no import cycles, and no function grows past ~80 lines without a stated reason."""
from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("psp_core", "pipelines", "jobs", "schemas")
MAX_FUNCTION_LINES = 80
# Longer functions, each with the reason it stays whole.
LONG_FUNCTIONS: dict[str, str] = {
    "pipelines/read.py::read_batch": "the read stage in order: plan the fetches, run them under time limits, "
                                        "build the columns",
    "pipelines/edit.py::run_edit": "the edit run's fail-fast checks followed by its Ray graph",
}


def test_ruff_is_clean():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed (pip install -c constraints.txt -e '.[test]')")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _functions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(ROOT).as_posix()}::{node.name}", node


def test_no_function_is_longer_than_a_screenful_without_a_reason():
    long = {name: node.end_lineno - node.lineno + 1 for name, node in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    unexplained = {name: n for name, n in long.items() if name not in LONG_FUNCTIONS}
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines: {unexplained}"
    stale = set(LONG_FUNCTIONS) - set(long)
    assert not stale, f"LONG_FUNCTIONS lists functions that are short now: {stale}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_psp_core_never_imports_ray_or_the_pipeline():
    for path in sorted((ROOT / "psp_core").rglob("*.py")):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("ray", "pipelines", "jobs")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def _module_imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_import_cycles_between_modules_of_any_package():
    """No two modules of psp_core, pipelines, jobs or schemas import each other, directly or
    through others -- counting imports inside functions, which hide a cycle from import time."""
    modules = {f"{p}.{f.stem}": f for p in PACKAGES for f in (ROOT / p).glob("*.py") if f.stem != "__init__"}
    graph = {m: sorted(n for n in _module_imports(f) if n in modules and n != m) for m, f in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)


def test_every_command_flag_is_a_declared_option():
    """No command adds a flag by hand: each `--flag` of every command comes from a dataclass field
    declared with `pipelines.options.option`/`shared` (add_argument is only called for positionals
    outside pipelines/options.py), so its check, default and help live in one place."""
    by_hand = []
    for path in sorted([*(ROOT / "jobs").glob("*.py"), *(ROOT / "pipelines").glob("*.py")]):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument" and node.args
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("-")):
                by_hand.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.args[0].value}")
    assert not by_hand, "flags declared by hand: " + ", ".join(by_hand)


def test_shared_options_are_one_declaration_across_commands():
    """--storage-options (and the other shared options) read the same in every command's --help."""
    from jobs.cli import build_parser
    from pipelines.options import SHARED

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps: dict[str, set[str]] = {}
    for p in sub.choices.values():
        for action in p._actions:
            if action.dest in SHARED:
                helps.setdefault(action.dest, set()).add(action.help)
    assert {"storage_options", "run_id", "device", "images"} <= set(helps)
    storage = {name for name, p in sub.choices.items() if any(a.dest == "storage_options" for a in p._actions)}
    assert {"invert", "nightly", "edit", "direction", "inspect", "report", "vacuum"} <= storage
    # (psp train's --device is the workers' device, a declaration of its own)
    assert all(len(v) == 1 for k, v in helps.items() if k in ("storage_options", "images")), helps


def test_jobs_modules_import_without_cycles():
    """Every jobs/ module imports on its own, in a fresh interpreter, and no jobs module imports
    jobs.cli (the CLI imports them; a module-level cycle would hide behind function imports)."""
    for path in sorted((ROOT / "jobs").glob("*.py")):
        if path.stem in ("__init__", "__main__", "cli"):
            continue
        assert "jobs.cli" not in _imports(path), f"{path.name} imports jobs.cli"
        module = f"jobs.{path.stem}"
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                cwd=ROOT)
        assert result.returncode == 0, f"import {module} failed:\n{result.stderr}"
