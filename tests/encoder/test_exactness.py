"""The encoder against the slow reference: every mode, max abs diff < 1e-5 (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder.batching import Example, collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.errors import ConfigError
from encoder.fingerprint import TrackStarEncoder
from encoder.optimizer_state import SecondMoments
from encoder.whitening import Whitener
from tests.conftest import tiny_gpt2
from tests.encoder import reference as ref

TOL = 1e-5


def _examples(seed: int, n: int, lo: int, hi: int, vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(sequence_example(torch.randint(1, vocab, (length,), generator=g).tolist()))
    return out


def _queries(seed: int, n: int, vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        ids = torch.randint(1, vocab, (p + c,), generator=g).tolist()
        out.append(Example(tuple(ids), tuple([False] * p + [True] * c)))
    return out


def _random_second_moments(model, seed: int) -> SecondMoments:
    g = torch.Generator().manual_seed(seed)
    v = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 1e-2 + 1e-4 for n, p in model.named_parameters()}
    return SecondMoments(v_hat=v, eps=1e-6, source="test")


# The budget rule on this model (n_embd 8): the two 8 x 8 attention projections fit their
# share and are stored exactly, the others get rectangular projections (e.g. 22 x 8).
BUDGET = {"k": None, "budget": 1200, "max_block": 200}


@pytest.mark.parametrize(("k", "projection"), [(0, "gaussian"), (3, "gaussian"), ("budget", "gaussian"),
                                               (3, "pca"), ("budget", "pca"),
                                               (0, "kfac"), (3, "kfac"), ("budget", "kfac"),
                                               (0, "sketch"), (3, "sketch"), ("budget", "sketch")])  # fmt: skip
@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("hessian", ["none", "train", "mixed"])
def test_fingerprints_match_reference(k, projection, correction, hessian):
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sizing = BUDGET if k == "budget" else {"k": k}
    cfg = FingerprintConfig(seed=7, correction=correction, hessian=hessian, projection=projection, **sizing)
    sm = _random_second_moments(model, seed=2) if correction else None
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    train = _examples(3, 10, 3, 12, 40)
    queries = _queries(4, 5, 40)
    if projection != "gaussian":  # the basis / whitening from the training examples, as a build fits it
        enc.fit_basis(collate(train[i : i + 4]) for i in range(0, len(train), 4))

    # Encoder: padded batches, hooks.
    phi_train = torch.cat([enc.project(collate(train[i : i + 4])) for i in range(0, len(train), 4)])
    phi_query = enc.project(collate(queries))
    # Reference: each example alone, torch.func, dense projection.
    kw = dict(k=cfg.k, seed=7, v_hat=sm.v_hat if sm else None, eps=sm.eps if sm else 1e-8, plan=enc.plan,
              pairs=enc.projections() if projection != "gaussian" else None)  # the pairs: test_fitted_*
    if k == "budget" and projection not in ("kfac", "sketch"):  # these give every module a pair
        sizes = list(enc.plan.values())
        assert None in sizes and any(s is not None and s[0] != s[1] for s in sizes), enc.plan  # exact and rectangular
    if projection == "sketch":  # the whitening and the seeded hash, dense
        kw = dict(plan=enc.plan, roots=enc.kfac_roots, seed=7, v_hat=kw["v_hat"], eps=kw["eps"])
        phi = ref.reference_sketch_phi
        if k == "budget":  # whole (the two 8 x 8 attention maps) and hashed modules both
            assert {enc._whole(m) for m in enc.modules} == {True, False}
    else:
        phi = ref.reference_phi
    ref_train = np.stack([phi(model, enc.modules, e, **kw) for e in train])
    ref_query = np.stack([phi(model, enc.modules, e, **kw) for e in queries])
    scale = np.abs(ref_train).max()
    assert np.abs(phi_train.numpy() - ref_train).max() <= TOL * max(scale, 1.0)
    assert np.abs(phi_query.numpy() - ref_query).max() <= TOL * max(scale, 1.0)

    whiteners = None
    if hessian != "none":
        st = enc.new_statistics()
        st.update(phi_train)
        se = None
        if hessian == "mixed":
            se = enc.new_statistics()
            se.update(phi_query)
        enc.set_whitener(
            Whitener.from_statistics(st, se, lambda_=None, lambda_component=cfg.lambda_component, delta=cfg.delta)
        )
        rt = ref.block_moments(ref_train, enc.block_dims)
        re = ref.block_moments(ref_query, enc.block_dims) if hessian == "mixed" else None
        lam = ref.reference_lambda(rt, re, cfg.lambda_component) if re is not None else 0.0
        assert enc.whitener.lambda_ == pytest.approx(lam, rel=1e-6)
        whiteners = ref.reference_whiten(rt, re, lam, cfg.delta)

    e_train = enc.finalize(phi_train).numpy()
    e_query = enc.finalize(phi_query).numpy()
    assert np.abs(e_train - ref.reference_fingerprints(ref_train, whiteners, enc.block_dims)).max() < TOL
    assert np.abs(e_query - ref.reference_fingerprints(ref_query, whiteners, enc.block_dims)).max() < TOL
    assert np.allclose(np.linalg.norm(e_train, axis=1), 1.0)


def test_batch_invariance_float32():
    """An example's fingerprint alone equals its fingerprint inside a padded batch."""
    model = tiny_gpt2(seed=5, n_embd=16)
    cfg = FingerprintConfig(k=4, hessian="none", projection="pca", correction=True)
    enc = TrackStarEncoder(model, cfg, second_moments=_random_second_moments(model, 6))
    short = sequence_example([3, 9, 4, 7])
    others = _examples(8, 5, 10, 20, 40)
    enc.fit_basis([collate(others)])
    alone = enc.encode(collate([short]))[0]
    inside = enc.encode(collate([others[0], short, *others[1:]]))[1]
    assert torch.abs(alone - inside).max() < TOL
    # Padding tokens with any id contribute nothing.
    padded = enc.encode(collate([short, others[0]], pad_id=17))[0]
    assert torch.abs(alone - padded).max() < TOL


