"""The certified second stage: candidates re-scored in first-stage order stop once no
unscored one can still enter the top-k at the stated confidence (``engine.certify``).

On a real sketch index (32 x 32 blocks) over the fact corpus's queries, held out from the
index's fit: a certified answer equals the exhaustive exact top-k (every sequence
re-scored) at least as often as the confidence says, and the stage stops early."""

from __future__ import annotations

import numpy as np
import pytest

from engine.batch import run_batch
from engine.certify import miss_probability
from engine.index import InfluenceIndex
from engine.query import Limits, Query
from tests.service.whitened import build

LIMITS = Limits(10_000, 10_000)


def test_the_bound_is_the_union_of_normal_tails():
    from scipy.stats import norm

    first, sd = np.array([0.30, 0.25, 0.10]), np.array([0.05, 0.02, 0.04])
    want = sum(norm.sf((0.4 - f) / s) for f, s in zip(first, sd, strict=True)) + 7 * norm.sf(
        (0.4 - 0.05) / 0.06
    )
    got = miss_probability(0.4, first, sd, n_rest=7, rest_first=0.05, rest_sd=0.06)
    assert abs(got - want) <= 1e-12 * max(1.0, want)
    # No noise: a candidate below the bar cannot clear it, one above it surely does.
    assert miss_probability(0.4, np.array([0.39]), np.array([0.0])) == 0.0
    assert miss_probability(0.4, np.array([0.41]), np.array([0.0])) == 1.0
    assert miss_probability(0.4, np.array([]), np.array([])) == 0.0  # nothing left unscored
    assert (
        miss_probability(
            0.4, np.array([0.3]), np.array([0.2]), n_rest=10**6, rest_first=0.3, rest_sd=0.2
        )
        == 1.0
    )


@pytest.fixture(scope="module")
def sketch_index(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    """A sketch index with 32 x 32 blocks: its first stage is noisy enough that near-ties
    need the exact stage, and its calibrated uncertainty small enough to certify."""
    out = tmp_path_factory.mktemp("certified") / "index"
    index = InfluenceIndex.open(
        build(trained_checkpoint.checkpoint_dir, fact_corpus_files[0], out, 32, "sketch")
    )
    yield index
    index.close()


QUERIES = 24
"""Fact-corpus queries the calibration is measured on (each scored against every sequence)."""


@pytest.fixture(scope="module")
def exhaustive(sketch_index, fact_corpus):
    """Every query's exact scores over every sequence (``index.rescore``, no stopping)."""
    out = {}
    for q in fact_corpus.queries[:QUERIES]:
        (outcome,) = run_batch(sketch_index, [Query(q.prompt, q.completion, 1, rescore=0)], LIMITS)
        out[q.prompt] = sketch_index.rescore(outcome.traced.example, list(range(sketch_index.size)))
    return out


@pytest.mark.parametrize(("k", "confidence", "at_least"), [(1, 0.9, 0.75), (2, 0.95, 0.25)])
def test_a_certified_top_k_is_the_exhaustive_one_at_the_stated_confidence(
    sketch_index, fact_corpus, exhaustive, k, confidence, at_least
):
    """Among the answers the stage certifies, the share equal to the exhaustive exact top-k
    is at least the confidence; enough are certified for that to say something, and they
    stop early (near-ties in the top-k are what keep the others scoring to the cap)."""
    n = sketch_index.size
    cap = n // 2
    certified = equal = scored = 0
    for q in fact_corpus.queries[:QUERIES]:
        (outcome,) = run_batch(
            sketch_index,
            [Query(q.prompt, q.completion, k, rescore=cap, confidence=confidence)],
            LIMITS,
        )
        assert outcome.error is None, outcome.error
        certificate = outcome.certificate
        assert certificate is not None and certificate.confidence == confidence
        assert certificate.certified == (certificate.miss_probability <= 1 - confidence)
        scored += certificate.rescored
        if certificate.certified:
            certified += 1
            want = np.argsort(-exhaustive[q.prompt], kind="stable")[:k].tolist()
            equal += [h.id for h in outcome.hits] == want
            assert certificate.rescored <= cap
    queries = QUERIES
    print(
        f"k={k} @ {confidence}: {certified}/{queries} certified, {equal} equal to exhaustive, "
        f"{scored / queries:.1f} of {cap} candidates scored on average"
    )
    assert certified >= at_least * queries, "the stage rarely certifies: the test would say little"
    assert scored < 0.8 * queries * cap, "the stage does not stop early"
    assert equal / certified >= confidence


def test_scoring_every_sequence_is_certified_outright(sketch_index, fact_corpus):
    q = fact_corpus.queries[0]
    (outcome,) = run_batch(
        sketch_index, [Query(q.prompt, q.completion, 5, rescore=sketch_index.size)], LIMITS
    )
    c = outcome.certificate
    assert c is not None and c.certified and c.rescored <= sketch_index.size
    if c.rescored == sketch_index.size:
        assert c.miss_probability == 0.0
