"""The exact second stage of the sketch (encoder.rescoring.FactorScorer, from token factors) and
the norms a build stores for it, against the torch.func reference of the whitened gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder import basis
from encoder.batching import Example, collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.rescoring import ExactRescorer, FactorScorer, GradientScorer
from tests.conftest import tiny_gpt2
from tests.encoder import reference as ref
from tests.tolerances import assert_within, recompute_bound


def _sequences(seed: int, n: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [
        sequence_example(torch.randint(1, 40, (int(t),), generator=g).tolist())
        for t in torch.randint(3, 14, (n,), generator=g)
    ]


def _whitened(model, enc: TrackStarEncoder, example: Example) -> np.ndarray:
    """vec(W_out G_W W_in) over the modules (the reference with every module kept whole)."""
    whole = {m.name: (m.out_features, m.in_features) for m in enc.modules}
    return ref.reference_sketch_phi(
        model, enc.modules, example, plan=whole, roots=enc.family.whitening(), seed=0
    )


@pytest.fixture
def fitted(monkeypatch):
    """A float64 tiny GPT-2 with a fitted sketch (k = 3: every module hashed) whose sides over
    16 stay the [1] scale (the tiny model's sides: 8, 24 and 32)."""
    monkeypatch.setattr(basis, "MAX_SIDE", 16)
    model = tiny_gpt2(seed=3, dtype=torch.float64)
    enc = TrackStarEncoder(model, FingerprintConfig(k=3, seed=5, hessian="none", whiten=True))
    enc.fit_basis([collate(_sequences(7, 12))])
    assert any(w.numel() == 1 for pair in enc.family.whitening().values() for w in pair)
    return model, enc


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("unit_norm", [True, False])
@pytest.mark.parametrize("candidate_batch", [8, 2])
def test_the_factor_scorer_gives_the_whitened_gradients_cosines(
    fitted, monkeypatch, unit_norm, stored, candidate_batch
):
    """Scores from token factors equal the cosines (or dots) of the dense whitened gradients,
    with the candidates' norms computed or given as the build stores them, whatever the
    candidates per pass (9 candidates: 2 or 5 passes); no dense identity is made for a [1]
    side."""
    model, enc = fitted
    config = FingerprintConfig(k=3, seed=5, hessian="none", unit_norm=unit_norm, whiten=True)
    rescorer = ExactRescorer(model, config, None, enc.family.whitening(), candidate_batch)
    query = Example((4, 9, 2, 7, 7, 1), (False, False, False, True, True, True))
    candidates = _sequences(11, 9)
    sq = None
    if stored:
        sq = torch.zeros(len(candidates), dtype=torch.float64)
        enc.project(collate(candidates), sq)
    scorer = rescorer.for_query(query, pad_id=0)
    assert isinstance(scorer, FactorScorer)
    # Both ways of keeping the query: its factors, and (a module smaller than T' (out + in))
    # their product H.
    kinds = {isinstance(kept, torch.Tensor) for kept in scorer.q_factors.values()}
    assert kinds == {True, False}
    with monkeypatch.context() as mp:
        mp.setattr(torch, "eye", lambda *a, **k: pytest.fail("a dense identity was made"))
        got = scorer(candidates, sq).numpy()

    q = _whitened(model, enc, query)
    c = np.stack([_whitened(model, enc, e) for e in candidates])
    want = c @ q
    bound = 2 * recompute_bound(np.float32)  # both recomputed through the model (float32 softmax)
    if unit_norm:
        want = want / (np.linalg.norm(c, axis=1) * np.linalg.norm(q))
    else:
        bound = bound * np.linalg.norm(c, axis=1) * np.linalg.norm(q)
    assert_within(got, want, bound, "factor-scored candidates")
    assert np.argsort(-got)[0] == np.argsort(-want)[0]


def test_the_norms_a_build_stores_are_the_whitened_gradients(fitted):
    """``project(batch, sq)`` adds each example's ||W_out G W_in||^2 (hashed modules: before the
    hash), in a batch of mixed lengths."""
    model, enc = fitted
    examples = _sequences(13, 6)
    sq = torch.zeros(len(examples), dtype=torch.float64)
    enc.project(collate(examples), sq)
    want = np.array([np.square(_whitened(model, enc, e)).sum() for e in examples])
    # Squared norms: twice the relative recompute error of the vectors, with margin.
    assert_within(sq.numpy(), want, 4 * recompute_bound(np.float32) * want, "stored norms")


def test_the_corrected_exact_stage_forms_the_gradients(fitted):
    """With the optimizer correction (elementwise on G_W) the factors do not give the score: the
    scorer is the gradient one, and both agree where neither corrects."""
    model, enc = fitted
    query, candidates = _sequences(17, 1)[0], _sequences(19, 5)
    rescorer = ExactRescorer(
        model,
        FingerprintConfig(k=3, seed=5, hessian="none", whiten=True),
        None,
        enc.family.whitening(),
    )
    by_factors = rescorer.for_query(query, 0)(candidates).numpy()
    by_gradients = GradientScorer(rescorer, query, 0)(candidates).numpy()
    assert_within(by_factors, by_gradients, 2 * recompute_bound(np.float32), "two scorers")
    rescorer.correction = True
    assert isinstance(rescorer.for_query(query, 0), GradientScorer)