def test_query_loss_only_on_completion():
    """Changing a prompt token's target status changes the fingerprint; padding does not."""
    model = tiny_gpt2(seed=9, dtype=torch.float64)
    enc = TrackStarEncoder(model, FingerprintConfig(k=3, hessian="none", correction=False, projection="gaussian"))
    ids = (5, 6, 7, 8, 9)
    q = Example(ids, (False, False, False, True, True))
    full = sequence_example(ids)
    e_q, e_full = enc.encode(collate([q, full]))
    assert not torch.allclose(e_q, e_full)
    e_ref = ref.reference_phi(model, enc.modules, q, k=3, seed=0)
    assert np.allclose(enc.project(collate([q])).numpy()[0], e_ref, atol=1e-10)


def test_projection_matrices_are_deterministic_and_scaled():
    from encoder.modules import select_modules
    from encoder.projection import projection_pair

    model = tiny_gpt2()
    m = select_modules(model, FingerprintConfig())[2]
    a1, b1 = projection_pair(3, m, 64)
    a2, b2 = projection_pair(3, m, 64)
    a3, _ = projection_pair(4, m, 64)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, a3)
    assert a1.shape == (64, m.out_features) and b1.shape == (64, m.in_features)
    # Entries N(0, 1/k): the variance estimate over 64*out entries is close to 1/64.
    assert float(a1.var()) == pytest.approx(1 / 64, rel=0.15)


def test_fitted_basis_matches_reference():
    """The pca basis equals numpy's top eigenvectors of the summed corrected-gradient
    covariances (reference: torch.func gradients of each example alone)."""
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sm = _random_second_moments(model, seed=2)
    enc = TrackStarEncoder(model, FingerprintConfig(**BUDGET, hessian="none", projection="pca", correction=True), second_moments=sm)
    train = _examples(3, 10, 3, 12, 40)
    enc.fit_basis(collate(train[i : i + 3]) for i in range(0, len(train), 3))
    want = ref.reference_basis(model, enc.modules, train, enc.plan, sm.v_hat, sm.eps)
    got = enc.projections()
    assert set(got) == set(want) and want
    for name, (a_ref, b_ref, vals_out, vals_in) in want.items():
        for mat, mat_ref, vals in ((got[name][0], a_ref, vals_out), (got[name][1], b_ref, vals_in)):
            k = mat_ref.shape[0]
            # Davis-Kahan: an eigenvector moves by at most ||dC|| / gap. dC: the two gradient
            # paths and the sums agree to a relative 1e-9 of C (float64 arithmetic: ~1e-14);
            # the float32 storage of the basis adds 2^-24 per entry.
            gaps = -np.diff(vals[: k + 1])  # k may be the whole side
            assert gaps.min() > 0, "distinct eigenvalues: the eigenvectors are defined"
            tol = 1e-9 * vals[0] / gaps.min() + 2.0**-23
            assert np.abs(mat.double().numpy() - mat_ref).max() <= tol, name
            assert (
                np.abs(mat.double() @ mat.double().T - torch.eye(k, dtype=torch.float64)).max()
                <= 4 * 2.0**-23
            )


