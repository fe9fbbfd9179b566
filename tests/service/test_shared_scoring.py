"""A batch's second stages share their candidates' passes (encoder.shared_scores through
engine.batch.run_batch): the answers are each query's own, and a candidate in several pools
runs its backward pass once."""

from __future__ import annotations

import numpy as np
import pytest

from engine.batch import run_batch
from engine.index import InfluenceIndex
from engine.query import Limits, Query
from tests.tolerances import recompute_bound

LIMITS = Limits(4096, 4096)


@pytest.fixture(scope="module")
def index(tiny_index):
    opened = InfluenceIndex.open(tiny_index)
    yield opened
    opened.close()


def test_a_batch_answers_as_each_query_alone_with_fewer_passes(index, fact_corpus):
    queries = [Query(q.prompt, q.completion, 10, rescore=40) for q in fact_corpus.queries[:6]]
    alone = [run_batch(index, [q], LIMITS)[0] for q in queries]
    encoder = index._rescorer.encoder  # made by the first second stage
    passed: list[int] = []
    stream = encoder.stream_factors

    def counting(batch, sink):
        passed.append(len(batch))
        return stream(batch, sink)

    encoder.stream_factors = counting
    try:
        together = run_batch(index, queries, LIMITS)
    finally:
        del encoder.stream_factors
    pools = [
        {int(i) for i in index.search(index.encode_examples([o.traced.example]), 40)[1][0]}
        for o in alone
    ]
    for a, t in zip(alone, together, strict=True):
        assert a.error is None and t.error is None
        assert [h.id for h in t.hits] == [h.id for h in a.hits]
        got, want = (np.array([h.score for h in o.hits]) for o in (t, a))
        # Candidates batched with others: the model's float32 softmax in another batch shape.
        assert np.abs(got - want).max() <= 2 * recompute_bound(np.float32)
        assert t.certificate.rescored == a.certificate.rescored
    # One pass per query (its own side), then every candidate of the union once at most.
    assert sum(passed) <= len(queries) + len(set().union(*pools))
    assert sum(passed) < len(queries) + sum(a.certificate.rescored for a in alone)
