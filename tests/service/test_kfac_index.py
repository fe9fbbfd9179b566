"""A ``projection: kfac`` index end to end on the trained test model: the build fits the
whitening once and saves it with the pairs, the engine reopens it, its exact second stage
re-scores by the unprojected whitened gradients, so with every sequence as a candidate the
answer is the answer of an unprojected (k = 0) kfac index, whose whitening is the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder.basis import load_fitted, load_projections
from encoder.config import FingerprintConfig
from engine.index import InfluenceIndex, OpenOptions
from engine.query import Limits, Query
from indexer import manifest as mf
from tests.tolerances import FLOAT16_SCORE, recompute_bound

PROMPT, COMPLETION = "The capital of Veloria is", " Quenton."
SCORE_BOUND = FLOAT16_SCORE + 2 * recompute_bound(np.float32)


def _build(ckpt, corpus, out, k):
    from indexer.build import BuildConfig, run_build

    return run_build(BuildConfig(model=ckpt, corpus=corpus, out=out, shard_size=16, batch_size=8, basis_sample=0,
                                 fingerprint=FingerprintConfig(k=k, hessian="none", projection="kfac")))  # fmt: skip


@pytest.fixture(scope="module")
def kfac_indexes(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    corpus, _ = fact_corpus_files
    root = tmp_path_factory.mktemp("kfac")
    ckpt = trained_checkpoint.checkpoint_dir
    return _build(ckpt, corpus, root / "k4", 4), _build(ckpt, corpus, root / "k0", 0)


def _answer(index_dir, query: Query):
    from engine.batch import run_batch

    index = InfluenceIndex.open(index_dir, OpenOptions())
    try:
        (outcome,) = run_batch(index, [query], Limits(max_prompt_tokens=256, max_completion_tokens=256))
    finally:
        index.close()
    assert outcome.error is None, outcome.error
    return outcome.hits


def test_the_saved_whitening_is_the_unprojected_index_one(kfac_indexes):
    projected, exact = kfac_indexes
    roots, exact_pairs = load_fitted(projected / mf.PROJECTIONS)[1], load_projections(exact / mf.PROJECTIONS)
    assert roots is not None and set(roots) == set(exact_pairs)
    for name, (w_out, w_in) in roots.items():
        # The same sample's sums, eigendecomposed the same way: the same float32 matrices.
        assert torch.equal(w_out, exact_pairs[name][0]) and torch.equal(w_in, exact_pairs[name][1]), name
    pairs = load_projections(projected / mf.PROJECTIONS)
    assert all(a.shape[0] == 4 and b.shape[0] == 4 for a, b in pairs.values())


def test_rescoring_every_candidate_gives_the_unprojected_kfac_ranking(kfac_indexes):
    projected, exact = kfac_indexes
    size = mf.Manifest.read(projected).sequences
    got = _answer(projected, Query(PROMPT, COMPLETION, 10, rescore=size))
    want = _answer(exact, Query(PROMPT, COMPLETION, 10))
    assert [h.id for h in got] == [h.id for h in want]
    gaps = np.abs(np.array([h.score for h in got]) - np.array([h.score for h in want]))
    assert gaps.max() <= SCORE_BOUND, gaps
    # The projected first stage alone ranks differently (else this test could not fail).
    first = _answer(projected, Query(PROMPT, COMPLETION, 10, rescore=0))
    assert [h.id for h in first] != [h.id for h in want]


def test_a_kfac_index_without_its_whitening_is_refused(kfac_indexes, tmp_path):
    import shutil

    from encoder.basis import save_projections
    from encoder.errors import ArtifactError

    projected, _ = kfac_indexes
    broken = tmp_path / "index"
    shutil.copytree(projected, broken)
    save_projections(load_projections(broken / mf.PROJECTIONS), broken / mf.PROJECTIONS)  # pairs only
    with pytest.raises(ArtifactError) as err:
        InfluenceIndex.open(broken, OpenOptions(verify=False))
    assert err.value.code == "manifest_mismatch"
