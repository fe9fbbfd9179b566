"""The vectorized exact re-rank against a per-query reference, and the IVF search path."""

from __future__ import annotations

import numpy as np

from indexer import exact, faiss_index
from indexer.exact import rerank_exact
from indexer.faiss_index import SearchParams
from tests.tolerances import assert_within, dot_bound


def _reference(queries, candidates, fingerprints, k):
    """One query at a time: unique candidates, exact scores, stable descending order."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for q, row in enumerate(candidates):
        cand = np.unique(row[row >= 0])
        dots = fingerprints[cand].astype(np.float32) @ queries[q]
        order = np.argsort(-dots, kind="stable")[:k]
        scores[q, : order.size], ids[q, : order.size] = dots[order], cand[order]
    return scores, ids


def test_rerank_matches_per_query_reference_with_padding_and_duplicates():
    rng = np.random.default_rng(0)
    fingerprints = rng.standard_normal((300, 24)).astype(np.float16)
    queries = rng.standard_normal((6, 24)).astype(np.float32)
    candidates = rng.integers(-1, 300, (6, 40))
    candidates[1] = -1  # no candidates at all
    candidates[2, :] = -1
    candidates[2, :3] = [7, 5, 7]  # fewer than k, with a duplicate
    candidates[3] = candidates[3, 0]  # one id repeated
    scores, ids = rerank_exact(queries, candidates, fingerprints, k=10)
    ref_scores, ref_ids = _reference(queries, candidates, fingerprints, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    found = ids >= 0
    bound = np.stack(
        [
            dot_bound(queries[q : q + 1], fingerprints[np.maximum(ids[q], 0)].astype(np.float32))[0]
            for q in range(6)
        ]
    )
    assert_within(scores[found], ref_scores[found], bound[found], "re-ranked scores")
    assert np.isneginf(ref_scores[~found]).all() and np.isneginf(scores[~found]).all()
    assert sorted(ids[2, :2].tolist()) == [5, 7]  # the duplicate 7 counts once
    assert (ids[2, 2:] == -1).all() and np.isneginf(scores[1]).all()


def test_rerank_bounded_memory_blocks_agree(monkeypatch):
    rng = np.random.default_rng(1)
    fingerprints = rng.standard_normal((200, 16)).astype(np.float16)
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    candidates = rng.integers(0, 200, (9, 30))
    whole = rerank_exact(queries, candidates, fingerprints, k=5)
    monkeypatch.setattr(exact, "RERANK_GATHER_BYTES", 30 * 16 * 4 * 2)  # 2 queries a block
    blocked = rerank_exact(queries, candidates, fingerprints, k=5)
    np.testing.assert_array_equal(whole[1], blocked[1])
    bound = np.stack(
        [
            dot_bound(queries[q : q + 1], fingerprints[whole[1][q]].astype(np.float32))[0]
            for q in range(9)
        ]
    )
    assert_within(blocked[0], whole[0], bound, "blocked re-rank")  # BLAS sums in another order


def test_ivf_search_reranked_is_exact_on_its_candidates():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    fingerprints = vectors.astype(np.float16)
    index = faiss_index.build_index("IVF16,SQ8", 32, [fingerprints.astype(np.float32)], vectors)
    queries = vectors[:5]
    params = SearchParams(nprobe=16, candidates=2000)  # every list, every vector: exact
    faiss_index.set_search_params(index, params)
    scores, ids = faiss_index.search(index, fingerprints, queries, 10, candidates=params.candidates)
    truth = exact.exact_top_k(fingerprints, queries, 10)
    np.testing.assert_array_equal(ids, truth)
    rows = fingerprints[ids].astype(np.float32)  # [Q, k, d]
    expected = np.einsum("qd,qkd->qk", queries, rows)
    bound = np.stack([dot_bound(queries[q : q + 1], rows[q])[0] for q in range(len(queries))])
    assert_within(scores, expected, bound, "IVF re-ranked scores")
    assert (np.diff(scores, axis=1) <= 0).all()


def test_dot_rows_blocks_equal_one_float32_product(monkeypatch, tmp_path):
    """The blocked float16 -> float32 widening gives the products of widening everything
    first, for blocks that split the candidates unevenly and for a memory-mapped store."""
    rng = np.random.default_rng(4)
    fingerprints = rng.standard_normal((500, 64)).astype(np.float16)
    queries = rng.standard_normal((3, 64)).astype(np.float32)
    ids = np.sort(rng.choice(500, 77, replace=False))
    want = queries @ fingerprints[ids].astype(np.float32).T
    monkeypatch.setattr(exact, "RERANK_BLOCK_ROWS", 10)  # 8 blocks, the last of 7
    got = exact.dot_rows(queries, fingerprints, ids)
    assert got.shape == (3, 77) and got.dtype == np.float32
    bound = dot_bound(queries, fingerprints[ids].astype(np.float32))  # the two sum in other orders
    assert_within(got, want, bound, "blocked products")
    np.save(tmp_path / "fp.npy", fingerprints)
    mapped = np.load(tmp_path / "fp.npy", mmap_mode="r")
    np.testing.assert_array_equal(exact.dot_rows(queries, mapped, ids), got)
    assert_within(
        exact.dot_rows(queries, fingerprints.astype(np.float32), ids), want, bound, "float32 store"
    )
    assert exact.dot_rows(queries, fingerprints, ids[:0]).shape == (3, 0)
