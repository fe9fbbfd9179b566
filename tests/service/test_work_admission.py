"""Admission by work, not by request count (``service.work``): a request is estimated by the
encodes and second-stage candidates it may cost, at what they cost on this server, and is
refused up front when it cannot finish in the request timeout (413 ``work_over_budget``)
or would wait behind more admitted work than that (503, Retry-After from the backlog).
Before, a 40-query batch at the defaults was accepted and answered 503 after the 60 s
timeout, every time."""

from __future__ import annotations

import time

import httpx
import pytest

from api.errors import BacklogError, WorkOverBudgetError
from engine.certify import Certificate
from engine.query import Outcome
from service.app import create_app
from service.settings import Settings
from service.work import WorkMeter
from tests.service.fakes import FakeIndex
from tests.service.live import live_server


def _batch(
    encode_ms: float, rescored: list[int], rescore_ms: list[float], certified: bool = False
) -> list[Outcome]:
    return [
        Outcome(
            encode_ms=encode_ms,
            search_ms=0.0,
            rescore_ms=ms,
            certificate=Certificate(n, certified, 0.95, 0.0 if certified else 1.0),
        )
        for n, ms in zip(rescored, rescore_ms, strict=True)
    ]


def test_the_meter_learns_both_costs_and_refuses_what_cannot_fit():
    meter = WorkMeter(timeout_s=1.0)
    assert meter.admit([1000] * 1000) == 0.0  # nothing measured yet: admitted
    meter.release(0.0)
    meter.observe(
        _batch(100.0, [40, 0, 0, 0], [80.0, 0.0, 0.0, 0.0])
    )  # 4 queries share 100 ms; 40 candidates 80 ms; no stage was certified: all ran to cap
    assert meter.encode_s == pytest.approx(0.025) and meter.candidate_s == pytest.approx(0.002)
    assert meter.estimate([100, 0]) == pytest.approx(2 * 0.025 + 100 * 0.002)
    with pytest.raises(WorkOverBudgetError) as over:
        meter.admit([600])  # 0.025 + 1.2 s > 1 s
    assert over.value.details["timeout_s"] == 1.0 and over.value.details["candidates"] == 600
    first = meter.admit([300])  # 0.625 s: admitted
    with pytest.raises(BacklogError) as behind:
        meter.admit([200])  # 0.425 s more would end past the timeout
    assert behind.value.http_status == 503 and behind.value.details["retry_after_s"] == 1
    meter.release(first)
    assert meter.admit([200]) > 0  # the backlog cleared


def test_a_stage_that_stops_early_does_not_inflate_the_cost_per_candidate():
    """A certified stage that stops after 2 candidates still pays its fixed part (the query's
    own pass, its pool): the meter fits fixed + per-candidate, so the cap of the next request
    is not charged 25 ms a candidate."""
    meter = WorkMeter(timeout_s=60.0)
    fixed, per = 0.05, 0.002
    rescored = [2, 100, 40, 7]
    meter.observe(_batch(40.0, rescored, [1e3 * (fixed + per * n) for n in rescored]))
    # Collinear points give the line exactly, up to a few float64 operations on them.
    assert meter.stage_s == pytest.approx(fixed, rel=1e-9)
    assert meter.candidate_s == pytest.approx(per, rel=1e-9)
    assert meter.estimate([100]) == pytest.approx(0.01 + fixed + 100 * per, rel=1e-9)
    # One count alone (every stage at its cap) cannot split the two: all per candidate.
    capped = WorkMeter(timeout_s=60.0)
    capped.observe(_batch(10.0, [100, 100], [300.0, 300.0]))
    assert capped.stage_s == 0.0 and capped.candidate_s == pytest.approx(0.003, rel=1e-12)


def test_a_cap_is_charged_the_candidates_certified_stages_needed():
    """Stages certified after 3 candidates are expected to stop there again, whatever the
    cap: four requests at the default cap of 100, each of whose stages took 0.3 s when cold,
    fit in a 2 s timeout (charging each cap in full, 100 x 0.1 s, refused them all and,
    behind a gateway, took every replica out). Stages that ran to their cap are charged it."""
    meter = WorkMeter(timeout_s=2.0)
    meter.observe(_batch(10.0, [3], [300.0], certified=True))
    assert meter.capped == 0.0 and meter.certified_n == 3.0
    assert meter.expected_candidates(100) == 3.0 and meter.expected_candidates(2) == 2.0
    assert meter.estimate([100]) == pytest.approx(0.01 + 0.3, rel=1e-12)
    admitted = [meter.admit([100]) for _ in range(4)]
    assert sum(admitted) == pytest.approx(4 * 0.31, rel=1e-12)
    # Half the stages now run to their cap: a cap is expected half in full, half at 3.
    meter.release(sum(admitted))
    mixed = WorkMeter(timeout_s=2.0, smoothing=0.5)
    mixed.observe(_batch(10.0, [3], [30.0], certified=True))
    mixed.observe(_batch(10.0, [100], [1000.0], certified=False))
    assert mixed.capped == 0.5 and mixed.expected_candidates(100) == pytest.approx(51.5)
    assert mixed.expected_candidates(1000) == pytest.approx(501.5)


class SlowCandidates(FakeIndex):
    """Each candidate of the second stage takes at least 2.5 ms."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunks = 0

    def exact_scorer(self, example):
        score = super().exact_scorer(example)

        def slow(ids):
            self.chunks += 1
            time.sleep(0.0025 * len(ids))
            return score(ids)

        return slow


def test_a_request_that_cannot_finish_in_time_is_refused_up_front(tmp_path):
    opened: list[SlowCandidates] = []

    def opener(path):
        opened.append(SlowCandidates(path))
        return opened[-1]

    settings = Settings(index_dir=tmp_path, request_timeout_s=5.0, max_batch_queries=64)
    query = {"prompt": "what is", "completion": " this", "k": 5}
    with (
        live_server(create_app(settings, opener=opener)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        warm = client.post(
            "/v1/influence", json={**query, "rescore": 40}
        )  # learns what a candidate costs
        assert warm.status_code == 200 and warm.json()["rescore"]["candidates"] == 40
        chunks = opened[0].chunks
        # 64 queries x 200 candidates (the whole index) at >= 2.5 ms each is >= 32 s:
        # over the 5 s timeout.
        r = client.post("/v1/influence/batch", json={"queries": [{**query, "rescore": 1000}] * 64})
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "work_over_budget" and error["details"]["timeout_s"] == 5.0
        assert error["details"]["candidates"] == 64 * 200
        r = client.post("/v1/influence", json={**query, "rescore": 1000, "k": 10})
        assert r.status_code == 200  # 200 candidates x ~2.5 ms = 0.5 s fits in 5 s
        assert opened[0].chunks > chunks
        refused_then = opened[0].chunks
        r = client.post(
            "/v1/influence/batch", json={"queries": [{**query, "rescore": 1000}] * 16}
        )  # >= 8 s
        assert r.status_code == 413 and opened[0].chunks == refused_then  # nothing of it ran
