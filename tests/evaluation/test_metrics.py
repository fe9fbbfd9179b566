"""Attribution metrics on hand-made rankings, BM25 (bm25s) and rank fusion."""

from __future__ import annotations

import numpy as np
import pytest

from api.errors import ArtifactError, InputError
from engine.fusion import reciprocal_rank_fusion
from evaluation.metrics import attribution_metrics, hit_at, reciprocal_rank
from indexer.bm25 import BM25Index


def test_reciprocal_rank_first_relevant_within_cutoff():
    assert reciprocal_rank([5, 7, 3], {3}, k=10) == pytest.approx(1 / 3)
    assert reciprocal_rank([3, 7, 5], {5, 3}, k=10) == 1.0  # the first relevant counts
    assert reciprocal_rank(list(range(20)), {12}, k=10) == 0.0  # beyond the cutoff
    assert reciprocal_rank(list(range(20)), {9}, k=10) == pytest.approx(0.1)
    assert reciprocal_rank([], {1}, k=10) == 0.0


def test_hit_at_ten():
    assert hit_at(list(range(10)), {9}, 10) == 1.0
    assert hit_at(list(range(11)), {10}, 10) == 0.0
    assert hit_at([4, 2], {2, 99}, 10) == 1.0


def test_attribution_metrics_averages_over_queries():
    rankings = np.array(
        [
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],  # relevant at rank 2
            [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 42],  # relevant (42) at rank 11: miss
            [42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # rank 1
            [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],  # relevant at rank 4 (and 10)
        ]
    )
    relevant = [{2}, {42}, {42, 3}, {8, 14}]
    m = attribution_metrics(rankings, relevant)
    assert m["mrr"] == pytest.approx((1 / 2 + 0 + 1 + 1 / 4) / 4)
    assert m["recall_at_10"] == pytest.approx(3 / 4)


def test_attribution_metrics_rejects_mismatched_inputs():
    with pytest.raises(InputError):
        attribution_metrics([[1, 2]], [{1}, {2}])
    with pytest.raises(InputError):
        attribution_metrics([], [])


def test_rrf_prefers_documents_ranked_high_by_both():
    # doc 7 is 2nd in both lists, 1 and 2 are 1st in one list but absent from the other.
    scores, ids = reciprocal_rank_fusion([[1, 7, 3], [2, 7, 4]], k=4)
    assert ids[0] == 7
    assert scores[0] == pytest.approx(2 / 62)
    assert set(ids[1:3].tolist()) == {1, 2} and scores[1] == pytest.approx(1 / 61)
    assert scores[3] == pytest.approx(1 / 63) and ids[3] == 3  # tie 3/4 broken by the lower id
    _, padded = reciprocal_rank_fusion([[5, -1]], k=3)
    assert padded.tolist() == [5, -1, -1]
    with pytest.raises(InputError):
        reciprocal_rank_fusion([[1]], k=1, weights=[1.0, 2.0])


def test_bm25_finds_the_stating_passage_and_round_trips(tmp_path, fact_corpus):
    texts = [p.text for p in fact_corpus.passages]
    ids = np.arange(100, 100 + len(texts))
    index = BM25Index.build(texts, ids)
    queries = fact_corpus.queries[:10]
    scores, got = index.search([q.prompt + q.completion for q in queries], k=10)
    assert got.shape == (10, 10) and np.all(np.diff(scores, axis=1) <= 0)
    row_of = {p.id: 100 + i for i, p in enumerate(fact_corpus.passages)}
    # The canonical statement is a prefix of one passage: lexical search must find it.
    hits = [
        bool({row_of[r] for r in q.relevant_ids} & set(g.tolist()))
        for q, g in zip(queries, got, strict=True)
    ]
    assert sum(hits) >= 8
    index.save(tmp_path)
    loaded = BM25Index.load(tmp_path)
    s2, g2 = loaded.search([queries[0].prompt + queries[0].completion], k=10)
    np.testing.assert_array_equal(g2[0], got[0])
    np.testing.assert_allclose(s2[0], scores[0], rtol=1e-6)
    pad_scores, pad_ids = BM25Index.build(["alpha beta", "gamma"]).search(["beta"], k=4)
    assert pad_ids[0].tolist() == [0, 1, -1, -1] and np.isinf(pad_scores[0, 2])
    with pytest.raises(ArtifactError):
        BM25Index.load(tmp_path / "nothing")


@pytest.fixture(scope="module")
def mode_server(tiny_index):
    import httpx

    from service.app import create_app
    from service.settings import Settings
    from tests.service.live import live_server

    settings = Settings(index_dir=tiny_index, api_keys=["k"], max_batch_size=4, max_wait_ms=5)
    with live_server(create_app(settings)) as base:
        with httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": "k"}) as client:
            yield client


def _answer(client, query, **extra):
    r = client.post(
        "/v1/influence", json={"prompt": query.prompt, "completion": query.completion, **extra}
    )
    assert r.status_code == 200, r.text
    return r.json()


def _ask(client, query, **extra):
    return _answer(client, query, **extra)["results"]


@pytest.mark.slow
def test_the_two_questions_over_http(mode_server, fact_corpus):
    """``influence`` is answered by the gradient search with its second stage; ``attribution``
    by the method the evaluation picks for it, which the response names."""
    from engine.retrieval import ATTRIBUTION_METHOD

    query = fact_corpus.queries[5]
    influence = _answer(mode_server, query, k=5, mode="influence")
    assert influence["method"] == "gradient" and influence["rescore"] is not None
    assert influence == {**_answer(mode_server, query, k=5), "timings_ms": influence["timings_ms"]}
    attribution = _answer(mode_server, query, k=5, mode="attribution")
    assert attribution["method"] == ATTRIBUTION_METHOD and attribution["rescore"] is None
    assert attribution["results"] == _ask(mode_server, query, k=5, mode=ATTRIBUTION_METHOD)
    # No second stage in attribution: asking for one changes nothing.
    assert attribution["results"] == _ask(mode_server, query, k=5, mode="attribution", rescore=50)
    for method in ("bm25", "hybrid"):
        assert _answer(mode_server, query, k=3, mode=method)["method"] == method


