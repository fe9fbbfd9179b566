"""The wire contract: the committed ``api/openapi.json`` is the app's; schemathesis finds
no 5xx and no schema violation; a client generated from the file talks to a live server."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.commands import OPENAPI_PATH, openapi_text
from service.settings import Settings
from tests.service.live import assert_same_results, live_server

VENV_BIN = Path(sys.executable).parent


def test_committed_openapi_matches_the_app():
    committed = OPENAPI_PATH.read_text(encoding="utf-8")
    assert committed == openapi_text(), "api/openapi.json is stale: run `make openapi`"


def test_operation_ids_and_tags_read_well():
    import json

    schema = json.loads(OPENAPI_PATH.read_text())
    ops = {
        op["operationId"]: op for path in schema["paths"].values() for op in path.values()
    }
    for name in ("query_influence", "query_influence_batch", "get_example", "get_index",
                 "reload_index", "healthz", "readyz", "metrics"):
        assert name in ops and ops[name]["tags"] and ops[name].get("description")
    for status in ("401", "403", "413", "422", "503"):
        assert status in ops["query_influence"]["responses"]


@pytest.fixture(scope="module")
def server(tiny_index):
    app = create_app(Settings(index_dir=tiny_index, max_prompt_tokens=64, max_completion_tokens=32))
    with live_server(app) as base:
        yield base


@pytest.mark.slow
def test_schemathesis_no_server_errors_no_schema_violations(server):
    """schemathesis (examples, coverage and fuzzing phases, all checks, a bounded number of
    examples per operation) against the live server: no 5xx, every response matches the
    documented schema, schema-valid input is accepted and invalid input refused. Reload is
    left out (it needs an API key; the reload tests cover it), and so is the UI's explain
    route (service/explain.py, tested in test_explain.py)."""
    result = subprocess.run(
        [str(VENV_BIN / "schemathesis"), "--config-file", str(SCHEMATHESIS_CONFIG), "run", f"{server}/openapi.json", "--checks", "all",
         "--max-examples", "8", "--generation-deterministic", "--workers", "1",
         "--request-timeout", "60", "--exclude-path", "/v1/admin/reload",
         "--exclude-path", "/v1/influence/explain"],
        capture_output=True, text=True, timeout=300,
    )
    failures = result.stdout[result.stdout.find("FAILURES"):result.stdout.find("SUMMARY")]
    assert result.returncode == 0, failures[:6000] + result.stderr[-2000:]
    assert "No issues found" in result.stdout


@pytest.fixture(scope="module")
def keyed_server(tiny_index):
    app = create_app(Settings(index_dir=tiny_index, max_prompt_tokens=64, max_completion_tokens=32,
                              api_keys=[SCHEMATHESIS_KEY]))  # fmt: skip
    with live_server(app) as base:
        yield base


SCHEMATHESIS_KEY = "schemathesis-key"
SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.mark.slow
def test_schemathesis_with_api_keys(keyed_server):
    """The same run with auth on and the key sent, reload included (fuzzed index
    directories must be refused with a 4xx, never a 500; a reload of the configured index
    swaps it for itself)."""
    result = subprocess.run(
        [str(VENV_BIN / "schemathesis"), "--config-file", str(SCHEMATHESIS_CONFIG), "run", f"{keyed_server}/openapi.json", "--checks", "all",
         "--max-examples", "8", "--generation-deterministic", "--workers", "1",
         "--request-timeout", "60", "-H", f"Authorization: Bearer {SCHEMATHESIS_KEY}",
         "--exclude-path", "/v1/influence/explain"],
        capture_output=True, text=True, timeout=300,
    )
    failures = result.stdout[result.stdout.find("FAILURES"):result.stdout.find("SUMMARY")]
    assert result.returncode == 0, failures[:6000] + result.stderr[-2000:]
    assert "No issues found" in result.stdout


@pytest.fixture(scope="module")
def generated_client(tmp_path_factory):
    out = tmp_path_factory.mktemp("generated") / "influence_client"
    # README's command, `make client`, from a shell without the venv on PATH: no warning
    # that ruff is missing (the generator formats its output with it).
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    env = {**os.environ, "PATH": path or "/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(["make", "-s", "client", f"CLIENT_OUT={out}"], cwd=OPENAPI_PATH.parent.parent,
                            env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ruff" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    sys.path.insert(0, str(out.parent))
    try:
        yield importlib.import_module("influence_client")
    finally:
        sys.path.remove(str(out.parent))


def test_generated_client_calls_live_server(generated_client, server):
    from influence_client import Client
    from influence_client.api.examples import get_example
    from influence_client.api.health import readyz
    from influence_client.api.influence import query_influence
    from influence_client.models import ErrorResponse, InfluenceQuery, InfluenceResponse

    client = Client(base_url=server, timeout=httpx.Timeout(60))
    assert readyz.sync(client=client).status == "ready"
    query = InfluenceQuery(prompt="The capital of Veloria is", completion=" Quenton.", k=5)
    answer = query_influence.sync(client=client, body=query)
    assert isinstance(answer, InfluenceResponse) and len(answer.results) == 5
    raw = httpx.post(f"{server}/v1/influence", json=query.to_dict(), timeout=60).json()
    assert_same_results([r.to_dict() for r in answer.results], raw["results"])
    example = get_example.sync(client=client, example_id=answer.results[0].id)
    assert example.text == answer.results[0].text

    too_long = query_influence.sync_detailed(
        client=client, body=InfluenceQuery(prompt="word " * 100, completion=" x")
    )
    assert too_long.status_code == 413
    assert isinstance(too_long.parsed, ErrorResponse)
    assert too_long.parsed.error.code == "input_too_long"
