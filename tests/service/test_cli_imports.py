"""`influence --help`, every subcommand's --help and `index info` load no model stack:
torch, transformers, faiss and FastAPI are imported where they are used, not to print help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "faiss", "fastapi", "bm25s", "uvicorn")


def _modules_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["index", "--help"],
        ["index", "build", "--help"],
        ["query", "--help"],
        ["serve", "--help"],
        ["eval", "--help"],
        ["demo", "--help"],
    ],
)
def test_help_imports_no_model_stack(argv):
    code = (
        "import contextlib, io\nfrom service.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass"
    )
    loaded = _modules_after(code)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}, sorted(
        m for m in loaded if m.split(".")[0] in HEAVY
    )[:5]


def test_index_info_imports_no_model_stack(tiny_index):
    code = (
        "import contextlib, io\nfrom service.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['index', 'info', {str(tiny_index)!r}]) == 0"
    )
    loaded = _modules_after(code)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}
