"""PCA pre-transform trained with torch (indexer/faiss_index.train_pca) against FAISS's own."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from encoder.errors import ConfigError
from indexer import faiss_index
from indexer.faiss_index import build_index, train_pca
from tests.tolerances import assert_within, dot_bound, gamma_probabilistic


def _low_rank(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 1.0, rank, dtype=np.float32)[:, None]
    x = rng.standard_normal((n, rank), dtype=np.float32) @ (scales * rng.standard_normal((rank, d), dtype=np.float32))
    return (x + 0.1 * rng.standard_normal((n, d), dtype=np.float32) + 0.5).astype(np.float32)


def _matrix(pca: faiss.PCAMatrix) -> np.ndarray:
    return faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)


@pytest.mark.parametrize("eigh_max", [10_000, 16])  # exact eigendecomposition, randomized SVD
def test_torch_pca_equals_faiss_pca(monkeypatch, eigh_max):
    monkeypatch.setattr(faiss_index, "PCA_EIGH_MAX_DIM", eigh_max)
    x = _low_rank(3000, 96, rank=12)
    ours, ref = train_pca(x, 12), faiss.PCAMatrix(96, 12)
    ref.train(x)
    a, b = _matrix(ours), _matrix(ref)
    lam = faiss.vector_to_array(ref.eigenvalues).astype(np.float64)
    # Both covariances are float32 sums over 3000 rows: ||E|| <= 2 gamma~_n sum(lambda)
    # (probabilistic, lam = 4). Weyl bounds the eigenvalues by ||E||, Davis-Kahan the
    # components by ||E|| / gap (gap to the neighbouring eigenvalues; the 13th is the noise).
    err = 2 * gamma_probabilistic(len(x), lam=4.0) * lam.sum()
    gaps = np.array([min(lam[i - 1] - lam[i] if i else np.inf, lam[i] - lam[i + 1]) for i in range(12)])
    turn = err / gaps  # [12] sin of each component's angle
    # Same components up to sign: |A_ours A_ref^T| is the identity.
    assert_within(np.abs(a @ b.T), np.eye(12), turn[:, None] + turn[None, :], "components")
    assert_within(faiss.vector_to_array(ours.eigenvalues)[:12], lam[:12], err, "eigenvalues")
    # The transform centers: x -> A (x - mean), same as FAISS's up to the sign per output.
    signs = np.sign(np.sum(a * b, axis=1))
    centered = x[:50] - x.mean(0)
    bound = np.linalg.norm(centered, axis=1, keepdims=True) * turn[None, :] + dot_bound(centered, a)
    assert_within(ours.apply(x[:50]) * signs, ref.apply(x[:50]), bound, "transform")


def test_pca_index_round_trips_and_finds_neighbours():
    x = _low_rank(4000, 128, rank=24, seed=1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index("PCA32,IVF16,Flat", 128, [x[:2000], x[2000:]], x[:3000])
    assert isinstance(faiss.downcast_index(index), faiss.IndexPreTransform) and index.ntotal == 4000
    again = faiss.deserialize_index(faiss.serialize_index(index))
    q = x[:20] + 0.01 * np.random.default_rng(2).standard_normal((20, 128)).astype(np.float32)
    d1, i1 = index.search(q, 5)
    d2, i2 = again.search(q, 5)
    np.testing.assert_array_equal(i1, i2)
    assert (i1[:, 0] == np.arange(20)).mean() >= 0.9


def test_pca_needs_enough_vectors():
    with pytest.raises(ConfigError) as err:
        train_pca(np.ones((10, 64), dtype=np.float32), 32)
    assert err.value.code == "invalid_faiss_factory"
