"""One validation for the CLI and the API: ``influence query`` builds the ``InfluenceQuery``
the REST route validates, so what the API answers 422 the CLI refuses in one line, exit 2,
before any model loads (the index paths here do not even exist). Before, ``--temperature
nan`` and ``--gen-seed -1`` exited 0, and invalid UTF-8 or a bogus device printed a
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.models import InfluenceQuery
from service.cli import main as influence_main
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
QUERY = ["query", "--index", "/nonexistent/index", "--prompt", "The capital of Drosora is"]


def _refused(capsys, argv: list[str]) -> str:
    rc = influence_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            ["--generate", "4", "--temperature", "nan"],
            "--temperature: Input should be a finite number",
        ),
        (
            ["--generate", "4", "--temperature", "inf"],
            "--temperature: Input should be a finite number",
        ),
        (
            ["--generate", "4", "--temperature", "1e30"],
            "--temperature: Input should be less than or equal to 10",
        ),
        (
            ["--generate", "4", "--temperature", "-1"],
            "--temperature: Input should be greater than or equal to 0",
        ),
        (
            ["--generate", "4", "--temperature", "1", "--gen-seed", "-1"],
            "--gen-seed: Input should be greater",
        ),
        (
            ["--generate", "4", "--temperature", "1", "--gen-seed", str(2**40)],
            "--gen-seed: Input should be less",
        ),
        (["--completion", " x", "--temperature", "0.5"], "apply to --generate N only"),
        (["--generate", "0"], "--generate: Input should be greater than or equal to 1"),
        (["--generate", "4", "--completion", " x"], "--completion / --generate"),
        ([], "--completion / --generate"),
        (["--completion", ""], "--completion: Value should have at least 1 item"),
        (["--completion", " x", "-k", "0"], "-k: Input should be greater than or equal to 1"),
        (["--completion", " x", "-k", "1001"], "-k: Input should be less than or equal to 1000"),
        (
            ["--completion", " x", "--rescore", "-1"],
            "--rescore: Input should be greater than or equal to 0",
        ),
        (
            ["--completion", " x", "--rescore", "5000"],
            "--rescore: Input should be less than or equal to 1000",
        ),
        (
            ["--completion", " x", "--span", "3:3"],
            "--span: Value error, span end 3 must be greater",
        ),
        (["--completion", " x", "--device", "bogus"], "[invalid_device]"),
        (["--completion", " x", "--device", "cuda:7"], "[invalid_device]"),
        (["--completion", "\udcff\udcfe"], "--completion: "),  # argv bytes 0xff 0xfe
    ],
)
def test_query_flags_are_validated_as_the_api_validates(capsys, extra, says):
    err = _refused(capsys, [*QUERY, *extra])
    assert says in err, err


def test_the_cli_and_the_api_refuse_the_same_temperatures():
    for value in (float("nan"), float("inf"), 1e30, -1.0):
        with pytest.raises(ValidationError):
            InfluenceQuery.model_validate(
                {"prompt": "a", "generate": {"max_new_tokens": 1, "temperature": value}}
            )


def test_invalid_utf8_in_argv_is_one_line_and_exit_2():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [
        sys.executable,
        "-m",
        "service.cli",
        *QUERY[:3],
        "--prompt",
        b"\xff\xfe",
        "--completion",
        "x",
    ]
    done = subprocess.run(argv, capture_output=True, env=env, cwd=REPO, timeout=120)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and "Traceback" not in err and err.startswith("influence: error"), (
        err
    )


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--seq-len", "0"], "--seq-len must be >= 2, got 0"),
        (["--seq-len", "-5"], "--seq-len must be >= 2, got -5"),
        (["--stride", "0"], "--stride must be >= 1, got 0"),
        (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
        (
            ["--optimizer-state", "/x/optimizer.pt"],
            "--optimizer-state is read only by the optimizer correction",
        ),
        (["--device", "bogus"], "[invalid_device]"),
    ],
)
def test_build_flags_are_refused_before_any_work(capsys, tmp_path, extra, says):
    argv = ["index", "build", "--model", "/nonexistent/model", "--corpus", "/nonexistent/c.jsonl"]
    err = _refused(capsys, [*argv, "--out", str(tmp_path / "index"), *extra])
    assert says in err, err
    assert not (tmp_path / "index").exists()


def test_serve_refuses_a_device_this_machine_lacks():
    with pytest.raises(ValidationError, match="no CUDA device|cuda"):
        Settings(device="cuda:7") if not _has_cuda() else Settings(device="cuda:99")
    with pytest.raises(ValidationError, match="not a torch device"):
        Settings(device="bogus")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
