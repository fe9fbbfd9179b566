"""The HTTP contract over real HTTP on 127.0.0.1, on a fake index: results, filters,
errors, auth, request ids, metrics."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.fakes import FakeIndex, FakeOpener
from tests.service.live import assert_same_results, live_server
from tests.tolerances import assert_within, dot_bound

KEY = "s3cret-key"
HTTP = httpx.Client(timeout=30)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fake_index")


@pytest.fixture(scope="module")
def server(index_dir):
    settings = Settings(
        index_dir=index_dir, max_prompt_tokens=40, max_completion_tokens=20, max_batch_queries=4
    )
    with live_server(create_app(settings, opener=FakeOpener())) as base:
        yield base


@pytest.fixture(scope="module")
def auth_server(index_dir):
    settings = Settings(index_dir=index_dir, api_keys=[KEY, "other-key"])
    with live_server(create_app(settings, opener=FakeOpener())) as base:
        yield base


def expected_ranking(index_dir, prompt: str, completion: str, k: int, source=None):
    """Brute force over the fake's vectors: ids and scores, best first."""
    fake = FakeIndex(index_dir)
    q = fake.encode_queries([(prompt, completion)])[0]
    scores = fake.vectors @ q
    order = np.argsort(-scores, kind="stable")
    if source is not None:
        order = [i for i in order if fake.example(int(i)).source == source]
    return [int(i) for i in order[:k]], [float(scores[i]) for i in order[:k]]


def query(base, **body):
    return HTTP.post(f"{base}/v1/influence", json=body, timeout=30)


def test_query_returns_exact_ranking(server, index_dir):
    r = query(server, prompt="The capital of Drosora is", completion=" Mutu.", k=7)
    assert r.status_code == 200, r.text
    body = r.json()
    ids, scores = expected_ranking(index_dir, "The capital of Drosora is", " Mutu.", 7)
    assert [x["id"] for x in body["results"]] == ids
    fake = FakeIndex(index_dir)
    q = fake.encode_queries([("The capital of Drosora is", " Mutu.")])
    bound = dot_bound(q, fake.vectors[ids])[0]  # the server's matrix product vs a matvec
    assert_within([x["score"] for x in body["results"]], scores, bound, "scores")
    assert [x["rank"] for x in body["results"]] == list(range(1, 8))
    assert body["model"] == "fake-model" and body["index_version"] == "fake0000"
    first = body["results"][0]
    assert first["text"] == f"training example {ids[0]} " * 3
    assert first["document_id"] == f"doc{ids[0] // 4}"
    t = body["timings_ms"]
    assert 0 <= t["encode"] <= t["total"] and 0 <= t["search"] <= t["total"]


def test_filters_and_text_options(server, index_dir):
    body = query(server, prompt="p", completion="c", k=5, source="b").json()
    ids, _ = expected_ranking(index_dir, "p", "c", 5, source="b")
    assert [x["id"] for x in body["results"]] == ids
    assert {x["source"] for x in body["results"]} == {"b"}

    full = query(server, prompt="p", completion="c", k=50).json()["results"]
    threshold = full[9]["score"]
    cut = query(server, prompt="p", completion="c", k=50, min_score=threshold).json()["results"]
    assert [x["id"] for x in cut] == [x["id"] for x in full if x["score"] >= threshold]

    short = query(server, prompt="p", completion="c", k=3, max_text_chars=5).json()["results"]
    assert [x["text"] for x in short] == [x["text"][:5] for x in full[:3]]
    none = query(server, prompt="p", completion="c", k=3, return_text=False).json()["results"]
    assert [x["text"] for x in none] == [None] * 3


def test_k_larger_than_index_returns_all(server):
    body = query(server, prompt="p", completion="c", k=1000).json()
    assert len(body["results"]) == 200
    assert len({x["id"] for x in body["results"]}) == 200


