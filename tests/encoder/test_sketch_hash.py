"""The sketch's counter-based hash (encoder.projection.sketch_hash): what it is, independently of
torch, and that making it at each use gives the fingerprints a kept one gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder.batching import collate
from encoder.config import FingerprintConfig
from encoder.families import sketch
from encoder.fingerprint import TrackStarEncoder
from encoder.modules import select_modules
from encoder.projection import module_seed, sketch_hash
from tests.conftest import tiny_gpt2
from tests.encoder.test_rescoring import _sequences

MASK = (1 << 64) - 1


def _reference(key: int, n: int, dims: int) -> tuple[list[int], list[int]]:
    """SplitMix64 (Steele et al. 2014) in Python integers: entry i is the output function of
    the state key + (i + 1) * 0x9E3779B97F4A7C15 mod 2^64."""
    idx, sign = [], []
    for i in range(n):
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        idx.append((z & ((1 << 63) - 1)) % dims)
        sign.append(-1 if z >> 63 else 1)
    return idx, sign


def test_the_hash_is_splitmix64_of_a_counter():
    m = select_modules(tiny_gpt2(n_embd=32), FingerprintConfig())[0]
    idx, sign = sketch_hash(7, m, 100)
    want_idx, want_sign = _reference(module_seed(7, f"sketch:{m.name}"), len(idx), 100)
    assert idx.tolist() == want_idx and sign.tolist() == want_sign
    assert idx.dtype == torch.int64 and sign.dtype == torch.int8
    # Buckets and signs as even as independent draws: within 5 sd of the binomial.
    n = len(idx)
    counts = np.bincount(idx.numpy(), minlength=100)
    sd = (n * 0.01 * 0.99) ** 0.5
    assert np.abs(counts - n / 100).max() < 5 * sd
    assert abs(int(sign.sum())) < 5 * n**0.5
    assert not torch.equal(sketch_hash(8, m, 100)[0], idx)  # another seed, another hash


@pytest.mark.parametrize("correction", [False, True])
def test_a_hash_made_at_each_use_gives_the_kept_hashs_fingerprints(monkeypatch, correction):
    """An accelerator does not keep the hash (``keeps_hash``); the fingerprints, stored norms and
    weight directions are the ones a kept hash gives."""
    model = tiny_gpt2(seed=3, dtype=torch.float64)
    cfg = FingerprintConfig(k=3, seed=5, hessian="none", correction=correction, whiten=True)
    sm = None
    if correction:
        from tests.encoder.test_exactness import _random_second_moments

        sm = _random_second_moments(model, seed=2)
    batch = collate(_sequences(7, 6))
    kept = TrackStarEncoder(model, cfg, second_moments=sm)
    kept.fit_basis([batch])
    assert kept.family.hashes
    monkeypatch.setattr(sketch, "keeps_hash", lambda device: False)
    made = TrackStarEncoder(model, cfg, second_moments=sm)
    made.family.set_whitening(kept.family.whitening())
    assert not made.family.hashes and made.family.hashed == set(kept.family.hashes)
    sq_kept, sq_made = (torch.zeros(6, dtype=torch.float64) for _ in range(2))
    assert torch.equal(kept.project(batch, sq_kept), made.project(batch, sq_made))
    assert torch.equal(sq_kept, sq_made)
    u = torch.randn(kept.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, v in kept.weight_directions(u).items():
        assert torch.equal(v, made.weight_directions(u)[name])
