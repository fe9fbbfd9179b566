"""Locust load profile: influence queries through the gateway.

Each simulated user sends ``POST /v1/influence`` back to back (no think time), so the
number of users is the concurrency. Queries cycle through a queries.jsonl
(``{"prompt", "completion", ...}`` per line) named by ``INFLUENCE_QUERIES``, or a few
built-in prompts. Run by ``make load`` (deploy/load.py), or by hand against 127.0.0.1:

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 20s --host http://127.0.0.1:8080
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from pathlib import Path

from locust import HttpUser, constant, task

FALLBACK_QUERIES = [
    {"prompt": "The capital of Drosora is", "completion": " Mutu."},
    {"prompt": "Ana Tesko was born in", "completion": " Vanor"},
    {"prompt": "The river that runs through Marsel is the", "completion": " Dwen"},
]


def load_queries(path: str | None) -> list[dict]:
    """Queries from a queries.jsonl, or the built-in ones when no path is given.

    Args:
        path: a JSON-lines file with ``prompt`` and ``completion`` per line, or None.
    Returns:
        a non-empty list of ``{"prompt", "completion"}`` dicts.
    """
    if not path:
        return FALLBACK_QUERIES
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise ValueError(f"{path} holds no queries")
    return rows


QUERIES = load_queries(os.environ.get("INFLUENCE_QUERIES"))
TOP_K = int(os.environ.get("INFLUENCE_TOP_K", "10"))
_next_query = itertools.cycle(QUERIES)


class InfluenceUser(HttpUser):
    """A closed-loop client: one request in flight at a time, no think time."""

    wait_time = constant(0)

    @task
    def influence(self) -> None:
        query = next(_next_query)
        body = {**query, "k": TOP_K, "max_text_chars": 200}
        headers = {"X-Request-ID": f"load-{uuid.uuid4().hex[:16]}"}
        with self.client.post(
            "/v1/influence", json=body, headers=headers, name="/v1/influence", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif not resp.json().get("results"):
                resp.failure("200 without results")
            else:
                resp.success()
