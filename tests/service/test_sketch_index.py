"""A ``projection: sketch`` index end to end on the trained test model: the build fits the
K-FAC whitening and saves it alone (the CountSketch is seeded, not stored), the engine
reopens it, each hit states its score's standard deviation, and the exact second stage over
every sequence gives the answer of an unprojected (k = 0) sketch index, whose whitening is
the same."""

from __future__ import annotations

import pytest
import torch

from encoder.tensor_files import load_tensors
from engine.index import InfluenceIndex, OpenOptions
from engine.query import Query
from indexer import manifest as mf
from tests.service.whitened import (
    COMPLETION,
    PROMPT,
    answer,
    assert_rescoring_every_candidate_gives_the_unprojected_ranking,
    projected_and_exact,
)


@pytest.fixture(scope="module")
def sketch_indexes(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    return projected_and_exact(
        trained_checkpoint.checkpoint_dir,
        fact_corpus_files[0],
        tmp_path_factory.mktemp("sketch"),
        "sketch",
    )


def test_the_saved_whitening_is_the_unprojected_one(sketch_indexes):
    sketched, exact = sketch_indexes
    saved, exact_saved = (
        load_tensors(sketched / mf.PROJECTIONS),
        load_tensors(exact / mf.PROJECTIONS),
    )
    assert {key.rsplit(".", 1)[1] for key in saved} == {"W_out", "W_in"} and set(saved) == set(
        exact_saved
    )
    for key, w in saved.items():
        # The same sample's sums, eigendecomposed the same way: the same float32 matrices.
        assert torch.equal(w, exact_saved[key]), key
    fp = mf.Manifest.read(sketched).fingerprint
    assert fp["block_dims"] == [16] * len(fp["modules"]), fp["block_dims"]


def test_rescoring_every_candidate_gives_the_unprojected_ranking(sketch_indexes):
    first = assert_rescoring_every_candidate_gives_the_unprojected_ranking(*sketch_indexes)
    assert all(
        h.score_sd is not None and h.score_sd > 0 for h in first
    )  # it says how far scores could move


def test_a_sketch_index_without_its_whitening_is_refused(sketch_indexes, tmp_path):
    import shutil

    from api.errors import ArtifactError
    from encoder.tensor_files import save_tensors

    sketched, _ = sketch_indexes
    broken = tmp_path / "index"
    shutil.copytree(sketched, broken)
    save_tensors({}, broken / mf.PROJECTIONS)  # no whitening
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
    default = answer(sketched, Query(PROMPT, COMPLETION, 10))
    explicit = answer(sketched, Query(PROMPT, COMPLETION, 10, rescore=DEFAULT_RESCORE))
    assert [(h.id, h.score) for h in default] == [(h.id, h.score) for h in explicit]
    assert [h.id for h in answer(sketched, Query(PROMPT, COMPLETION, 10, rescore=0))] != [
        h.id for h in default
    ]
    assert all(h.score_sd == 0.0 for h in default)  # re-scored exactly


def _edited(index, tmp_path, **config):
    """A copy of ``index`` whose manifest states other fingerprint config values."""
    import json
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(index, copy)
    data = json.loads((copy / mf.MANIFEST).read_text())
    data["fingerprint"]["config"].update(config)
    (copy / mf.MANIFEST).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("which", "edit"),
    [(0, {"delta": 0.5}), (1, {"seed": 7}), (1, {"delta": 0.5})],
    ids=["delta-sketched", "seed-where-nothing-is-sketched", "delta-unprojected"],
)
def test_a_manifest_the_fitted_artifacts_contradict_is_refused(
    sketch_indexes, tmp_path, which, edit
):
    """delta only acts when the whitening is fitted, and the seed not at all where nothing is
    sketched: re-encoding cannot see such an edit, the fitted artifact's record does."""
    from api.errors import ArtifactError
    from indexer.verify import verify_index

    edited = _edited(sketch_indexes[which], tmp_path, **edit)
    (key,) = edit
    with pytest.raises(ArtifactError) as err:
        verify_index(edited)
    assert err.value.code == "manifest_mismatch" and err.value.details["keys"] == key, err.value
    with pytest.raises(ArtifactError) as err:
        InfluenceIndex.open(edited)
    assert err.value.code == "manifest_mismatch" and key in err.value.message
    lines = verify_index(sketch_indexes[which])  # the unedited index passes
    assert any(line.startswith("fitted artifacts: projections.safetensors") for line in lines)


def test_the_summary_states_only_what_the_index_is(sketch_indexes):
    from indexer.summary import summary, summary_lines

    sketched, whole = (summary_lines(summary(index)) for index in sketch_indexes)
    n = len(mf.Manifest.read(sketch_indexes[1]).fingerprint["modules"])
    (projection,) = [line for line in whole if line.strip().startswith("projection:")]
    assert projection.split(": ", 1)[1] == f"none: all {n} modules kept whole; K-FAC whitened"
    (projection,) = [line for line in sketched if line.strip().startswith("projection:")]
    assert (
        projection.split(": ", 1)[1]
        == "k = 4 per side, 16 dims per module; K-FAC whitened, CountSketch seed 0 (sketch)"
    )
    for line in sketched + whole:
        assert "None" not in line, line


def test_explain_splits_the_score_the_card_shows(sketch_indexes, fact_corpus):
    """A sketch index re-scores by default, so a card shows the exact whitened score and
    explain splits that one: its contributions sum to it and equal, token by token, the
    first-stage split on the unprojected (k = 0) sketch index, whose fingerprint is that
    exact whitened gradient (the same whitening). The first stage's split stays available."""
    import numpy as np

    from engine.explain import explain
    from engine.query import Limits
    from tests.tolerances import recompute_bound

    sketched, unprojected = (InfluenceIndex.open(d) for d in sketch_indexes)
    try:
        q = fact_corpus.queries[0]
        query, limits = Query(q.prompt, q.completion, 1), Limits(256, 256)
        hit = answer(sketch_indexes[0], Query(q.prompt, q.completion, 1))[
            0
        ]  # the card: the exact stage's
        shown = explain(sketched, query, hit.id, limits)
        assert shown.exact and sketched.default_rescore > 0
        contributions = np.array([t.contribution for t in shown.tokens])
        assert abs(contributions.sum() - shown.score) <= 1e-12
        bound = 2 * recompute_bound(np.float32)  # two float32 recomputations of unit-norm scores
        assert abs(shown.score - hit.score) <= bound, (shown.score, hit.score)
        reference = explain(
            unprojected, query, hit.id, limits
        )  # first stage = exact whitened there
        assert not reference.exact
        want = np.array([t.contribution for t in reference.tokens])
        assert np.abs(contributions - want).max() <= bound, np.abs(contributions - want).max()
        first = explain(sketched, query, hit.id, limits, exact=False)
        assert (
            not first.exact and abs(first.score - shown.score) > bound
        )  # another score: the test can fail
    finally:
        sketched.close()
        unprojected.close()
