"""The shape the codebase keeps (docs/architecture.md): short functions and files, imports
in one direction, and a typed read side that never probes the index it was handed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("encoder", "indexer", "engine", "service", "api", "evaluation")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400

ALLOWED_IMPORTS = {
    "api": set(),
    # the wire contract's errors (api.errors, plain Python) are what every layer raises
    "encoder": {"api"},
    "indexer": {"encoder", "api"},
    "engine": {"encoder", "indexer", "api"},
    "service": {"encoder", "indexer", "engine", "api"},
    # the demo serves what it built, and tries the API's example query (api imports nothing)
    "evaluation": {"encoder", "indexer", "engine", "service", "api"},
}
"""Project packages each library package may import: one direction, the wire contract (api)
at the bottom, then the encoder."""

ERRORS_ONLY = ("encoder", "indexer")
"""Packages that may import from api its errors (``api.errors``) and nothing else."""


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _all_sources() -> list[Path]:
    return [f for p in LIBRARY for f in _sources(p)]


def test_no_library_function_over_80_lines_and_no_file_over_400():
    long_files, long_functions = [], []
    for path in _all_sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


def _imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & set(LIBRARY)


@pytest.mark.parametrize("package", LIBRARY)
def test_imports_go_one_way(package):
    wrong = {
        str(f.relative_to(ROOT)): sorted(
            _imported_packages(f) - ALLOWED_IMPORTS[package] - {package}
        )
        for f in _sources(package)
    }
    assert not {f: w for f, w in wrong.items() if w}


@pytest.mark.parametrize("package", ERRORS_ONLY)
def test_the_lower_layers_take_only_the_errors_from_the_contract(package):
    wrong = []
    for path in _sources(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] == "api"
            ):
                if node.module != "api.errors":
                    wrong.append(f"{path.relative_to(ROOT)}: {node.module}")
            elif isinstance(node, ast.Import):
                wrong += [
                    f"{path.relative_to(ROOT)}: {a.name}"
                    for a in node.names
                    if a.name.startswith("api")
                ]
    assert not wrong, wrong


def test_the_read_side_is_typed_and_never_probes_the_index():
    """No ``getattr`` on an index, no untyped or ``Any`` index parameter, and the app's
    state is read in one place (``service.deps``)."""
    probes, untyped, state = [], [], []
    for path in [*_sources("engine"), *_sources("service")]:
        text, rel = path.read_text(), str(path.relative_to(ROOT))
        probes += [rel for _ in re.finditer(r"getattr\((self\.)?index\b", text)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for arg in node.args.args + node.args.kwonlyargs:
                    if arg.arg == "index" and (
                        arg.annotation is None or ast.unparse(arg.annotation) == "Any"
                    ):
                        untyped.append(f"{rel}:{node.lineno} {node.name}")
        if rel != "service/deps.py" and "app.state" in text:
            state.append(rel)
    assert not probes and not untyped and not state, (probes, untyped, state)