def test_batch_equals_singles(server):
    queries = [
        {"prompt": f"prompt {i}", "completion": f" answer {i}", "k": 3 + i} for i in range(4)
    ]
    r = HTTP.post(f"{server}/v1/influence/batch", json={"queries": queries}, timeout=30)
    assert r.status_code == 200, r.text
    for q, got in zip(queries, r.json()["responses"], strict=True):
        single = query(server, **q).json()
        assert_same_results(got["results"], single["results"])


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "p", "completion": "c", "k": 0}, "k"),
        ({"prompt": "p", "completion": "c", "k": 1001}, "k"),
        ({"prompt": "p"}, "completion"),
        ({"prompt": "p", "completion": ""}, "completion"),
        ({"prompt": "p", "completion": "c", "colour": "red"}, "colour"),
        ({"prompt": 3, "completion": "c"}, "prompt"),
        ({"prompt": "p", "completion": "c", "mode": "telepathy"}, "mode"),
    ],
)
def test_schema_violation_is_422_naming_the_field(server, body, field):
    r = HTTP.post(f"{server}/v1/influence", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"]["field"] == field
    assert field in error["message"]


def test_malformed_json_is_422(server):
    r = HTTP.post(
        f"{server}/v1/influence", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_too_long_is_413(server):
    r = query(server, prompt="x" * 41, completion="c")
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "input_too_long"
    assert error["details"] == {"field": "prompt", "n_tokens": 41, "limit": 40}
    r = query(server, prompt="p", completion="y" * 21)
    assert r.status_code == 413 and r.json()["error"]["details"]["field"] == "completion"


def test_batch_limits_and_errors(server):
    q = {"prompt": "p", "completion": "c"}
    r = HTTP.post(f"{server}/v1/influence/batch", json={"queries": [q] * 5})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_queries"
    # A bad query fails alone, with what the single endpoint answers; its mates are answered.
    bad = {"prompt": "x" * 99, "completion": "c"}
    long_completion = {"prompt": "p", "completion": "y" * 21}  # over the completion limit
    r = HTTP.post(f"{server}/v1/influence/batch", json={"queries": [q, bad, q, long_completion]})
    assert r.status_code == 200, r.text
    body = r.json()
    single_ok, single_bad, single_long_completion = (
        query(server, **x) for x in (q, bad, long_completion)
    )
    assert [x is None for x in body["responses"]] == [False, True, False, True]
    for got in (body["responses"][0], body["responses"][2]):
        assert [h["id"] for h in got["results"]] == [h["id"] for h in single_ok.json()["results"]]
    assert body["errors"] == [
        {"query_index": 1, "status": single_bad.status_code, "error": single_bad.json()["error"]},
        {
            "query_index": 3,
            "status": single_long_completion.status_code,
            "error": single_long_completion.json()["error"],
        },
    ]
    assert single_bad.status_code == single_long_completion.status_code == 413
    assert single_long_completion.json()["error"]["details"]["field"] == "completion"
    r = HTTP.post(f"{server}/v1/influence/batch", json={"queries": [q, q]})
    assert r.status_code == 200 and r.json()["errors"] == [] and None not in r.json()["responses"]
    r = HTTP.post(f"{server}/v1/influence/batch", json={"queries": []})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "queries"


def test_examples_index_and_unknown_routes(server):
    r = HTTP.get(f"{server}/v1/examples/11")
    assert r.status_code == 200
    assert r.json()["text"] == "training example 11 " * 3 and r.json()["source"] == "b"
    r = HTTP.get(f"{server}/v1/examples/200")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = HTTP.get(f"{server}/v1/examples/-1")
    assert r.status_code == 422
    r = HTTP.get(f"{server}/v1/examples/abc")
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "example_id"
    summary = HTTP.get(f"{server}/v1/index").json()
    assert summary["model"] == "fake-model" and summary["size"] == 200
    assert summary["faiss"] == "Flat" and summary["index_version"] == "fake0000"
    r = HTTP.get(f"{server}/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = HTTP.get(f"{server}/v1/influence")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_request_id_is_echoed_or_generated(server):
    r = HTTP.get(f"{server}/healthz", headers={"X-Request-ID": "gw-123.abc"})
    assert r.headers["x-request-id"] == "gw-123.abc"
    a = HTTP.get(f"{server}/healthz").headers["x-request-id"]
    b = HTTP.get(f"{server}/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", a) and a != b
    r = HTTP.get(f"{server}/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move(server):
    before = HTTP.get(f"{server}/metrics").text
    for _ in range(3):
        assert query(server, prompt="m", completion="n").status_code == 200
    assert query(server, prompt="m", completion="n", k=0).status_code == 422
    after = HTTP.get(f"{server}/metrics").text
    route = {"route": "/v1/influence", "method": "POST"}
    for status, n in (("200", 3), ("422", 1)):
        delta = _metric(after, "influence_http_requests_total", status=status, **route) - _metric(
            before, "influence_http_requests_total", status=status, **route
        )
        assert delta == n
    assert (
        _metric(after, "influence_http_request_duration_seconds_count", status="200", **route) >= 3
    )
    assert (
        _metric(after, "influence_batch_size_count")
        >= _metric(before, "influence_batch_size_count") + 1
    )
    assert _metric(after, "influence_encode_seconds_count") > _metric(
        before, "influence_encode_seconds_count"
    )
    assert "influence_queue_depth 0.0" in after
    assert _metric(after, "influence_index_size") == 200


def test_auth(auth_server):
    url = f"{auth_server}/v1/influence"
    body = {"prompt": "p", "completion": "c"}
    r = HTTP.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = HTTP.post(url, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert HTTP.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert HTTP.post(url, json=body, headers={"X-API-Key": "other-key"}).status_code == 200
    assert HTTP.get(f"{auth_server}/v1/examples/1").status_code == 401
    assert HTTP.get(f"{auth_server}/v1/index", headers={"X-API-Key": "nope"}).status_code == 403
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert HTTP.get(auth_server + open_path).status_code == 200
    r = HTTP.post(f"{auth_server}/v1/admin/reload", headers={"X-API-Key": KEY})
    assert (
        r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    )  # query keys are not admin keys


def test_admin_reload_disabled_without_keys(server):
    r = HTTP.post(f"{server}/v1/admin/reload")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_not_ready_is_503_with_retry_after(tmp_path):
    (tmp_path / "BAD").write_text("corrupt")
    app = create_app(Settings(index_dir=tmp_path, retry_after_s=3), opener=FakeOpener())
    with live_server(app, ready_path="/healthz") as base:
        for path in ("/readyz", "/v1/index"):
            r = HTTP.get(base + path)
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "not_ready"
            assert "checksum mismatch" in r.json()["error"]["message"]
        r = query(base, prompt="p", completion="c")
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
