"""Retrieval: a query's hits by influence, BM25 or both fused, from one source or all,
optionally re-scored exactly; the one place that dispatches on ``Query.mode``.

All functions take an ``engine.protocols.Index`` and fingerprints it encoded; fusion itself
is ``engine.fusion.reciprocal_rank_fusion``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from api.errors import InputError, QueryAbandonedError
from api.models import AnswerMethod, Mode
from encoder.batching import Example
from engine.certify import RESCORE_CHUNK, Certificate, miss_probability
from engine.fusion import reciprocal_rank_fusion
from engine.protocols import Index
from engine.query import Abandoned, Hit, Query, never

ATTRIBUTION_METHOD: AnswerMethod = "bm25"
"""The method ``mode: attribution`` ("which passages state this?") is answered by. Chosen by
the evaluation's attribution measure (MRR@10) across its sets: BM25 wins it or ties the best
on every set measured, the hybrid never beats it by a paired interval that excludes zero,
and the gradient methods lose to it where the model has not learned the fact (README, "Which
method answers which question"; ``benchmarks/results/eval_*``)."""


def method_of(mode: Mode) -> AnswerMethod:
    """The method that answers ``mode``: ``gradient`` for influence, ``ATTRIBUTION_METHOD``
    for attribution, the named method otherwise."""
    if mode == "influence":
        return "gradient"
    if mode == "attribution":
        return ATTRIBUTION_METHOD
    return mode


FUSION_DEPTH = 100
"""Candidates taken from each ranking before fusing (the hybrid's pool)."""


def hit_rows(index: Index, scores: np.ndarray, ids: np.ndarray, ks: list[int]) -> list[list[Hit]]:
    """Hits for each row r of search output, its first ``ks[r]`` columns (-1 padding
    dropped), best first; one metadata lookup for all rows."""
    rows = [
        [(int(i), float(s)) for i, s in zip(ids[r, :k], scores[r, :k], strict=True) if int(i) >= 0]
        for r, k in enumerate(ks)
    ]
    wanted = sorted({i for pairs in rows for i, _ in pairs})
    records = {int(r.id): r for r in index.examples(wanted)} if wanted else {}
    return [[Hit(i, s, records[i]) for i, s in pairs] for pairs in rows]


def _hits(index: Index, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    """Hits for one row of search output, best first."""
    return hit_rows(index, scores[None, :], ids[None, :], [len(ids)])[0]


def filtered_search(index: Index, vector: np.ndarray, query: Query) -> list[Hit]:
    """``query.k`` influence hits from ``query.source``: widen the candidate pool until
    enough match or the whole index has been ranked, so the filter is exact."""
    size = index.size
    pool = min(size, max(4 * query.k, 64))
    while True:
        scores, ids = index.search(vector[None, :], pool)
        hits = [h for h in _hits(index, scores[0], ids[0]) if h.record.source == query.source]
        if len(hits) >= query.k or pool >= size:
            return hits[: query.k]
        pool = min(size, pool * 4)


def lexical_search(
    index: Index, vector: np.ndarray, text: str, method: str, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k for one query by ``bm25`` (BM25 scores of ``text``) or ``hybrid`` (RRF scores
    of bm25 and influence, c = 60, each over its top max(k, FUSION_DEPTH)).

    Returns:
        (scores [k], ids [k]); ids -1 pad when the index has fewer than k sequences.
    """
    if method == "bm25":
        scores, ids = index.lexical.search([text], k)
        return scores[0], ids[0]
    if method != "hybrid":
        raise InputError(f"unknown method {method!r}; expected bm25 or hybrid")
    depth = max(k, FUSION_DEPTH)
    _, lexical = index.lexical.search([text], depth)
    _, influence = index.search(np.asarray(vector, np.float32)[None, :], depth)
    return reciprocal_rank_fusion([lexical[0], influence[0]], k)


def _mode_hits(index: Index, vector: np.ndarray, query: Query, text: str) -> list[Hit]:
    """``bm25`` / ``hybrid`` hits (``method_of`` the query's mode); a source filter ranks the
    whole index."""
    k = index.size if query.source is not None else query.k
    scores, ids = lexical_search(index, vector, query.prompt + text, method_of(query.mode), k)
    hits = _hits(index, scores, ids)
    if query.source is not None:
        hits = [h for h in hits if h.record.source == query.source]
    return hits[: query.k]


def _pool_size(query: Query) -> int:
    return max(query.rescore or 0, query.k)


def second_stage_pool(index: Index, vector: np.ndarray, query: Query) -> list[Hit]:
    """The first stage's top max(rescore, k) candidates of a query with a second stage
    (from ``query.source`` when set), best first."""
    return second_stage_pools(index, vector[None, :], [query])[0]


def second_stage_pools(index: Index, vectors: np.ndarray, queries: list[Query]) -> list[list[Hit]]:
    """``second_stage_pool`` of several queries ([Q, d] fingerprints): the unfiltered ones
    from one search call (one scan of the index for all), the filtered ones each alone."""
    out: list[list[Hit]] = [[] for _ in queries]
    whole = [j for j, q in enumerate(queries) if q.source is None]
    if whole:
        scores, ids = index.search(vectors[whole], max(_pool_size(queries[j]) for j in whole))
        rows = hit_rows(index, scores, ids, [_pool_size(queries[j]) for j in whole])
        for j, hits in zip(whole, rows, strict=True):
            out[j] = hits
    for j, q in enumerate(queries):
        if q.source is not None:
            out[j] = filtered_search(index, vectors[j], replace(q, k=_pool_size(q)))
    return out


Staged = tuple[list[Hit], Callable[[list[int]], np.ndarray]]
"""A query's second-stage pool and its exact scorer, made with other queries' (``run_batch``)."""


def rescored(
    index: Index,
    example: Example,
    vector: np.ndarray,
    query: Query,
    abandoned: Abandoned = never,
    staged: Staged | None = None,
) -> tuple[list[Hit], Certificate]:
    """The exact second stage: the candidates of ``second_stage_pool`` (or ``staged``'s),
    re-scored by ``index.exact_scorer`` (or ``staged``'s scorer) in first-stage order a
    chunk at a time, until the top-k is certified at ``query.confidence``
    (``engine.certify``) or every candidate is scored; the best k, best first.

    Raises:
        QueryAbandonedError: ``abandoned()`` turned true between two chunks (the client
            gave up: its remaining candidates are not scored).
    """
    candidates, score = staged or (second_stage_pool(index, vector, query), None)
    if not candidates:
        return [], Certificate(0, True, query.confidence, 0.0)
    score = score or index.exact_scorer(example)
    first = np.array([h.score for h in candidates], dtype=np.float64)
    sd = index.score_sd(vector, [h.id for h in candidates])
    exact = np.full(len(candidates), -np.inf)
    done, miss, n_rest = 0, 1.0, index.size - len(candidates)
    while done < len(candidates):
        if abandoned():
            raise QueryAbandonedError(f"abandoned after {done} of {len(candidates)} candidates")
        step = query.k if done == 0 else RESCORE_CHUNK
        exact[done : done + step] = score([h.id for h in candidates[done : done + step]])
        done = min(len(candidates), done + step)
        if sd is not None or (done == len(candidates) and n_rest == 0):
            bar = float(np.sort(exact[:done])[::-1][min(query.k, done) - 1])
            sd_rest = float(sd.max()) if sd is not None else 0.0
            unscored_sd = sd[done:] if sd is not None else np.zeros(0)
            miss = miss_probability(
                bar,
                first[done:],
                unscored_sd,
                n_rest=n_rest,
                rest_first=float(first[-1]),
                rest_sd=sd_rest,
            )
            if miss <= 1 - query.confidence:
                break
    order = np.argsort(-exact[:done], kind="stable")[: query.k]
    hits = [Hit(candidates[i].id, float(exact[i]), candidates[i].record, 0.0) for i in order]
    return hits, Certificate(done, miss <= 1 - query.confidence, query.confidence, miss)


def is_plain(query: Query) -> bool:
    """Answered by one batched influence search (no mode, filter or second stage)."""
    return query.source is None and query.mode == "influence" and not query.rescore


def retrieve_one(
    index: Index,
    query: Query,
    example: Example,
    vector: np.ndarray,
    text: str,
    abandoned: Abandoned = never,
    staged: Staged | None = None,
) -> tuple[list[Hit], Certificate | None]:
    """The hits of a query that is not ``is_plain``, best first (at most ``query.k``), and
    how its exact second stage ended (None without one).

    Args:
        example: the query tokenized (for the second stage).
        vector: [d] its fingerprint.
        text: the traced completion text (for the lexical modes).
        abandoned: true once the client has given up (checked between the second
            stage's chunks).
        staged: the second stage's pool and scorer, made with other queries'.
    """
    if query.rescore:
        return rescored(index, example, vector, query, abandoned, staged)
    if query.mode != "influence":
        return _mode_hits(index, vector, query, text), None
    return filtered_search(index, vector, query), None


def retrieve_plain(index: Index, queries: list[Query], vectors: np.ndarray) -> list[list[Hit]]:
    """Hits of ``is_plain`` queries, one search call for all: [P, d] fingerprints."""
    if not queries:
        return []
    scores, ids = index.search(vectors, max(q.k for q in queries))  # [P, k_max]
    return hit_rows(index, scores, ids, [q.k for q in queries])


def add_score_sd(index: Index, query: Query, vector: np.ndarray, hits: list[Hit]) -> None:
    """Set each influence hit's ``score_sd`` where the index models it."""
    if query.mode != "influence" or query.rescore or not hits:
        return
    sds = index.score_sd(vector, [h.id for h in hits])
    if sds is not None:
        for h, sd in zip(hits, sds, strict=True):
            h.score_sd = float(sd)
