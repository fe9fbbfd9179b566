"""The encoder against the slow reference: every mode, max abs diff < 1e-5 (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from api.errors import ConfigError
from encoder.batching import Example, collate, sequence_example
from encoder.config import FingerprintConfig
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
        p, c = (
            int(torch.randint(2, 6, (1,), generator=g)),
            int(torch.randint(1, 4, (1,), generator=g)),
        )
        ids = torch.randint(1, vocab, (p + c,), generator=g).tolist()
        out.append(Example(tuple(ids), tuple([False] * p + [True] * c)))
    return out


def _random_second_moments(model, seed: int) -> SecondMoments:
    g = torch.Generator().manual_seed(seed)
    v = {
        n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 1e-2 + 1e-4
        for n, p in model.named_parameters()
    }
    return SecondMoments(v_hat=v, eps=1e-6, source="test")


# The budget rule on this model (n_embd 8): the two 8 x 8 attention projections fit their
# share and are stored exactly, the others get rectangular projections (e.g. 22 x 8).
BUDGET = {"k": None, "budget": 1200, "max_block": 200}


@pytest.mark.parametrize(
    ("k", "projection"),
    [
        (0, "gaussian"),
        (3, "gaussian"),
        ("budget", "gaussian"),
        (0, "sketch"),
        (3, "sketch"),
        ("budget", "sketch"),
    ],
)
@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("hessian", ["none", "train", "mixed"])
def test_fingerprints_match_reference(k, projection, correction, hessian):
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sizing = BUDGET if k == "budget" else {"k": k}
    whiten = projection == "sketch"  # the whitened sketch (the plain one: its own test below)
    cfg = FingerprintConfig(
        seed=7,
        correction=correction,
        hessian=hessian,
        projection=projection,
        whiten=whiten,
        **sizing,
    )
    sm = _random_second_moments(model, seed=2) if correction else None
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    train = _examples(3, 10, 3, 12, 40)
    queries = _queries(4, 5, 40)
    if projection == "sketch":  # the whitening from the training examples, as a build fits it
        enc.fit_basis(collate(train[i : i + 4]) for i in range(0, len(train), 4))

    # Encoder: padded batches, hooks.
    phi_train = torch.cat([enc.project(collate(train[i : i + 4])) for i in range(0, len(train), 4)])
    phi_query = enc.project(collate(queries))
    # Reference: each example alone, torch.func, dense projection.
    kw = dict(
        k=cfg.k, seed=7, v_hat=sm.v_hat if sm else None, eps=sm.eps if sm else 1e-8, plan=enc.plan
    )
    if k == "budget" and projection == "gaussian":  # the sketch gives every module a pair
        sizes = list(enc.plan.values())
        assert None in sizes and any(s is not None and s[0] != s[1] for s in sizes), (
            enc.plan
        )  # exact and rectangular
    if projection == "sketch":  # the whitening and the seeded hash, dense
        kw = dict(
            plan=enc.plan, roots=enc.family.whitening(), seed=7, v_hat=kw["v_hat"], eps=kw["eps"]
        )
        phi = ref.reference_sketch_phi
        if k == "budget":  # whole (the two 8 x 8 attention maps) and hashed modules both
            assert {enc.family.whole(m) for m in enc.modules} == {True, False}
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
            Whitener.from_statistics(
                st, se, lambda_=None, lambda_component=cfg.lambda_component, delta=cfg.delta
            )
        )
        rt = ref.block_moments(ref_train, enc.block_dims)
        re = ref.block_moments(ref_query, enc.block_dims) if hessian == "mixed" else None
        lam = ref.reference_lambda(rt, re, cfg.lambda_component) if re is not None else 0.0
        assert enc.whitener.lambda_ == pytest.approx(lam, rel=1e-6)
        whiteners = ref.reference_whiten(rt, re, lam, cfg.delta)

    e_train = enc.finalize(phi_train).numpy()
    e_query = enc.finalize(phi_query).numpy()
    assert (
        np.abs(e_train - ref.reference_fingerprints(ref_train, whiteners, enc.block_dims)).max()
        < TOL
    )
    assert (
        np.abs(e_query - ref.reference_fingerprints(ref_query, whiteners, enc.block_dims)).max()
        < TOL
    )
    assert np.allclose(np.linalg.norm(e_train, axis=1), 1.0)


def test_batch_invariance_float32():
    """An example's fingerprint alone equals its fingerprint inside a padded batch."""
    model = tiny_gpt2(seed=5, n_embd=16)
    cfg = FingerprintConfig(k=4, hessian="none", projection="sketch", correction=True, whiten=True)
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
    enc = TrackStarEncoder(
        model, FingerprintConfig(k=3, hessian="none", correction=False, projection="gaussian")
    )
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