@pytest.mark.slow
def test_service_modes_bm25_and_hybrid_over_http(mode_server, tiny_index, fact_corpus):
    from engine.index import InfluenceIndex

    index = InfluenceIndex.open(tiny_index)
    try:
        texts = [r.text for r in index.examples(list(range(index.size)))]
    finally:
        index.close()
    reference = BM25Index.build(texts)
    query = fact_corpus.queries[3]
    text = query.prompt + query.completion

    bm25 = _ask(mode_server, query, k=5, mode="bm25")
    want_scores, want_ids = reference.search([text], 5)
    assert [r["id"] for r in bm25] == want_ids[0].tolist()
    np.testing.assert_allclose([r["score"] for r in bm25], want_scores[0], rtol=1e-5)
    assert text.rstrip(".") in bm25[0]["text"]

    influence = _ask(mode_server, query, k=100)
    assert influence == _ask(mode_server, query, k=100, mode="influence")  # default unchanged
    hybrid = _ask(mode_server, query, k=5, mode="hybrid")
    first_stage = _ask(mode_server, query, k=100, rescore=0)  # what the hybrid fuses
    fused_scores, fused_ids = reciprocal_rank_fusion(
        [reference.search([text], 100)[1][0], [r["id"] for r in first_stage]], 5
    )
    assert [r["id"] for r in hybrid] == fused_ids.tolist()
    np.testing.assert_allclose([r["score"] for r in hybrid], fused_scores, rtol=1e-6)
    bad = mode_server.post(
        "/v1/influence", json={"prompt": "a", "completion": " b", "mode": "lexical"}
    )
    assert bad.status_code == 422


def test_paired_difference_mean_se_and_bootstrap_interval():
    from evaluation.stats import paired_difference

    a = np.array([0.5, 1.0, 0.25, 1.0, 0.0, 0.5])
    b = np.array([0.25, 1.0, 0.0, 0.5, 0.0, 0.5])
    d = a - b
    got = paired_difference(a, b, seed=3)
    assert got["mean"] == pytest.approx(d.mean()) and got["n"] == 6
    assert got["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(6))
    # Bootstrap means lie within [min d, max d]; the interval holds the mean; seeded.
    assert d.min() <= got["ci95_low"] <= got["mean"] <= got["ci95_high"] <= d.max()
    assert paired_difference(a, b, seed=3) == got
    # A constant difference has no spread at all.
    same = paired_difference(a + 0.1, a)
    assert same["se"] == pytest.approx(0.0, abs=1e-15)
    assert same["ci95_low"] == pytest.approx(0.1) and same["ci95_high"] == pytest.approx(0.1)


def test_combine_seeds_means_spreads_and_pairs_per_query():
    from evaluation.results import EvalResult, combine_seeds

    def result(seed, rr_ts, rr_bm):
        rows = [
            {
                "method": "trackstar",
                "description": "t",
                "mrr": float(np.mean(rr_ts)),
                "tailpatch_top10_se": 0.1,
            },
            {
                "method": "bm25",
                "description": "b",
                "mrr": float(np.mean(rr_bm)),
                "tailpatch_top10_se": 0.1,
            },
        ]
        pq = {
            m: {
                "top10": [[seed]] * 3,
                "rr_at_10": rr,
                "hit_at_10": [1.0] * 3,
                "tailpatch_top1": [0.0] * 3,
                "tailpatch_top3": [0.0] * 3,
                "tailpatch_top10": [0.0] * 3,
            }
            for m, rr in (("trackstar", rr_ts), ("bm25", rr_bm))
        }
        ctx = {"base_logprob": [-1.0, 0.0, -2.0], "lambdas_by_fold": {"trackstar": [0.5, 0.5]}}
        return EvalResult(rows=rows, settings={"seed": seed}, context=ctx, per_query=pq)

    merged = combine_seeds(
        [result(0, [1.0, 0.5, 0.0], [0.5, 0.5, 0.0]), result(1, [0.5, 0.5, 1.0], [0.5, 0.5, 0.0])]
    )
    ts, bm = merged.rows
    assert ts["mrr"] == pytest.approx(0.5833333, rel=1e-6) and ts["mrr_sd"] == pytest.approx(
        np.std([0.5, 2 / 3], ddof=1)
    )
    assert bm["mrr_sd"] == 0.0 and ts["seeds"] == 2 and "tailpatch_top10_se" not in ts
    assert merged.per_query["trackstar"]["rr_at_10"] == [0.75, 0.5, 0.5]
    assert merged.per_query["trackstar"]["top10_by_seed"] == [[[0]] * 3, [[1]] * 3]
    rr = next(r for r in merged.paired["all"] if r["metric"] == "rr_at_10")
    assert rr["method"] == "bm25" and rr["mean"] == pytest.approx(np.mean([0.25, 0.0, 0.5]))
    # Query 1 has log p = 0 (p = 1): saturated, left out of the unsaturated pairs.
    assert {r["n"] for r in merged.paired["unsaturated"]} == {2}
    assert merged.context["seeds"] == [0, 1] and len(merged.context["by_seed"]) == 2
