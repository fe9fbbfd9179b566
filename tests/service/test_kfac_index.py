"""A ``projection: kfac`` index end to end on the trained test model: the build fits the
whitening once and saves it with the pairs, the engine reopens it, its exact second stage
re-scores by the unprojected whitened gradients, so with every sequence as a candidate the
answer is the answer of an unprojected (k = 0) kfac index, whose whitening is the same."""

from __future__ import annotations

import pytest
import torch

from encoder.basis import load_fitted, load_projections
from engine.index import InfluenceIndex, OpenOptions
from indexer import manifest as mf
from tests.service.whitened import (
    assert_rescoring_every_candidate_gives_the_unprojected_ranking,
    projected_and_exact,
)


@pytest.fixture(scope="module")
def kfac_indexes(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    return projected_and_exact(trained_checkpoint.checkpoint_dir, fact_corpus_files[0], tmp_path_factory.mktemp("kfac"), "kfac")


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
    first = assert_rescoring_every_candidate_gives_the_unprojected_ranking(*kfac_indexes)
    assert first


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
