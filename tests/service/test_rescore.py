"""The exact second stage over HTTP on a real index: ``rescore`` re-ranks the first stage's
candidates by their unprojected corrected gradients, so with every sequence as a candidate
the answer is the unprojected, unwhitened index's answer (k = 0, hessian none)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.cli import main as influence_main
from service.settings import Settings
from tests.service.live import live_server
from tests.tolerances import FLOAT16_SCORE, recompute_bound

PROMPT, COMPLETION = "The capital of Drosora is", " Mutu."
# The exact index stores float16 fingerprints (FLOAT16_SCORE); the re-scored and the indexed
# gradients are computed in other batch shapes (recompute_bound, float32 model).
SCORE_BOUND = FLOAT16_SCORE + 2 * recompute_bound(np.float32)


@pytest.fixture(scope="module")
def exact_index(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    from encoder.config import FingerprintConfig
    from indexer.build import BuildConfig, run_build

    corpus, _ = fact_corpus_files
    return run_build(
        BuildConfig(
            model=trained_checkpoint.checkpoint_dir,
            corpus=corpus,
            out=tmp_path_factory.mktemp("exact_index") / "index",
            fingerprint=FingerprintConfig(
                k=0, hessian="none", projection="gaussian", correction=True
            ),
            shard_size=16,
            batch_size=8,
        )
    )


@pytest.fixture(scope="module")
def client(paper_index):
    with live_server(create_app(Settings(index_dir=paper_index))) as base:
        with httpx.Client(base_url=base, timeout=120) as c:
            yield c


def _query(client, **extra):
    r = client.post("/v1/influence", json={"prompt": PROMPT, "completion": COMPLETION, **extra})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _exact_rows(exact_index, k, capsys):
    rc = influence_main(
        [
            "query",
            "--index",
            str(exact_index),
            "--prompt",
            PROMPT,
            "--completion",
            COMPLETION,
            "-k",
            str(k),
            "--json",
        ]
    )
    assert rc == 0
    return json.loads(capsys.readouterr().out)["results"]


def test_rescoring_every_candidate_gives_the_unprojected_ranking(
    client, paper_index, exact_index, capsys
):
    size = client.get("/v1/index").json()["size"]
    got = _query(client, k=10, rescore=size)
    want = _exact_rows(exact_index, 10, capsys)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    gaps = np.abs(np.array([r["score"] for r in got]) - np.array([r["score"] for r in want]))
    assert gaps.max() <= SCORE_BOUND, gaps
    # The projected first stage alone ranks differently (else this test could not fail).
    first = _query(client, k=10)
    assert [r["id"] for r in first] != [r["id"] for r in want]
    # influence query --rescore answers the same.
    rc = influence_main(
        [
            "query",
            "--index",
            str(paper_index),
            "--prompt",
            PROMPT,
            "--completion",
            COMPLETION,
            "-k",
            "10",
            "--rescore",
            str(size),
            "--json",
        ]
    )
    assert rc == 0
    cli = json.loads(capsys.readouterr().out)["results"]
    assert [r["id"] for r in cli] == [r["id"] for r in got]
    assert np.abs(
        np.array([r["score"] for r in cli]) - np.array([r["score"] for r in got])
    ).max() <= 2 * recompute_bound(np.float32)


def test_rescore_below_k_reorders_the_first_stage_top_k(client):
    first = _query(client, k=8)
    again = _query(client, k=8, rescore=3)  # pool = max(rescore, k) = 8
    assert {r["id"] for r in again} == {r["id"] for r in first}
    scores = [r["score"] for r in again]
    assert scores == sorted(scores, reverse=True)


def test_rescore_with_a_source_filter_keeps_the_filter(client):
    source = _query(client, k=1)[0]["source"]
    got = _query(client, k=5, rescore=20, source=source)
    assert got and all(r["source"] == source for r in got)


def test_other_modes_ignore_rescore(client):
    assert _query(client, k=5, mode="bm25", rescore=50) == _query(client, k=5, mode="bm25")


@pytest.mark.parametrize(
    "extra", [{"rescore": -1}, {"rescore": 10**6}, {"rescore": "5"}, {"rescore": 2.5}]
)
def test_bad_rescore_requests_are_422(client, extra):
    r = client.post("/v1/influence", json={"prompt": PROMPT, "completion": COMPLETION, **extra})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_error"


def test_server_default_rescore_and_its_override(paper_index, exact_index, capsys):
    want = [r["id"] for r in _exact_rows(exact_index, 5, capsys)]
    with live_server(create_app(Settings(index_dir=paper_index, rescore=1000))) as base:
        with httpx.Client(base_url=base, timeout=120) as c:
            assert [r["id"] for r in _query(c, k=5)] == want  # the server's default applies
            off = _query(c, k=5, rescore=0)  # the request turns it off
            hybrid = _query(c, k=5, mode="hybrid")  # other modes ignore the default
    with live_server(create_app(Settings(index_dir=paper_index))) as base:
        with httpx.Client(base_url=base, timeout=120) as c:
            assert _query(c, k=5) == off
            assert _query(c, k=5, mode="hybrid") == hybrid


def test_score_sd_is_null_when_whitened_and_zero_when_rescored(client):
    """(A hessian-none projected index reports sd > 0: tests/indexer/test_budget_index.py.)"""
    assert all(r["score_sd"] is None for r in _query(client, k=5))
    assert all(r["score_sd"] == 0.0 for r in _query(client, k=5, rescore=20))


def test_the_response_says_how_the_second_stage_ended(client):
    """paper_index has a projected R: no first-stage uncertainty model, so the stage scores
    to its cap and certifies only when that cap is the whole index."""
    size = client.get("/v1/index").json()["size"]

    def ask(**extra):
        r = client.post(
            "/v1/influence", json={"prompt": PROMPT, "completion": COMPLETION, "k": 3, **extra}
        )
        assert r.status_code == 200, r.text
        return r.json()

    whole = ask(rescore=size, confidence=0.9)
    assert whole["rescore"] == {
        "candidates": size,
        "certified": True,
        "confidence": 0.9,
        "miss_probability": 0.0,
    }
    t = whole["timings_ms"]
    assert (
        0 < t["rescore"] <= t["total"] and 0 <= t["search"] < t["rescore"]
    )  # the split is not double-counted
    capped = ask(rescore=20)
    assert capped["rescore"] == {
        "candidates": 20,
        "certified": False,
        "confidence": 0.95,
        "miss_probability": 1.0,
    }
    off = ask(rescore=0)
    assert off["rescore"] is None and off["timings_ms"]["rescore"] == 0


@pytest.mark.parametrize("confidence", [0, 1, 1.5, -0.1, "0.9", float("nan")])
def test_bad_confidence_is_422(client, confidence):
    body = json.dumps(
        {"prompt": PROMPT, "completion": COMPLETION, "confidence": confidence}, allow_nan=True
    )
    r = client.post("/v1/influence", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
