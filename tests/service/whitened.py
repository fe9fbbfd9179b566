"""Shared by the sketch index tests: build a hessian-none index of the trained test model, and
answer one query on an index opened for it."""

from __future__ import annotations

from encoder.config import FingerprintConfig
from engine.index import InfluenceIndex, OpenOptions
from engine.query import Hit, Limits, Query

PROMPT, COMPLETION = "The capital of Drosora is", " Mutu."


def build(ckpt, corpus, out, k: int, projection: str):
    from indexer.build import BuildConfig, run_build

    return run_build(
        BuildConfig(
            model=ckpt,
            corpus=corpus,
            out=out,
            shard_size=16,
            batch_size=8,
            basis_sample=0,
            fingerprint=FingerprintConfig(k=k, hessian="none", projection=projection),
        )
    )


def answer(index_dir, query: Query) -> list[Hit]:
    from engine.batch import run_batch

    index = InfluenceIndex.open(index_dir, OpenOptions())
    try:
        (outcome,) = run_batch(
            index, [query], Limits(max_prompt_tokens=256, max_completion_tokens=256)
        )
    finally:
        index.close()
    assert outcome.error is None, outcome.error
    return outcome.hits


def projected_and_exact(checkpoint_dir, corpus, root, projection: str):
    """(k = 4 index of ``projection``, k = 0 sketch index): the same K-FAC whitening, one
    projected and one not (every module kept whole: the whitened gradient itself)."""
    return build(checkpoint_dir, corpus, root / "k4", 4, projection), build(
        checkpoint_dir, corpus, root / "k0", 0, "sketch"
    )


def assert_rescoring_every_candidate_gives_the_unprojected_ranking(projected, exact) -> list[Hit]:
    """Re-scoring every sequence gives the k = 0 index's ranking and scores (within float16
    storage and two float32 recomputations), and the first stage alone does not (else the
    check could not fail); returns that first stage's hits."""
    import numpy as np

    from indexer import manifest as mf
    from tests.tolerances import FLOAT16_SCORE, recompute_bound

    size = mf.Manifest.read(projected).sequences
    got = answer(projected, Query(PROMPT, COMPLETION, 10, rescore=size))
    want = answer(exact, Query(PROMPT, COMPLETION, 10))
    assert [h.id for h in got] == [h.id for h in want]
    gaps = np.abs(np.array([h.score for h in got]) - np.array([h.score for h in want]))
    assert gaps.max() <= FLOAT16_SCORE + 2 * recompute_bound(np.float32), gaps
    first = answer(projected, Query(PROMPT, COMPLETION, 10, rescore=0))
    assert [h.id for h in first] != [h.id for h in want]
    return first
