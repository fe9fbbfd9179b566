"""The projection's sizes (encoder.projection.plan_projection) and the exact second stage
(encoder.rescoring) against the torch.func reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from api.errors import ConfigError
from encoder.batching import Example, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.modules import select_modules
from encoder.optimizer_state import SecondMoments
from encoder.projection import plan_dims, plan_projection, projection_pair
from encoder.rescoring import ExactRescorer
from tests.conftest import tiny_gpt2
from tests.encoder import reference as ref
from tests.tolerances import assert_within, recompute_bound


def _modules(n_embd: int = 8, n_layer: int = 2):
    return select_modules(tiny_gpt2(n_embd=n_embd, n_layer=n_layer), FingerprintConfig())


@pytest.mark.parametrize("budget,max_block", [(1200, 200), (4096, 1024), (100, 1000), (10**6, 64)])
def test_budget_plan_fits_the_budget_and_the_block_cap(budget, max_block):
    modules = _modules()
    plan = plan_projection(modules, k=None, budget=budget, max_block=max_block)
    dims = plan_dims(modules, plan)
    assert sum(dims) <= budget and max(dims) <= max_block
    for m, d in zip(modules, dims, strict=True):
        sizes = plan[m.name]
        if sizes is None:
            assert d == m.out_features * m.in_features
        else:
            assert 1 <= sizes[0] <= m.out_features and 1 <= sizes[1] <= m.in_features
            # Projected only when the exact gradient would not fit the block cap or budget.
            assert m.out_features * m.in_features > min(max_block, budget // len(modules))


def test_budget_plan_stores_small_modules_exactly_and_water_fills():
    modules = _modules()  # 8x8 (x2), 24x8 (x2), 32x8 (x2), 8x32 (x2)
    plan = plan_projection(modules, k=None, budget=1200, max_block=200)
    exact = {m.name for m in modules if plan[m.name] is None}
    assert exact == {m.name for m in modules if m.out_features * m.in_features == 64}
    # The 2 x 64 dims the exact modules did not use of their 150 went to the others:
    # the projected ones get more than the equal share 1200 / 8 = 150 between them.
    dims = plan_dims(modules, plan)
    assert (
        sum(d for m, d in zip(modules, dims, strict=True) if m.name not in exact) > 6 * 150 - 6 * 8
    )
    # With room for everything, nothing is projected; the budget never exceeds the gradient.
    everything = plan_projection(modules, k=None, budget=10**6, max_block=10**6)
    assert all(sizes is None for sizes in everything.values())


def test_fixed_k_plan_and_old_manifests():
    modules = _modules()
    assert set(plan_projection(modules, k=3, budget=1).values()) == {(3, 3)}
    assert set(plan_projection(modules, k=0, budget=1).values()) == {None}
    assert FingerprintConfig.from_dict(FingerprintConfig().to_dict()) == FingerprintConfig()
    # Format 2 writes every key: a dict without one (a format-1 manifest's) is refused.
    for key in ("budget", "projection"):
        partial = FingerprintConfig().to_dict()
        partial.pop(key)
        with pytest.raises(ConfigError, match=f"missing \\['{key}'\\]"):
            FingerprintConfig.from_dict(partial)
    assert (
        FingerprintConfig().projection == "sketch"
    )  # the default: K-FAC-whitened, sketched, no correction, no R
    assert (
        FingerprintConfig().block_cap == 4096
        and FingerprintConfig(hessian="mixed").block_cap == 1024
    )
    assert not FingerprintConfig().correction and FingerprintConfig().hessian == "none"
    with pytest.raises(ConfigError, match="nothing to fit"):
        TrackStarEncoder(tiny_gpt2(), FingerprintConfig(k=2, projection="gaussian")).fit_basis([])
    with pytest.raises(ConfigError, match="projection must be"):
        FingerprintConfig(projection="dense")
    # An index of format 3 recorded the encoder mode: "exact" reads as today's, a retired one is refused.
    assert (
        FingerprintConfig.from_dict({**FingerprintConfig().to_dict(), "mode": "exact"})
        == FingerprintConfig()
    )
    with pytest.raises(ConfigError, match="retired"):
        FingerprintConfig.from_dict({**FingerprintConfig().to_dict(), "mode": "factored"})


def test_rectangular_projection_is_scaled_per_side():
    m = _modules(n_embd=64)[2]  # c_fc: 256 x 64
    a, b = projection_pair(5, m, 48, 12)
    assert a.shape == (48, m.out_features) and b.shape == (12, m.in_features)
    # Entries N(0, 1/k_side): E ||A G B^T||^2 = ||G||^2. Variance estimates over 12k and 768
    # entries: relative standard errors sqrt(2/n) ~ 1.3% and 5%; 4 of them as the bound.
    assert float(a.var()) == pytest.approx(1 / 48, rel=4 * np.sqrt(2 / a.numel()))
    assert float(b.var()) == pytest.approx(1 / 12, rel=4 * np.sqrt(2 / b.numel()))


def _second_moments(model, seed: int) -> SecondMoments:
    g = torch.Generator().manual_seed(seed)
    v = {
        n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 1e-2 + 1e-4
        for n, p in model.named_parameters()
    }
    return SecondMoments(v_hat=v, eps=1e-6, source="test")


@pytest.mark.parametrize("unit_norm", [True, False])
def test_exact_rescorer_matches_the_unprojected_reference(unit_norm):
    """Re-scored candidates equal the dense, unprojected, corrected gradients' cosines (or
    dots), whatever the index's projection and whitening."""
    model = tiny_gpt2(seed=3, dtype=torch.float64)
    sm = _second_moments(model, 4)
    config = FingerprintConfig(
        k=2, seed=1, hessian="mixed", unit_norm=unit_norm, projection="gaussian", correction=True
    )
    rescorer = ExactRescorer(model, config, sm)
    g = torch.Generator().manual_seed(0)
    candidates = [
        sequence_example(torch.randint(1, 40, (int(n),), generator=g).tolist())
        for n in torch.randint(3, 14, (11,), generator=g)
    ]
    query = Example((4, 9, 2, 7, 7, 1), (False, False, False, True, True, True))
    got = rescorer.scores(query, candidates, pad_id=0).numpy()

    modules = TrackStarEncoder(model, config, second_moments=sm).modules
    kw = dict(k=0, seed=1, v_hat=sm.v_hat, eps=sm.eps)
    q = ref.reference_phi(model, modules, query, **kw)
    c = np.stack([ref.reference_phi(model, modules, e, **kw) for e in candidates])
    want = c @ q
    # Both vectors are recomputed through the model in another batch shape; its softmax and
    # norms run in float32 whatever the weights (tests/tolerances.recompute_bound).
    bound = 2 * recompute_bound(np.float32)
    if unit_norm:
        want = want / (np.linalg.norm(c, axis=1) * np.linalg.norm(q))
    else:
        bound = bound * np.linalg.norm(c, axis=1) * np.linalg.norm(q)
    assert_within(got, want, bound, "re-scored candidates")
    assert np.argsort(-got)[0] == np.argsort(-want)[0]