def test_fitted_basis_keeps_a_long_side_gaussian(monkeypatch):
    """A side longer than MAX_SIDE keeps the seeded Gaussian matrix (its covariance is not summed)."""
    from encoder import basis
    from encoder.projection import projection_pair

    monkeypatch.setattr(basis, "MAX_SIDE", 16)  # the tiny model's sides: 8, 24 and 32
    model = tiny_gpt2(seed=1)
    enc = TrackStarEncoder(model, FingerprintConfig(k=3, seed=5, hessian="none", correction=False, projection="pca"))
    with pytest.raises(ConfigError, match="basis is not fitted"):
        enc.project(collate(_examples(3, 2, 3, 12, 40)))
    enc.fit_basis([collate(_examples(3, 6, 3, 12, 40))])
    for m in enc.modules:
        a, b = enc.projections()[m.name]
        gauss_a, gauss_b = projection_pair(5, m, 3, 3)
        assert torch.equal(a, gauss_a) == (m.out_features > 16)
        assert torch.equal(b, gauss_b) == (m.in_features > 16)


@pytest.mark.parametrize("sizing", [{"k": 0}, {"k": 3}, BUDGET])
def test_kfac_pairs_match_reference(sizing):
    """projection kfac: A = s G_A L_out, B = G_B L_in with L the damped inverse square roots
    of the mean corrected-gradient side covariances (reference: torch.func gradients of each
    example alone, scipy's fractional power); a module stored exactly keeps its out*in dims
    and is whitened by (s L_out, L_in) alone."""
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sm = _random_second_moments(model, seed=2)
    cfg = FingerprintConfig(**sizing, seed=5, hessian="none", projection="kfac", correction=True)
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    plain = TrackStarEncoder(model, FingerprintConfig(**sizing, hessian="none", projection="gaussian"), second_moments=sm)
    assert enc.block_dims == plain.block_dims and all(s is not None for s in enc.plan.values())
    train = _examples(3, 10, 3, 12, 40)
    enc.fit_basis(collate(train[i : i + 3]) for i in range(0, len(train), 3))
    want = ref.reference_kfac_pairs(model, enc.modules, train, enc.plan, 5, cfg.delta, sm.v_hat, sm.eps)
    got = enc.projections()
    assert set(got) == set(want) == set(enc.module_names)
    for name, (a_ref, b_ref, a_tol, b_tol) in want.items():
        assert np.abs(got[name][0].double().numpy() - a_ref).max() <= a_tol, name
        assert np.abs(got[name][1].double().numpy() - b_ref).max() <= b_tol, name


def test_kfac_whitens_each_side_of_the_training_gradients():
    """Undamped (delta 0) and with full-rank side covariances, the input side of kfac's
    G~ L_in is white over the examples it was fitted on: mean (G~ L_in)^T (G~ L_in) =
    L_in C_in L_in = I, and likewise L_out G~ on the output side (up to s^2)."""
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sm = _random_second_moments(model, seed=2)
    enc = TrackStarEncoder(model, FingerprintConfig(k=0, hessian="none", projection="kfac", delta=0.0, correction=True),
                           second_moments=sm)  # fmt: skip
    train = _examples(3, 40, 3, 12, 40)  # 40 x 3-12 tokens: C_out, C_in of full rank
    grads = [ref.corrected_grads(model, enc.modules, e, sm.v_hat, sm.eps) for e in train]
    enc.fit_basis([collate(train)])
    for m in enc.modules:
        a, b = (t.double() for t in enc.projections()[m.name])
        g = torch.stack([gr[m.name] for gr in grads])
        s2 = float(torch.einsum("noi,noi->", g, g)) / len(train)
        white_in = torch.einsum("noi,noj->ij", g @ b, g @ b) / len(train)
        white_out = torch.einsum("noi,npi->op", a @ g, a @ g) / len(train) / s2
        c_in = torch.einsum("noi,noj->ij", g, g) / len(train)
        c_out = torch.einsum("noi,npi->op", g, g) / len(train)
        for c, raw, side in ((white_in, c_in, m.in_features), (white_out, c_out, m.out_features)):
            # L is stored in float32 (relative u per entry); L C L^T then errs by ~2 kappa(C) u
            # per unit of the identity, summed over the side (n-term products).
            err = float((c - torch.eye(side, dtype=torch.float64)).abs().max())
            assert err <= 4 * side * float(torch.linalg.cond(raw)) * 2.0**-24, (m.name, err)
