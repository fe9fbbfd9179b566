"""A short, bounded locust run through the gateway (the same path as `make load`)."""

from __future__ import annotations

import math

import pytest

from deploy.harness import Gateway
from deploy.load import run_locust, write_results


@pytest.mark.slow
def test_locust_through_gateway_short_run(replicas, fact_corpus_files, tmp_path):
    _, queries = fact_corpus_files
    gw = Gateway(
        tmp_path / "gw", [r.address for r in replicas], rate_limit="100000r/s", rate_burst=100000
    )
    gw.start()
    try:
        stats = run_locust(gw.url, 4, 4, queries, tmp_path / "smoke")
    finally:
        gw.stop()
    assert stats["requests"] > 0 and stats["failures"] == 0, stats
    assert stats["rps"] > 0 and not math.isnan(stats["p99_ms"])
    # locust computes percentiles from rounded response times (locust.stats
    # .round_response_time: to 1 ms below 100 ms, 10 ms below 1 s, 100 ms below 10 s), so a
    # percentile may exceed the exact maximum by half its rounding step.
    step = (
        1
        if stats["max_ms"] < 100
        else 10
        if stats["max_ms"] < 1000
        else 100
        if stats["max_ms"] < 10000
        else 1000
    )
    assert stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"] + step / 2 + 1
    # Every request locust counted went through nginx to a replica.
    proxied = [line for line in gw.access_log.read_text().splitlines() if "/v1/influence" in line]
    assert len(proxied) >= stats["requests"]

    report = {
        "date": "test",
        "command": "test",
        "run_time_s": 4,
        "levels": {"4": stats},
        "environment": {
            "replicas": 2,
            "threads_per_replica": 1,
            "nginx": "x",
            "cpus": 2,
            "load_avg_at_start": 0.0,
            "index": "Flat",
            "index_size": 1,
            "dim": 1,
        },
    }
    _, md = write_results(report, tmp_path / "results")
    assert f"| 4 | {stats['requests']} | 0 |" in md.read_text()


def test_run_locust_refuses_non_local_hosts(tmp_path):
    with pytest.raises(ValueError, match="127.0.0.1"):
        run_locust("http://example.com:80", 1, 1, tmp_path / "q.jsonl", tmp_path / "x")
