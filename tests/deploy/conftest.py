"""Fixtures for the live gateway tests: two real replicas of the tiny index behind nginx."""

from __future__ import annotations

import json

import pytest

from deploy.harness import find_nginx, start_replicas


def _need_nginx() -> None:
    if find_nginx() is None:
        pytest.skip("nginx is not installed and could not be: `make system-deps` installs it")


@pytest.fixture(scope="package")
def replica_pool(tiny_index, tmp_path_factory):
    """Three ``influence serve`` replicas of ``tiny_index`` on 127.0.0.1, started together
    once for tests/deploy (stopped after it): the gateway tests use the first two, the
    failover test kills the third."""
    _need_nginx()
    started = start_replicas(tiny_index, 3, tmp_path_factory.mktemp("replicas"), timeout_s=300)
    yield started
    for replica in started:
        replica.stop()


@pytest.fixture(scope="package")
def replicas(replica_pool):
    """The two replicas behind the shared gateway (never killed)."""
    return replica_pool[:2]


@pytest.fixture(scope="session")
def query_body(fact_corpus_files) -> dict:
    """One real fact query from the test corpus, as a /v1/influence body."""
    _, queries = fact_corpus_files
    first = json.loads(queries.read_text().splitlines()[0])
    return {"prompt": first["prompt"], "completion": first["completion"], "k": 3}
