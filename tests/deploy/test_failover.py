"""Failover through the gateway: SIGKILL one of two replicas under load, lose no request.

The victim is the pool's third replica, which no other test routes to.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest

from deploy.harness import Gateway

log = logging.getLogger(__name__)

WORKERS = 4
BEFORE_KILL = 40  # answered requests before the kill
AFTER_KILL = 80  # requests sent after the kill
DEADLINE_S = 60.0


@pytest.mark.slow
def test_killing_a_replica_mid_run_fails_no_request(replica_pool, query_body, tmp_path):
    survivor, victim = replica_pool[0], replica_pool[2]
    gw = Gateway(
        tmp_path, [victim.address, survivor.address], rate_limit="1000r/s", rate_burst=1000
    )
    gw.start()
    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()
    sent = {"before": 0, "after": 0}
    failures: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            while not stop.is_set():
                phase = "after" if killed.is_set() else "before"
                try:
                    resp = client.post("/v1/influence", json=query_body)
                    ok = resp.status_code == 200 and bool(resp.json()["results"])
                    why = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)
                with lock:
                    sent[phase] += 1
                    if not ok:
                        failures.append(why)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(WORKERS)]
    deadline = time.monotonic() + DEADLINE_S
    try:
        for t in threads:
            t.start()
        while sent["before"] < BEFORE_KILL and time.monotonic() < deadline:
            time.sleep(0.01)
        victim.kill()  # SIGKILL with requests in flight
        killed.set()
        killed_at = time.monotonic()
        while sent["after"] < AFTER_KILL and time.monotonic() < deadline:
            time.sleep(0.01)
        after_kill_s = time.monotonic() - killed_at
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=35)
        gw.stop()

    total = sent["before"] + sent["after"]
    log.info(
        "failover: %d requests sent (%d after the kill), %d failed",
        total,
        sent["after"],
        len(failures),
    )
    assert sent["before"] >= BEFORE_KILL and sent["after"] >= AFTER_KILL, sent
    assert victim.proc.poll() is not None, "the victim replica should be dead"
    assert failures == [], f"{len(failures)} of {total} failed: {failures[:3]}"

    lines = [json.loads(x) for x in gw.access_log.read_text().splitlines() if x]
    queries = [x for x in lines if x["uri"] == "/v1/influence"]
    assert len(queries) == total and all(x["status"] == 200 for x in queries)
    # Before the kill both replicas served; the survivor served everything after it.
    assert {x["upstream"] for x in queries[:BEFORE_KILL]} == {victim.address, survivor.address}
    assert all(x["upstream"].endswith(survivor.address) for x in queries[-AFTER_KILL // 2 :])
    # Health-aware: the requests caught by the kill were retried on the survivor, then the
    # victim was taken out (max_fails=1) and only probed again once per fail_timeout (10 s),
    # so few requests paid for a retry.
    retried = [x for x in queries if x["upstream"] == f"{victim.address}, {survivor.address}"]
    assert 1 <= len(retried) <= WORKERS * (2 + int(after_kill_s // 10)), len(retried)
