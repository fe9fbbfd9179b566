"""Automatic batch size from free memory (encoder/memory.py); the CUDA peak check is in
tests/gpu/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from api.errors import ConfigError
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.memory import (
    DEFAULT_FRACTION,
    auto_batch_size,
    candidate_batch_size,
    estimate_memory,
    free_memory,
    runtime_bytes,
)
from tests.conftest import tiny_gpt2


def _encoder(correction: bool = True, projection: str = "sketch") -> TrackStarEncoder:
    model = tiny_gpt2(seed=0, n_embd=32, vocab=64)
    cfg = FingerprintConfig(k=4, hessian="none", correction=correction, projection=projection)
    return TrackStarEncoder(model, cfg)


def test_free_memory_is_positive():
    assert free_memory(torch.device("cpu")) > 0


@pytest.mark.parametrize(
    ("correction", "projection"), [(True, "sketch"), (False, "sketch"), (True, "gaussian")]
)
def test_estimate_grows_with_sequence_length(correction, projection):
    enc = _encoder(correction, projection)  # no second moments, no fit: probed on a twin
    short, long = estimate_memory(enc, 8), estimate_memory(enc, 32)
    assert short.method == "cpu-saved-tensors"
    assert 0 < short.per_example < long.per_example
    # Attention scores make per-example memory at least linear in length.
    assert long.per_example >= 3 * short.per_example


def test_auto_batch_size_fits_the_budget_and_is_monotone():
    enc = _encoder(correction=False)
    est = estimate_memory(enc, 16)
    sizes = []
    for examples in (1, 5, 40, 200):
        free = int((est.fixed + examples * est.per_example) / 0.5) + 1
        bs, got = auto_batch_size(enc, 16, free=free, fraction=0.5, max_batch=10_000)
        assert got == est
        assert got.bytes_for(bs) <= 0.5 * free
        if bs < 8:
            assert got.bytes_for(bs + 1) > 0.5 * free  # the largest that fits
        else:
            assert bs % 8 == 0 and got.bytes_for(bs + 8) > 0.5 * free
        sizes.append(bs)
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] >= 192
    assert auto_batch_size(enc, 16, free=1 << 40, max_batch=64)[0] == 64


def test_auto_batch_size_refuses_when_nothing_fits():
    with pytest.raises(ConfigError) as err:
        auto_batch_size(_encoder(), 16, free=1024)
    assert err.value.code == "insufficient_memory"
    assert "MiB" in str(err.value)


def test_the_exact_stage_takes_as_many_candidates_per_pass_as_memory_holds():
    """On the CPU the exact stage keeps its cap; given the device's free bytes (an
    accelerator's), the largest batch up to the cap that fits, or a clear refusal."""
    enc = _encoder(correction=False)
    assert candidate_batch_size(enc, 16, 8) == 8
    est = estimate_memory(enc, 16)
    three = int((est.fixed + 3 * est.per_example) / DEFAULT_FRACTION) + 1
    assert candidate_batch_size(enc, 16, 8, free=three) == 3
    assert candidate_batch_size(enc, 16, 8, free=1 << 40) == 8
    with pytest.raises(ConfigError) as err:
        candidate_batch_size(enc, 16, 8, free=1024)
    assert err.value.code == "insufficient_memory"


def test_the_runtime_is_a_fresh_interpreter_not_the_caller():
    """The plan's runtime term is what a new process holds after importing torch and
    transformers, measured in a child: the caller's own memory (here 512 MiB more) is not in
    it."""
    import os
    from pathlib import Path

    held = torch.ones(128 << 20)  # 512 MiB, touched
    runtime_bytes.cache_clear()
    runtime = runtime_bytes()
    own = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 0 < runtime < own - held.numel() * 4 + (64 << 20)
    assert runtime_bytes() == runtime  # once per process
