"""One micro-batch of influence queries against one index: validate, encode, retrieve.

Blocking (torch, FAISS, SQLite): the service calls it from the batcher's worker thread,
never on the event loop. Each query's outcome is independent: a query that fails
validation, generation, encoding or search, with whatever exception, gets its own error and
never fails its batch mates.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np

from api.errors import InfluenceError, InternalError, QueryAbandonedError
from encoder.batching import Example
from engine import retrieval
from engine.protocols import Index
from engine.query import Hit, Limits, Outcome, Query, Traced, trace

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def failure(exc: Exception, what: str) -> InfluenceError:
    """The error one query gets for ``exc``: itself when it is a project error, else an
    ``InternalError`` (the bug is logged with its traceback, never shown to the client)."""
    if isinstance(exc, InfluenceError):
        return exc
    log.error("%s failed for one query", what, exc_info=exc)
    return InternalError()


def _each_alone(call: Callable[[list[T]], Sequence[R]], items: list[T]) -> list[R | Exception]:
    """``call(items)`` in one go; should it raise, whatever the exception, ``call([item])``
    for each item, so that only the item that fails gets the exception."""
    if not items:
        return []
    try:
        return list(call(items))
    except Exception as exc:
        if len(items) == 1:
            return [exc]
    out: list[R | Exception] = []
    for item in items:
        try:
            out.extend(call([item]))
        except Exception as exc:
            out.append(exc)
    return out


def _encode(
    index: Index, examples: list[Example]
) -> tuple[np.ndarray, list[InfluenceError | None]]:
    """Encode validated queries in one pass (one by one should it fail, ``_each_alone``).

    Returns:
        vectors [V, d] float32 (rows of failed queries are zero), per-query error or None.
    """
    rows = _each_alone(
        lambda batch: list(np.asarray(index.encode_examples(batch), dtype=np.float32)), examples
    )
    dim = next((r.shape[0] for r in rows if not isinstance(r, Exception)), 1)
    errors = [failure(r, "encoding") if isinstance(r, Exception) else None for r in rows]
    return np.stack(
        [np.zeros(dim, np.float32) if isinstance(r, Exception) else r for r in rows]
    ), errors


def _traced(
    index: Index, queries: list[Query], limits: Limits, outcomes: list[Outcome]
) -> list[tuple[int, Traced]]:
    """Validate each query (generating first where asked); failures go to their outcome."""
    valid = []
    for i, query in enumerate(queries):
        try:
            outcomes[i].traced = traced = trace(index, query, limits)
            valid.append((i, traced))
        except Exception as exc:
            outcomes[i].error = failure(exc, "validation or generation")
    return valid


def _staged(
    index: Index,
    queries: list[Query],
    valid: list[tuple[int, Traced]],
    vectors: np.ndarray,
    outcomes: list[Outcome],
) -> dict[int, retrieval.Staged]:
    """The second stages of the batch made together: each query's pool, and scorers that run
    a candidate shared by several pools once (``Index.exact_scorers``). A query whose pool
    fails gets its error; should the scorers fail, each query makes its own. A lone second
    stage is left to ``retrieval.rescored``."""
    pools: dict[int, tuple[int, list[Hit]]] = {}
    second = [
        (j, i)
        for j, (i, _) in enumerate(valid)
        if outcomes[i].error is None and queries[i].rescore and queries[i].mode == "influence"
    ]
    if len(second) < 2:
        return {}
    found = _each_alone(
        lambda batch: retrieval.second_stage_pools(
            index, vectors[[j for j, _ in batch]], [queries[i] for _, i in batch]
        ),
        second,
    )
    for (j, i), hits in zip(second, found, strict=True):
        if isinstance(hits, Exception):
            outcomes[i].error = failure(hits, "retrieval")
        else:
            pools[i] = (j, hits)
    shared = [i for i, (_, hits) in pools.items() if hits]
    if len(shared) < 2:
        return {}
    examples = [valid[pools[i][0]][1].example for i in shared]
    try:
        scorers = index.exact_scorers(examples, [[h.id for h in pools[i][1]] for i in shared])
    except Exception:
        log.exception("shared second-stage scorers failed; each query makes its own")
        return {}
    return {i: (pools[i][1], s) for i, s in zip(shared, scorers, strict=True)}


def _retrieve(
    index: Index,
    queries: list[Query],
    valid: list[tuple[int, Traced]],
    vectors: np.ndarray,
    outcomes: list[Outcome],
    abandoned: Callable[[int], bool],
) -> None:
    """Hits for every encoded query: the plain ones in one search call, the rest one by one."""
    plain = [j for j, (i, _) in enumerate(valid) if retrieval.is_plain(queries[i])]
    pairs = [(queries[valid[j][0]], vectors[j]) for j in plain]
    found = _each_alone(
        lambda batch: retrieval.retrieve_plain(
            index, [q for q, _ in batch], np.stack([v for _, v in batch])
        ),
        pairs,
    )
    for j, hits in zip(plain, found, strict=True):
        if isinstance(hits, Exception):
            outcomes[valid[j][0]].error = failure(hits, "search")
        else:
            outcomes[valid[j][0]].hits = hits
    staged = _staged(index, queries, valid, vectors, outcomes)
    for j, (i, traced) in enumerate(valid):
        query = queries[i]
        if outcomes[i].error is not None:
            continue
        try:
            if not retrieval.is_plain(query):
                start = time.perf_counter()
                gave_up = functools.partial(abandoned, i)
                try:
                    answer = retrieval.retrieve_one(
                        index,
                        query,
                        traced.example,
                        vectors[j],
                        traced.text,
                        gave_up,
                        staged.get(i),
                    )
                finally:  # a second stage's time is its own however it ends (search_ms excludes it)
                    if query.rescore:  # retrieve_one's test for the second stage
                        outcomes[i].rescore_ms = (time.perf_counter() - start) * 1e3
                outcomes[i].hits, outcomes[i].certificate = answer
            retrieval.add_score_sd(index, query, vectors[j], outcomes[i].hits)
        except Exception as exc:
            outcomes[i].error, outcomes[i].hits = failure(exc, "retrieval"), []
            continue
        if query.min_score is not None:
            outcomes[i].hits = [h for h in outcomes[i].hits if h.score >= query.min_score]


def run_batch(
    index: Index,
    queries: list[Query],
    limits: Limits,
    abandoned: Callable[[int], bool] = lambda i: False,
) -> list[Outcome]:
    """Answer a micro-batch of queries with one encode pass and one search call.

    Args:
        index: the index (leased for the duration of the call).
        queries: Q queries.
        limits: token limits.
        abandoned: whether query i's client has given up: such a query is not encoded, and
            its second stage stops at the next chunk (``QueryAbandonedError``).
    Returns:
        Q outcomes in order; each carries hits (best first) or an error.
    """
    model, version = index.summary().model, index.version
    queries = [
        q
        if q.rescore is not None
        else replace(q, rescore=index.default_rescore if q.mode == "influence" else 0)
        for q in queries
    ]
    outcomes = [
        Outcome(model=model, index_version=version, batch_size=len(queries)) for _ in queries
    ]
    for i in range(len(queries)):
        if abandoned(i):
            outcomes[i].error = QueryAbandonedError("abandoned before it was encoded")
    live = [i for i in range(len(queries)) if outcomes[i].error is None]
    valid = [
        (live[j], t)
        for j, t in _traced(index, [queries[i] for i in live], limits, [outcomes[i] for i in live])
    ]
    if not valid:
        return outcomes
    t0 = time.perf_counter()
    vectors, errors = _encode(index, [traced.example for _, traced in valid])  # [V, d]
    t1 = time.perf_counter()
    for (i, _), error in zip(valid, errors, strict=True):
        outcomes[i].error = error
    keep = [j for j, error in enumerate(errors) if error is None]
    valid, vectors = [valid[j] for j in keep], vectors[keep]
    _retrieve(index, queries, valid, vectors, outcomes, abandoned)
    t2 = time.perf_counter()
    # The batch's search time, without the second stages that ran in it (each query
    # reports its own as rescore_ms).
    search_ms = (t2 - t1) * 1e3 - sum(outcomes[i].rescore_ms for i, _ in valid)
    for i, _ in valid:
        outcomes[i].encode_ms, outcomes[i].search_ms = (t1 - t0) * 1e3, search_ms
    log.debug("batch of %d: encode %.1f ms, search %.1f ms", len(valid), (t1 - t0) * 1e3, search_ms)
    return outcomes
