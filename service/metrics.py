"""Prometheus metrics, one ``CollectorRegistry`` per app (so tests and apps never share).

Route labels are route templates (``/v1/examples/{example_id}``), never raw paths, so
cardinality stays bounded; unmatched paths are labelled ``unmatched``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from engine.protocols import Index
from engine.query import Outcome

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The service's metrics on a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "influence_http_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "influence_http_request_duration_seconds",
            "HTTP request latency by route, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "influence_queue_depth", "Queries waiting for a batch.", registry=r
        )
        self.batch_size = Histogram(
            "influence_batch_size", "Queries per encode pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.encode_seconds = Histogram(
            "influence_encode_seconds",
            "Encode time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.search_seconds = Histogram(
            "influence_search_seconds",
            "Search + metadata time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "influence_rejected_total", "Queries refused with 503, by code.", ["code"], registry=r
        )
        self.reloads = Counter(
            "influence_index_reloads_total", "Index reloads by outcome.", ["outcome"], registry=r
        )
        self.index_size = Gauge(
            "influence_index_size", "Training examples in the served index.", registry=r
        )
        self.backend = Info(
            "influence_vector_backend", "The vector search serving the index.", registry=r
        )

    def observe_index(self, index: Index) -> None:
        """Describe a newly served index: its version and the vector search serving it."""
        summary = index.summary()
        self.backend.info({"backend": summary.backend, "index_version": summary.index_version})

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def observe_batch(self, outcomes: list[Outcome]) -> None:
        """Record one finished micro-batch (all outcomes share the batch timings)."""
        if not outcomes:
            return
        first = outcomes[0]
        self.batch_size.observe(len(outcomes))
        self.encode_seconds.observe(first.encode_ms / 1e3)
        self.search_seconds.observe(first.search_ms / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)
