"""The wire contract: the committed ``api/openapi.json`` is the app's; schemathesis finds
no 5xx and no schema violation; a client generated from the file talks to a live server."""

from __future__ import annotations

import importlib
import json
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
REPO = Path(__file__).resolve().parents[2]


def test_committed_openapi_matches_the_app():
    committed = OPENAPI_PATH.read_text(encoding="utf-8")
    assert committed == openapi_text(), "api/openapi.json is stale: run `make openapi`"


def test_operation_ids_and_tags_read_well():
    schema = json.loads(OPENAPI_PATH.read_text())
    ops = {op["operationId"]: op for path in schema["paths"].values() for op in path.values()}
    for name in (
        "query_influence",
        "query_influence_batch",
        "get_example",
        "get_index",
        "reload_index",
        "healthz",
        "readyz",
        "metrics",
    ):
        assert name in ops and ops[name]["tags"] and ops[name].get("description")
    for status in ("401", "403", "413", "422", "503"):
        assert status in ops["query_influence"]["responses"]


@pytest.fixture(scope="module")
def settings(tiny_index):
    # The contract, not the ranking, is under test: a short default second stage keeps the
    # exact stage on every request that does not say while bounding the run's cost.
    return Settings(index_dir=tiny_index, max_prompt_tokens=64, max_completion_tokens=32, rescore=4)


@pytest.fixture(scope="module")
def server(settings):
    with live_server(create_app(settings)) as base:
        yield base


SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")
SCHEMATHESIS_KEY = "schemathesis-key"


def run_schemathesis(
    base: str, settings: Settings, *options: str, max_examples: int = 8, timeout: int = 300
) -> None:
    """schemathesis (all checks, every phase unless ``options`` say, a bounded number of
    examples per operation, deterministic) against a live server run with ``settings``; its
    hooks filter the rules no schema can state (schemathesis_hooks.py)."""
    from indexer.manifest import Manifest

    assert settings.index_dir is not None
    config = json.loads(
        (Path(Manifest.read(settings.index_dir).model.path) / "config.json").read_text()
    )
    limits = {
        "prompt": settings.max_prompt_tokens,
        "completion": settings.max_completion_tokens,
        "context": config["n_positions"],
    }
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks",
        "INFLUENCE_ST_LIMITS": json.dumps(limits),
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [
            str(VENV_BIN / "schemathesis"),
            "--config-file",
            str(SCHEMATHESIS_CONFIG),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(max_examples),
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    failures = result.stdout[result.stdout.find("FAILURES") : result.stdout.find("SUMMARY")]
    assert result.returncode == 0, failures[:6000] + result.stderr[-2000:]
    assert "No issues found" in result.stdout


@pytest.mark.slow
def test_schemathesis_no_server_errors_no_schema_violations(server, settings):
    """schemathesis against the live server: no 5xx, every response matches the documented
    schema, schema-valid input is accepted and invalid input refused, with no exemption per
    operation. Reload is left out (it needs an API key; the keyed run and the reload tests
    cover it), and so is explain (test_explain.py runs it)."""
    run_schemathesis(
        server,
        settings,
        "--exclude-path",
        "/v1/admin/reload",
        "--exclude-path",
        "/v1/influence/explain",
    )


@pytest.fixture(scope="module")
def keyed_settings(settings):
    return settings.model_copy(
        update={"api_keys": [SCHEMATHESIS_KEY], "admin_keys": [SCHEMATHESIS_KEY]}
    )


@pytest.fixture(scope="module")
def keyed_server(keyed_settings):
    with live_server(create_app(keyed_settings)) as base:
        yield base


@pytest.mark.slow
def test_schemathesis_with_api_keys(keyed_server, keyed_settings):
    """The same run with auth on and the key sent, reload included (fuzzed index
    directories must be refused with a 4xx, never a 500; a reload of the configured index
    swaps it for itself)."""
    run_schemathesis(
        keyed_server,
        keyed_settings,
        "-H",
        f"Authorization: Bearer {SCHEMATHESIS_KEY}",
        "--exclude-path",
        "/v1/influence/explain",
    )


@pytest.fixture(scope="module")
def generated_client(tmp_path_factory):
    """README's route: `make client`, then `pip install ./influence-client` (here into a
    folder of its own, away from the repo root, which is how another service gets it)."""
    out = tmp_path_factory.mktemp("generated") / "influence-client"
    # README's command, `make client`, from a shell without the venv on PATH: no warning
    # that ruff is missing (the generator formats its output with it).
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    env = {**os.environ, "PATH": path or "/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        ["make", "-s", "client", f"CLIENT_OUT={out}"],
        cwd=OPENAPI_PATH.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ruff" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    site = out.parent / "site"
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        str(site),
        str(out),
    ]
    result = subprocess.run(install, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sys.path.insert(0, str(site))
    try:
        yield importlib.import_module("influence_client")
    finally:
        sys.path.remove(str(site))


def test_generated_client_calls_live_server(generated_client, server):
    from influence_client import Client
    from influence_client.api.examples import get_example
    from influence_client.api.health import readyz
    from influence_client.api.influence import query_influence
    from influence_client.models import ErrorResponse, InfluenceQuery, InfluenceResponse

    client = Client(base_url=server, timeout=httpx.Timeout(60))
    assert readyz.sync(client=client).status == "ready"
    query = InfluenceQuery(prompt="The capital of Drosora is", completion=" Mutu.", k=5)
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


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"prompt": "a", "completion": "b"}, True),
        ({"prompt": "a", "completion": "b", "generate": None}, True),
        ({"prompt": "a", "completion": None, "generate": {"max_new_tokens": 2}}, True),
        ({"prompt": "a", "generate": {"max_new_tokens": 2}}, True),
        ({"prompt": "a", "completion": "b", "generate": {"max_new_tokens": 2}}, False),
        ({"prompt": "a"}, False),
        ({"prompt": "a", "completion": None, "generate": None}, False),
        ({"prompt": "a", "generate": {"max_new_tokens": 65}}, False),  # this server's bound
    ],
)
def test_the_schema_states_what_the_server_enforces(body, valid):
    """completion XOR generate and this server's max_new_tokens are in the schema: a body is
    schema-valid exactly when the wire model (and this server's limit) accepts it."""
    import jsonschema_rs  # schemathesis's own validator
    from pydantic import ValidationError

    from api.models import InfluenceQuery

    settings = Settings(max_new_tokens=64)
    document = create_app(settings).openapi()
    schema = {
        **document["components"]["schemas"]["InfluenceQuery"],
        "components": document["components"],
    }
    assert jsonschema_rs.validator_for(schema).is_valid(body) == valid
    try:
        query = InfluenceQuery.model_validate(body)
        accepted = (
            query.generate is None or query.generate.max_new_tokens <= settings.max_new_tokens
        )
    except ValidationError:
        accepted = False
    assert accepted == valid
