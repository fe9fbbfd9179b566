"""Kronecker random projections phi_W = A_W G~_W B_W^T (DESIGN.md step 3), and their sizes.

A_W (k_out x out) and B_W (k_in x in) have i.i.d. N(0, 1/k_out) and N(0, 1/k_in) entries,
so E ||A G B^T||^2 = ||G||^2. They are generated on the CPU from (seed, module name), so
the indexer and the service produce the same matrices on any device, saved with the index
(safetensors) and checked on load.

Sizes come from one of two rules (``encoder.config.FingerprintConfig``):
- a fixed ``k`` per side for every module (k*k dims each; k = 0: no projection at all);
- a total ``budget`` of dims (the paper's 2^16 in all), shared equally by the modules and
  water-filled: a module whose gradient (out*in) fits its share is stored exactly, and what
  it leaves over goes to the others; no block exceeds ``max_block`` dims, which bounds
  each d_W x d_W Hessian block (``encoder.whitening``).
"""

from __future__ import annotations

import hashlib
import math

import torch

from encoder.config import MAX_BLOCK
from encoder.modules import TrackedModule

Plan = dict[str, tuple[int, int] | None]
"""Module name -> (k_out, k_in) of its projection, or None: stored exactly (out*in dims)."""

MAX_BLOCK_DIMS = MAX_BLOCK
"""Default cap of one module's block in the budget rule (``FingerprintConfig.block_cap``)."""


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit generator seed derived from (seed, module name), stable across runs."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_pair(
    seed: int, module: TrackedModule, k: int, k_in: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection matrices of one module.

    Args:
        seed: the projection seed.
        module: the tracked module.
        k: rows of A (k_out); also rows of B unless ``k_in`` is given.
        k_in: rows of B.
    Returns:
        A: [k, out] float32 with N(0, 1/k) entries, B: [k_in, in] float32 with N(0, 1/k_in).
    """
    k_in = k if k_in is None else k_in
    gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, module.name))
    a = torch.randn(k, module.out_features, generator=gen, dtype=torch.float32) * (1.0 / k**0.5)
    b = torch.randn(k_in, module.in_features, generator=gen, dtype=torch.float32) * (
        1.0 / k_in**0.5
    )
    return a, b


def plan_projection(
    modules: list[TrackedModule], *, k: int | None, budget: int, max_block: int = MAX_BLOCK_DIMS
) -> Plan:
    """Each module's projection size, by the fixed-k rule (``k`` given) or the budget rule.

    Budget rule: modules in increasing size; each gets share = (budget left) / (modules
    left), capped at ``max_block``. One whose out*in fits is stored exactly; otherwise
    k_in = min(in, isqrt(share)) and k_out = min(out, share // k_in).
    """
    if k is not None:
        return {m.name: ((k, k) if k > 0 else None) for m in modules}
    plan: Plan = {}
    left, todo = budget, sorted(modules, key=lambda m: (m.out_features * m.in_features, m.name))
    for i, m in enumerate(todo):
        share = min(max_block, left // (len(todo) - i))
        if m.out_features * m.in_features <= share:
            plan[m.name] = None
            left -= m.out_features * m.in_features
            continue
        k_in = max(1, min(m.in_features, math.isqrt(max(share, 1))))
        k_out = max(1, min(m.out_features, share // k_in))
        plan[m.name] = (k_out, k_in)
        left -= k_out * k_in
    return {m.name: plan[m.name] for m in modules}


def plan_dims(modules: list[TrackedModule], plan: Plan) -> list[int]:
    """Fingerprint dims of each module under a plan, in module order."""
    out = []
    for m in modules:
        sizes = plan[m.name]
        out.append(m.out_features * m.in_features if sizes is None else sizes[0] * sizes[1])
    return out


def make_projections(
    seed: int, modules: list[TrackedModule], plan: Plan
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Projection pairs of the projected modules keyed by name (exact modules have none)."""
    out = {}
    for m in modules:
        sizes = plan[m.name]
        if sizes is not None:
            out[m.name] = projection_pair(seed, m, sizes[0], sizes[1])
    return out


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """The logical right shift of int64 bits (torch's is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function of int64 states (Steele et al. 2014), on any device:
    int64 products wrap modulo 2^64, as the generator's unsigned arithmetic does."""
    z = x ^ _shr(x, 30)
    z.mul_(_signed(_MIX1))
    z ^= _shr(z, 27)
    z.mul_(_signed(_MIX2))
    z ^= _shr(z, 31)
    return z


def sketch_hash(
    seed: int,
    module: TrackedModule,
    dims: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CountSketch of one module (``projection: sketch``): entry i of the row-major
    vec(G~_W) [out*in] goes to bucket ``idx[i]`` of the module's ``dims`` with sign ``sign[i]``.

    Counter-based: entry i's 64 bits are SplitMix64 of the state key + (i + 1) * golden, the
    key drawn from (seed, module name) like ``projection_pair``'s seed; the bucket is the low
    63 bits modulo ``dims``, the sign the top bit. Nothing needs storing: any device makes
    the same hash, at once and where it is used (``encoder.families.sketch`` keeps it only on
    the CPU). phi = S vec(G~) is unbiased for inner products, E <S x, S y> = <x, y>, with
    variance (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / dims (Charikar et al. 2002;
    Weinberger et al. 2009): a dense Gaussian projection's, whatever the rank of G~, where a
    Kronecker pair's grows with 1 / k of each side for a low-rank G~.

    Returns:
        idx: [out*in] int64 in [0, dims); sign: [out*in] int8, +-1.
    """
    key = module_seed(seed, f"sketch:{module.name}")
    n = module.out_features * module.in_features
    state = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    state.mul_(_signed(_GOLDEN)).add_(key)
    h = splitmix64(state)
    sign = (1 - 2 * (h < 0).to(torch.int8)).to(torch.int8)
    idx = (h & ((1 << 63) - 1)).remainder_(dims)
    return idx, sign
