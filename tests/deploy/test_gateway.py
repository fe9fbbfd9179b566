"""The gateway for real: nginx with deploy/nginx.conf in front of two live replicas."""

from __future__ import annotations

import gzip
import json
import time
import uuid

import httpx
import pytest

from deploy.harness import Gateway


@pytest.fixture(scope="module")
def gateway(replicas, tmp_path_factory):
    gw = Gateway(
        tmp_path_factory.mktemp("gateway"),
        [r.address for r in replicas],
        rate_limit="1000r/s",
        rate_burst=1000,
    )
    gw.start()
    yield gw
    gw.stop()


def _log_lines(gw: Gateway) -> list[dict]:
    return [json.loads(line) for line in gw.access_log.read_text().splitlines() if line]


def _until(condition, seconds: float = 30.0) -> None:
    """Poll until ``condition()`` holds: an ordering point on what was logged, not a delay."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_queries_are_answered_and_balanced(gateway, replicas, query_body):
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for _ in range(8):
            resp = client.post("/v1/influence", json=query_body)
            assert resp.status_code == 200, resp.text
            results = resp.json()["results"]
            assert 0 < len(results) <= query_body["k"]
            scores = [r["score"] for r in results]
            assert scores == sorted(scores, reverse=True)
    addresses = {r.address for r in replicas}

    def served_by() -> set[str]:  # nginx writes the access line after the response
        return {line["upstream"] for line in _log_lines(gateway) if line["uri"] == "/v1/influence"}

    _until(lambda: served_by() >= addresses)
    assert served_by() == addresses


def test_each_replica_keeps_to_its_share_of_the_cores(replicas):
    """Replicas that share a host run the torch threads the harness gives them (one each
    here), not the server's default of every core each: OpenMP threads oversubscribed that
    way spin against each other and made requests 100x slower under load."""
    for replica in replicas:
        assert "torch and FAISS threads: 1" in replica.log_text(), replica.log_text()[-2000:]


def test_request_id_passes_through_and_is_logged(gateway, replicas, query_body):
    rid = f"deploy-test-{uuid.uuid4().hex[:12]}"
    resp = httpx.post(
        f"{gateway.url}/v1/influence", json=query_body, headers={"X-Request-ID": rid}, timeout=30
    )
    assert resp.status_code == 200
    assert resp.headers.get_list("x-request-id") == [rid]
    # Without one, the gateway mints an id, and the replica logs that same id.
    minted = httpx.get(f"{gateway.url}/v1/index", timeout=30)
    assert minted.status_code == 200
    new_id = minted.headers["x-request-id"]
    assert new_id and new_id != rid
    _until(lambda: any(line["request_id"] == rid for line in _log_lines(gateway)))
    _until(lambda: f"request_id={new_id}" in "".join(r.log_text() for r in replicas))
    assert f"request_id={rid}" in "".join(r.log_text() for r in replicas)


def test_json_is_gzipped_when_asked(gateway, query_body):
    body = {**query_body, "k": 20}
    url = f"{gateway.url}/v1/influence"
    with httpx.Client(timeout=30) as client:
        zipped = client.post(url, json=body, headers={"Accept-Encoding": "gzip"})
        plain = client.post(url, json=body, headers={"Accept-Encoding": "identity"})
    assert zipped.status_code == plain.status_code == 200
    assert len(plain.content) > 1024, "response too small to exercise gzip_min_length"
    assert zipped.headers["content-encoding"] == "gzip"
    assert "content-encoding" not in plain.headers
    assert zipped.json()["results"] == plain.json()["results"]
    # The bytes on the wire really are gzip, and smaller.
    with httpx.stream(
        "POST", url, json=body, headers={"Accept-Encoding": "gzip"}, timeout=30
    ) as raw:
        wire = b"".join(raw.iter_raw())
    assert len(wire) < len(plain.content)
    assert json.loads(gzip.decompress(wire))["results"] == plain.json()["results"]


def _influence_lines_settled(replicas) -> int:
    """The replicas' /v1/influence log lines once every earlier request is logged: a request
    sent to each replica now, once logged there, orders the count (a previous test's last
    line is written after its response reached the client)."""
    marker = f"settle-{uuid.uuid4().hex[:8]}"
    for r in replicas:
        httpx.get(f"http://{r.address}/v1/index", headers={"X-Request-ID": marker}, timeout=30)
    _until(lambda: all(f"request_id={marker}" in r.log_text() for r in replicas))
    return sum(r.log_text().count("/v1/influence") for r in replicas)


def test_body_over_limit_is_413_at_the_gateway(gateway, replicas):
    before = _influence_lines_settled(replicas)
    big = {"prompt": "x" * (1536 * 1024), "completion": " y"}
    resp = httpx.post(f"{gateway.url}/v1/influence", json=big, timeout=30)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert resp.headers.get("x-request-id")
    # Had the over-limit body been passed on, its line would be logged before the marker's.
    after = _influence_lines_settled(replicas)
    assert after == before, "an over-limit body must not reach a replica"


def test_metrics_and_admin_stay_internal(gateway, replicas):
    assert httpx.get(f"{gateway.url}/metrics", timeout=10).status_code == 404
    assert httpx.post(f"{gateway.url}/v1/admin/reload", timeout=10).status_code == 404
    direct = httpx.get(f"http://{replicas[0].address}/metrics", timeout=10)
    assert direct.status_code == 200 and "# TYPE" in direct.text


def test_rate_limit_answers_429_then_recovers(replicas, tmp_path):
    gw = Gateway(tmp_path, [r.address for r in replicas], rate_limit="2r/s", rate_burst=3)
    gw.start()
    try:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            started = time.monotonic()
            codes = [client.get("/healthz") for _ in range(20)]
            elapsed = time.monotonic() - started
            ok = sum(r.status_code == 200 for r in codes)
            limited = [r for r in codes if r.status_code == 429]
            assert ok + len(limited) == 20
            # 1 + burst at once, then 2 per second.
            assert 1 <= ok <= 1 + 3 + int(2 * elapsed) + 1
            assert len(limited) >= 20 - (1 + 3 + int(2 * elapsed) + 1)
            assert limited[0].json()["error"]["code"] == "rate_limited"
            assert limited[0].headers["retry-after"] == "1"
            time.sleep(1.1)
            assert client.get("/healthz").status_code == 200
    finally:
        gw.stop()


def test_no_live_replica_is_a_json_503(tmp_path):
    """Every upstream refuses: the gateway's own error is JSON with a code and Retry-After."""
    from deploy.harness import free_port

    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    gw = Gateway(tmp_path, dead)
    gw.start()
    try:
        resp = httpx.post(
            f"{gw.url}/v1/influence",
            json={"prompt": "a", "completion": " b"},
            headers={"X-Request-ID": "all-down-1"},
            timeout=30,
        )
    finally:
        gw.stop()
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "unavailable"
    assert resp.headers["retry-after"] == "5"
    assert resp.headers["x-request-id"] == "all-down-1"
    line = json.loads(gw.access_log.read_text().splitlines()[-1])
    # nginx tried both replicas before giving up.
    assert set(line["upstream"].split(", ")) == set(dead)
