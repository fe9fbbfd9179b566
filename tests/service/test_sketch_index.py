"""A ``projection: sketch`` index end to end on the trained test model: the build fits the
K-FAC whitening and saves it alone (the CountSketch is seeded, not stored), the engine
reopens it, each hit states its score's standard deviation, and the exact second stage over
every sequence gives the answer of an unprojected (k = 0) kfac index, whose whitening is
the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder.basis import load_fitted
from encoder.config import FingerprintConfig
from engine.index import InfluenceIndex, OpenOptions
from engine.query import Limits, Query
from indexer import manifest as mf
from tests.tolerances import FLOAT16_SCORE, recompute_bound

PROMPT, COMPLETION = "The capital of Veloria is", " Quenton."
SCORE_BOUND = FLOAT16_SCORE + 2 * recompute_bound(np.float32)


def _build(ckpt, corpus, out, k, projection):
    from indexer.build import BuildConfig, run_build

    return run_build(BuildConfig(model=ckpt, corpus=corpus, out=out, shard_size=16, batch_size=8, basis_sample=0,
                                 fingerprint=FingerprintConfig(k=k, hessian="none", projection=projection)))  # fmt: skip


@pytest.fixture(scope="module")
def sketch_indexes(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    corpus, _ = fact_corpus_files
    root = tmp_path_factory.mktemp("sketch")
    ckpt = trained_checkpoint.checkpoint_dir
    return _build(ckpt, corpus, root / "k4", 4, "sketch"), _build(ckpt, corpus, root / "k0", 0, "kfac")


def _answer(index_dir, query: Query):
    from engine.batch import run_batch

    index = InfluenceIndex.open(index_dir, OpenOptions())
    try:
        (outcome,) = run_batch(index, [query], Limits(max_prompt_tokens=256, max_completion_tokens=256))
    finally:
        index.close()
    assert outcome.error is None, outcome.error
    return outcome.hits


def test_the_saved_whitening_is_the_unprojected_kfac_one(sketch_indexes):
    sketched, exact = sketch_indexes
    pairs, roots = load_fitted(sketched / mf.PROJECTIONS)
    exact_pairs = load_fitted(exact / mf.PROJECTIONS)[0]
    assert pairs == {} and roots is not None and set(roots) == set(exact_pairs)
    for name, (w_out, w_in) in roots.items():
        # The same sample's sums, eigendecomposed the same way: the same float32 matrices.
        assert torch.equal(w_out, exact_pairs[name][0]) and torch.equal(w_in, exact_pairs[name][1]), name
    fp = mf.Manifest.read(sketched).fingerprint
    assert fp["block_dims"] == [16] * len(fp["modules"]), fp["block_dims"]


def test_rescoring_every_candidate_gives_the_unprojected_kfac_ranking(sketch_indexes):
    sketched, exact = sketch_indexes
    size = mf.Manifest.read(sketched).sequences
    got = _answer(sketched, Query(PROMPT, COMPLETION, 10, rescore=size))
    want = _answer(exact, Query(PROMPT, COMPLETION, 10))
    assert [h.id for h in got] == [h.id for h in want]
    gaps = np.abs(np.array([h.score for h in got]) - np.array([h.score for h in want]))
    assert gaps.max() <= SCORE_BOUND, gaps
    # The sketched first stage alone (16 dims a module) ranks differently, and says how
    # far each score could move.
    first = _answer(sketched, Query(PROMPT, COMPLETION, 10, rescore=0))
    assert [h.id for h in first] != [h.id for h in want]
    assert all(h.score_sd is not None and h.score_sd > 0 for h in first)


def test_a_sketch_index_without_its_whitening_is_refused(sketch_indexes, tmp_path):
    import shutil

    from encoder.basis import save_projections
    from encoder.errors import ArtifactError

    sketched, _ = sketch_indexes
    broken = tmp_path / "index"
    shutil.copytree(sketched, broken)
    save_projections({}, broken / mf.PROJECTIONS)  # no whitening
    with pytest.raises(ArtifactError) as err:
        InfluenceIndex.open(broken, OpenOptions(verify=False))
    assert err.value.code == "manifest_mismatch"


def test_a_query_that_does_not_say_is_rescored_by_the_index_default(sketch_indexes):
    """No projected R: the index re-scores DEFAULT_RESCORE candidates unless told; 0 turns
    it off (and then the sketched first stage answers)."""
    from engine.index import DEFAULT_RESCORE

    sketched, exact = sketch_indexes
    index = InfluenceIndex.open(sketched, OpenOptions())
    try:
        assert index.default_rescore == DEFAULT_RESCORE
    finally:
        index.close()
    default = _answer(sketched, Query(PROMPT, COMPLETION, 10))
    explicit = _answer(sketched, Query(PROMPT, COMPLETION, 10, rescore=DEFAULT_RESCORE))
    assert [(h.id, h.score) for h in default] == [(h.id, h.score) for h in explicit]
    assert [h.id for h in _answer(sketched, Query(PROMPT, COMPLETION, 10, rescore=0))] != [h.id for h in default]
    assert all(h.score_sd == 0.0 for h in default)  # re-scored exactly
