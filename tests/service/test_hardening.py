"""Hostile and unlucky input to the service over real HTTP: no 500, no unbounded buffering,
no forged log line, settings that could never work refused at start."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import pytest
from pydantic import ValidationError

from api.errors import safe_text
from service.app import create_app
from service.logs import SafeFormatter
from service.settings import Settings
from tests.service.fakes import FakeOpener
from tests.service.live import live_server

KEY = "hardening-key"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fake_index")


@pytest.fixture(scope="module")
def keyed(index_dir):
    settings = Settings(
        index_dir=index_dir,
        api_keys=[KEY],
        admin_keys=[ADMIN],
        max_body_bytes=4096,
        reload_root=index_dir.parent / "published",
    )
    with live_server(create_app(settings, opener=FakeOpener())) as base:
        yield base


@pytest.fixture(scope="module")
def open_server(index_dir):
    with live_server(create_app(Settings(index_dir=index_dir), opener=FakeOpener())) as base:
        yield base


def _auth(key: str = KEY):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


ADMIN = "admin-only-key"


def test_admin_has_its_own_key_and_reloads_stay_under_the_root(keyed, index_dir):
    """Before: any query key could hot-swap in any readable directory. Now only an admin key
    reloads, and only the served index or a directory under the reload root."""
    root = index_dir.parent / "published"
    (root / "v2").mkdir(parents=True, exist_ok=True)
    outside = index_dir.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    if not (root / "escape").exists():
        (root / "escape").symlink_to(outside)

    def reload(key, target=None):
        body = {} if target is None else {"index_dir": str(target)}
        return httpx.post(f"{keyed}/v1/admin/reload", json=body, headers=_auth(key))

    r = reload(KEY, root / "v2")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"  # a query key
    for target in (outside, root / "escape", root / ".." / "elsewhere", "/etc"):
        r = reload(ADMIN, target)
        assert r.status_code == 403 and r.json()["error"]["code"] == "reload_outside_root", (
            target,
            r.text,
        )
    r = reload(ADMIN, "/tmp/a\u0000b".encode().decode("unicode_escape"))
    assert r.status_code == 422, r.text
    assert reload(ADMIN, root / "v2").status_code == 200
    assert reload(ADMIN, index_dir).status_code == 200  # the configured index, outside the root
    assert reload(ADMIN).status_code == 200


def test_lone_surrogate_in_reload_path_is_a_clear_4xx(keyed):
    body = b'{"index_dir": "/tmp/\\ud800\\u0000\\nFORGED"}'
    r = httpx.post(f"{keyed}/v1/admin/reload", content=body, headers=_auth(ADMIN))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error" and "surrogate" in error["message"]
    for field in ("prompt", "completion", "source"):
        query = {"prompt": "a", "completion": " b", field: "x\ud800"}
        body = json.dumps(query).replace("\\\\ud800", "\\ud800").encode()
        r = httpx.post(f"{keyed}/v1/influence", content=body, headers=_auth())
        assert r.status_code == 422 and r.json()["error"]["details"]["field"] == field, r.text


def test_errors_escape_and_truncate_client_text():
    text = "a\nb\x00c\ud800" + "x" * 1000
    out = safe_text(text, limit=50)
    assert out.startswith("a\\x0ab\\x00c\\ud800") and out.endswith("(+956 chars)")
    out.encode("utf-8")  # never fails
    assert safe_text("plain") == "plain"


def test_auth_comes_before_the_body(keyed):
    r = httpx.post(
        f"{keyed}/v1/influence", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.post(
        f"{keyed}/v1/influence",
        content=b"{not json",
        headers={**_auth(), "Authorization": "Bearer no"},
    )
    assert r.status_code == 403
    r = httpx.post(f"{keyed}/v1/influence", content=b"{not json", headers=_auth())
    assert r.status_code == 422  # with a key, the body is read and refused


def test_body_over_the_limit_is_413_declared_or_streamed(keyed):
    big = json.dumps({"prompt": "x" * 5000, "completion": " y"}).encode()
    r = httpx.post(f"{keyed}/v1/influence", content=big, headers=_auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = httpx.post(f"{keyed}/v1/influence", content=chunks(), headers=_auth())  # chunked: no length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    small = json.dumps({"prompt": "The capital of Drosora is", "completion": " Mutu."}).encode()
    r = httpx.post(f"{keyed}/v1/influence", content=iter([small[:10], small[10:]]), headers=_auth())
    assert r.status_code == 200, r.text


def test_body_limit_without_a_key_is_401_not_buffered(keyed):
    """A huge anonymous body is refused from the headers; the server never reads it."""
    host, port = keyed.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/influence HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n{"
        )
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 401")


def test_integral_floats_everywhere(open_server):
    r = httpx.post(
        f"{open_server}/v1/influence", json={"prompt": "a", "completion": " b", "k": 5.0}
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    r = httpx.post(
        f"{open_server}/v1/influence", json={"prompt": "a", "completion": " b", "k": 5.5}
    )
    assert r.status_code == 422
    from api.explain_models import ExplainRequest

    assert ExplainRequest.model_validate({"prompt": "a", "completion": " b", "id": 3.0}).id == 3
    with pytest.raises(ValidationError):
        ExplainRequest.model_validate({"prompt": "a", "completion": " b", "id": 3.5})


def test_openapi_states_security_and_token_limits(index_dir):
    settings = Settings(index_dir=index_dir, max_prompt_tokens=40, max_completion_tokens=20)
    schema = create_app(settings, opener=FakeOpener()).openapi()
    assert set(schema["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    assert (
        schema["paths"]["/v1/influence"]["post"]["security"][-1] == {}
    )  # optional while auth is off
    assert {} not in schema["paths"]["/v1/admin/reload"]["post"]["security"]
    props = schema["components"]["schemas"]["InfluenceQuery"]["properties"]
    assert props["prompt"]["x-max-tokens"] == 40 and props["completion"]["x-max-tokens"] == 20
    assert "At most 20 tokens" in props["completion"]["description"]


def test_log_lines_cannot_be_forged(open_server, caplog):
    with caplog.at_level(logging.INFO, logger="influence.access"):
        httpx.get(f"{open_server}/v1/examples/%0aFORGED%00x")
    records = [r for r in caplog.records if r.name == "influence.access"]
    assert records
    formatter = SafeFormatter("%(name)s: %(message)s")
    for record in records:
        line = formatter.format(record)
        assert "\n" not in line and "\x00" not in line
    assert any("\\x0aFORGED\\x00x" in formatter.format(r) for r in records)


def test_batch_larger_than_the_queue_is_refused_naming_the_limit(index_dir):
    settings = Settings(index_dir=index_dir, max_queue=4, max_batch_queries=8)
    with live_server(create_app(settings, opener=FakeOpener())) as base:
        queries = [{"prompt": f"q{i}", "completion": " a"} for i in range(6)]
        r = httpx.post(f"{base}/v1/influence/batch", json={"queries": queries})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "too_many_queries" and error["details"]["limit"] == 4
        r = httpx.post(f"{base}/v1/influence/batch", json={"queries": queries[:4]})
        assert r.status_code == 200 and len(r.json()["responses"]) == 4


def test_invalid_settings_are_exit_2(tmp_path, capsys):
    from service.cli import main

    assert main(["serve", "--index", str(tmp_path), "--port", "70000"]) == 2
    assert "invalid setting port" in capsys.readouterr().err


def test_every_process_logs_through_the_safe_formatter():
    import subprocess
    import sys

    code = (
        "import logging; from service.logs import configure_logging; configure_logging(); "
        "logging.getLogger('influence.access').info('GET /v1/examples/%s', '\\nFORGED\\x00')"
    )
    err = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    ).stderr
    assert err.count("\n") == 1 and "\\x0aFORGED\\x00" in err, err


def test_serve_refuses_an_index_whose_model_moved(tiny_index, tmp_path, capsys):
    import shutil

    from indexer import manifest as mf
    from service.cli import main

    copy = tmp_path / "index"
    shutil.copytree(tiny_index, copy)
    m = json.loads((copy / mf.MANIFEST).read_text())
    m["model"]["path"] = str(tmp_path / "moved-away")
    (copy / mf.MANIFEST).write_text(json.dumps(m))
    assert main(["serve", "--index", str(copy), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "[model_not_found]" in err and "moved-away" in err and "--model-dir" in err
