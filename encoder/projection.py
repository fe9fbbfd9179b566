"""Kronecker random projections phi_W = A_W G~_W B_W^T (DESIGN.md step 3).

A_W (k x out) and B_W (k x in) have i.i.d. N(0, 1/k) entries, generated on the CPU from
(seed, module name) so that the indexer and the service produce the same matrices on any
device. They are also saved with the index (safetensors) and checked on load.
"""

from __future__ import annotations

import hashlib

import torch

from encoder.modules import TrackedModule


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit generator seed derived from (seed, module name), stable across runs."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_pair(
    seed: int, module: TrackedModule, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection matrices of one module.

    Returns:
        A: [k, out] float32, B: [k, in] float32, entries N(0, 1/k).
    """
    gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, module.name))
    scale = 1.0 / k**0.5
    a = torch.randn(k, module.out_features, generator=gen, dtype=torch.float32) * scale
    b = torch.randn(k, module.in_features, generator=gen, dtype=torch.float32) * scale
    return a, b


def make_projections(
    seed: int, modules: list[TrackedModule], k: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Projection pairs for all modules keyed by module name (empty when k == 0)."""
    if k == 0:
        return {}
    return {m.name: projection_pair(seed, m, k) for m in modules}