def test_sketch_leaves_a_long_side_unwhitened(monkeypatch):
    """A side longer than MAX_SIDE is not whitened (its covariance is not summed): it is held as
    the [1] scale s of s I; the encoder refuses to encode before the whitening is fitted."""
    from encoder import basis

    monkeypatch.setattr(basis, "MAX_SIDE", 16)  # the tiny model's sides: 8, 24 and 32
    model = tiny_gpt2(seed=1)
    config = FingerprintConfig(k=3, seed=5, hessian="none", correction=False, whiten=True)
    enc = TrackStarEncoder(model, config)
    with pytest.raises(ConfigError, match="not fitted"):
        enc.project(collate(_examples(3, 2, 3, 12, 40)))
    enc.fit_basis([collate(_examples(3, 6, 3, 12, 40))])
    roots = enc.family.whitening()
    probe = TrackStarEncoder(model, enc.config)
    probe.family.placeholder()  # the memory probe's stand-in has the fitted shapes
    for m in enc.modules:
        w_out, w_in = roots[m.name]
        assert (w_out.numel() == 1) == (m.out_features > 16)
        assert (w_in.numel() == 1) == (m.in_features > 16)
        shapes = [tuple(w.shape) for w in probe.family.whitening()[m.name]]
        assert shapes == [tuple(w_out.shape), tuple(w_in.shape)]


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("k", [0, 3])
def test_a_long_unwhitened_side_is_never_made_dense(monkeypatch, k, correction):
    """A side over MAX_SIDE is the [1] scale s; every block takes it as s I without forming the
    dense identity (the second stage of a model with sides over 4096), and gives the dense
    reference's phi and weight directions (u . phi(G) = sum_W <V_W, G_W>)."""
    from encoder import basis

    monkeypatch.setattr(basis, "MAX_SIDE", 16)  # the tiny model's sides: 8, 24 and 32
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sm = _random_second_moments(model, seed=2) if correction else None
    cfg = FingerprintConfig(k=k, seed=5, hessian="none", correction=correction, whiten=True)
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    train = _examples(3, 8, 3, 12, 40)
    enc.fit_basis([collate(train)])
    roots = enc.family.whitening()
    assert any(w.numel() == 1 for pair in roots.values() for w in pair)
    u = torch.randn(enc.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with monkeypatch.context() as mp:  # the encoder's paths; the dense reference makes its own
        mp.setattr(torch, "eye", lambda *a, **k: pytest.fail("a dense identity was made"))
        got = enc.project(collate(train[:3])).numpy()
        v = enc.weight_directions(u)
        first = float(u @ enc.project(collate(train[:1]))[0])
    kw = dict(
        plan=enc.plan,
        roots=roots,
        seed=5,
        v_hat=sm.v_hat if sm else None,
        eps=sm.eps if sm else 1e-8,
    )
    want = np.stack([ref.reference_sketch_phi(model, enc.modules, e, **kw) for e in train[:3]])
    assert np.abs(got - want).max() <= TOL * max(np.abs(want).max(), 1.0)
    grads = ref.corrected_grads(model, enc.modules, train[0])  # uncorrected G: V carries C
    dot = sum(
        float((v[m.param_name].T if m.transposed else v[m.param_name]).mul(grads[m.name]).sum())
        for m in enc.modules
    )
    # The reference's per-example gradients and the batched pass differ by the float32 softmax
    # of transformers' attention, as in the phi comparison above (TOL).
    assert dot == pytest.approx(first, rel=TOL)


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("sizing", [{"k": 0}, {"k": 3}, BUDGET])
def test_sketch_whitening_matches_reference(sizing, correction, monkeypatch):
    """The sketch's whitening: W_out = s L_out, W_in = L_in with L the damped inverse square
    roots of the mean corrected-gradient side covariances (reference: torch.func gradients of
    each example alone, scipy's fractional power), whatever the sizing. Uncorrected, a batch's
    sums come from the token factors (``BasisStatistics.add_factors``) where that is cheaper
    and through the formed gradients elsewhere: here both, within one module's sums."""
    from encoder.basis import BasisStatistics

    calls: dict[str, set[str]] = {"add": set(), "add_factors": set()}

    def counting(method):
        real = getattr(BasisStatistics, method)

        def call(self, name, *args):
            calls[method].add(name)
            real(self, name, *args)

        return call

    for method in calls:
        monkeypatch.setattr(BasisStatistics, method, counting(method))
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sm = _random_second_moments(model, seed=2)
    cfg = FingerprintConfig(**sizing, seed=5, hessian="none", correction=correction, whiten=True)
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    plain = TrackStarEncoder(
        model, FingerprintConfig(**sizing, hessian="none", projection="gaussian"), second_moments=sm
    )
    assert enc.block_dims == plain.block_dims and all(s is not None for s in enc.plan.values())
    train = _examples(3, 10, 3, 12, 40)
    enc.fit_basis(collate(train[i : i + 3]) for i in range(0, len(train), 3))
    v_hat = sm.v_hat if correction else None
    want = ref.reference_kfac_roots(model, enc.modules, train, cfg.delta, v_hat, sm.eps)
    assert calls["add"] == set(enc.module_names)
    assert calls["add_factors"] == (set() if correction else set(enc.module_names))
    got = enc.family.whitening()
    assert set(got) == set(want) == set(enc.module_names)
    for name, (a_ref, b_ref, a_tol, b_tol) in want.items():
        assert np.abs(got[name][0].double().numpy() - a_ref).max() <= a_tol, name
        assert np.abs(got[name][1].double().numpy() - b_ref).max() <= b_tol, name


def test_sketch_whitens_each_side_of_the_training_gradients():
    """Undamped (delta 0) and with full-rank side covariances, the input side of the sketch's
    G~ L_in is white over the examples it was fitted on: mean (G~ L_in)^T (G~ L_in) =
    L_in C_in L_in = I, and likewise L_out G~ on the output side (up to s^2)."""
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    sm = _random_second_moments(model, seed=2)
    cfg = FingerprintConfig(k=0, hessian="none", delta=0.0, correction=True, whiten=True)
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    train = _examples(3, 40, 3, 12, 40)  # 40 x 3-12 tokens: C_out, C_in of full rank
    grads = [ref.corrected_grads(model, enc.modules, e, sm.v_hat, sm.eps) for e in train]
    enc.fit_basis([collate(train)])
    for m in enc.modules:
        a, b = (t.double() for t in enc.family.whitening()[m.name])
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


@pytest.mark.parametrize("sizing", [{"k": 3}, BUDGET])
def test_the_default_sketch_is_the_sketch_of_the_plain_gradient(sizing):
    """The default (``whiten`` off): nothing to fit, every side the identity (the [1] scale 1), so each
    block is the CountSketch of the plain gradient (or the plain gradient, kept whole), and
    the exact stage scores the plain gradient cosine, with the norms a build stores."""
    from encoder.rescoring import ExactRescorer

    model = tiny_gpt2(seed=1, dtype=torch.float64)
    cfg = FingerprintConfig(**sizing, seed=7, hessian="none")  # the default: not whitened
    enc = TrackStarEncoder(model, cfg)
    assert not enc.needs_fit
    with pytest.raises(ConfigError, match="nothing to fit"):
        enc.fit_basis([collate(_examples(3, 2, 3, 12, 40))])
    identity = {m.name: (torch.ones(1), torch.ones(1)) for m in enc.modules}
    assert {n: tuple(map(torch.Tensor.tolist, p)) for n, p in enc.family.whitening().items()} == {
        n: ([1.0], [1.0]) for n in identity
    }
    train = _examples(3, 6, 3, 12, 40)
    sq = torch.zeros(len(train), dtype=torch.float64)
    got = enc.project(collate(train), sq).numpy()
    want = np.stack(
        [
            ref.reference_sketch_phi(model, enc.modules, e, plan=enc.plan, roots=identity, seed=7)
            for e in train
        ]
    )
    assert np.abs(got - want).max() <= TOL * max(np.abs(want).max(), 1.0)
    plain = [ref.corrected_grads(model, enc.modules, e) for e in train]
    norms = np.array([sum(float((g[m.name] ** 2).sum()) for m in enc.modules) for g in plain])
    assert np.abs(sq.numpy() - norms).max() <= TOL * norms.max()
    # The exact stage: the plain gradients' cosines.
    scorer = ExactRescorer(model, cfg, None, enc.family.whitening()).for_query(train[0], pad_id=0)
    flat = np.stack([np.concatenate([g[m.name].ravel() for m in enc.modules]) for g in plain])
    cos = flat @ flat[0] / (np.linalg.norm(flat, axis=1) * np.linalg.norm(flat[0]))
    assert np.abs(scorer(train[1:], sq[1:]).numpy() - cos[1:]).max() <= TOL


def test_only_the_sketch_whitens_and_old_manifests_read_as_whitened():
    with pytest.raises(ConfigError, match="only the sketch whitens"):
        FingerprintConfig(projection="gaussian", whiten=True)
    old = FingerprintConfig().to_dict()
    del old["whiten"]  # a manifest written before the field
    assert FingerprintConfig.from_dict(old).whiten is True
