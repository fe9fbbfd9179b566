"""The evaluation's method table: each row's fingerprint config, and the equal-d controls."""

from __future__ import annotations

import pytest

from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from evaluation.settings import METHODS
from tests.conftest import tiny_gpt2

BY_NAME = {m.name: m for m in METHODS}


def _dim(method: str, base: FingerprintConfig) -> int:
    # n_embd 64: every module's out x in (64 x 192 and up) exceeds both block caps.
    return TrackStarEncoder(tiny_gpt2(n_embd=64), BY_NAME[method].config(base)).dim


def test_each_family_has_a_row_at_the_others_d():
    base = FingerprintConfig()
    kfac, sketch = _dim("kfac", base), _dim("sketch", base)
    assert sketch == 4 * kfac  # 4096- against 1024-dim blocks on every module
    assert _dim("sketch_block1024", base) == kfac
    assert _dim("kfac_block4096", base) == sketch


@pytest.mark.parametrize("name", [m.name for m in METHODS if m.kind == "gradient"])
def test_methods_that_share_a_phi_share_its_config(name):
    """Methods with one phi_key are scored from one phi: their configs may differ only in
    what is applied on top of it (R, unit norm)."""
    base = FingerprintConfig(seed=3)
    method = BY_NAME[name]
    cfg = method.config(base)
    assert (cfg.correction, cfg.projection, cfg.max_block) == method.phi_key(base)
    assert cfg.seed == 3 and cfg.k == base.k
