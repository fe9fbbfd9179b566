"""The evaluation's method table: each row's fingerprint config, and the equal-d controls."""

from __future__ import annotations

from dataclasses import replace

import pytest

from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from evaluation.settings import METHODS
from tests.conftest import tiny_gpt2

BY_NAME = {m.name: m for m in METHODS}


def _dim(method: str, base: FingerprintConfig) -> int:
    # n_embd 64: every module's out x in (64 x 192 and up) exceeds both block caps.
    return TrackStarEncoder(tiny_gpt2(n_embd=64), BY_NAME[method].config(base)).dim


def test_the_sketch_has_a_row_at_the_papers_d():
    base = FingerprintConfig(projection="gaussian")
    paper, sketch = _dim("trackstar", base), _dim("sketch", base)
    assert sketch == 4 * paper  # 4096- against 1024-dim blocks on every module
    assert _dim("sketch_block1024", base) == paper


GRADIENT = [m for m in METHODS if m.kind == "gradient"]


@pytest.mark.parametrize(
    "pair",
    [(a, b) for a in GRADIENT for b in GRADIENT if a.name < b.name],
    ids=lambda p: f"{p[0].name}-{p[1].name}",
)
def test_methods_that_share_a_phi_differ_only_on_top_of_it(pair):
    """Methods with one phi_key are scored from one phi (``evaluation.run._projected``):
    their configs may differ only in what is applied to it (R, unit norm); methods with
    different keys differ in what forms phi."""
    base = FingerprintConfig(seed=3)
    a, b = (m.config(base) for m in pair)
    on_top = {"hessian": "none", "unit_norm": True}
    same_phi = replace(a, **on_top) == replace(b, **on_top)
    assert same_phi == (pair[0].phi_key(base) == pair[1].phi_key(base))
    assert a.seed == b.seed == 3 and a.k == b.k == base.k
