"""Float tolerances derived from the operands and the arithmetic, never a bare atol.

The bounds are the standard forward-error bounds of floating-point summation (Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., section 3.1): a dot product of
length n computed in precision u in any order satisfies
    |fl(a . b) - a . b| <= gamma_n * sum_k |a_k b_k|,   gamma_n = n u / (1 - n u).
Two computations of the same products in different orders (BLAS blocking, FAISS vs numpy,
blocked vs whole) therefore differ by at most 2 gamma_n sum_k |a_k b_k|.
"""

from __future__ import annotations

import numpy as np
import torch

UNIT_ROUNDOFF = {
    np.dtype(np.float16): 2.0**-11,
    np.dtype(np.float32): 2.0**-24,
    np.dtype(np.float64): 2.0**-53,
}


def unit_roundoff(dtype) -> float:
    """u of a numpy or torch float dtype (half the machine epsilon)."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) / 2
    return UNIT_ROUNDOFF[np.dtype(dtype)]


def gamma(n: int, dtype=np.float32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term sum."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"{n} terms exceed what precision {dtype} bounds"
    return nu / (1 - nu)


def _float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _abs64(x) -> np.ndarray:
    return np.abs(_float64(x))


def abs_products(a, b) -> np.ndarray:
    """sum_k |a_ik| |b_jk| for rows a [Q, d] and b [N, d] -> [Q, N] (float64)."""
    return _abs64(a) @ _abs64(b).T


def dot_bound(a, b, dtype=np.float32, *, orders: int = 2) -> np.ndarray:
    """Largest |difference| between two computations of a @ b.T in precision ``dtype``.

    Args:
        a: [Q, d] rows, b: [N, d] rows (the operands as the computation sees them).
        dtype: the precision the products are accumulated in.
        orders: 2 when both sides are rounded sums in different orders, 1 when one side
            is exact (a float64 reference of float32 operands).
    Returns:
        [Q, N] bound per element.
    """
    d = np.asarray(a).shape[-1] if not isinstance(a, torch.Tensor) else a.shape[-1]
    return orders * gamma(int(d), dtype) * abs_products(a, b)


def storage_bound(a, b, stored_dtype=np.float16) -> np.ndarray:
    """|a @ b.T - a @ round(b).T| when b is stored rounded to ``stored_dtype``: each entry
    moves by at most its ``rounding_bound``, so the product by sum_k |a_k| rounding_bound(b_k)."""
    return _abs64(a) @ rounding_bound(b, stored_dtype).T


def assert_within(got, want, bound, what: str = "values") -> None:
    """|got - want| <= bound elementwise (all broadcast), with the worst ratio in the message."""
    got, want = _float64(got), _float64(want)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), got.shape)
    err = np.abs(got - want)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(
            int(np.argmax(np.where(bound > 0, err / np.maximum(bound, 1e-300), np.inf))), err.shape
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} differ beyond their bound; worst at {i}: "
            f"|{got[i]:.9g} - {want[i]:.9g}| = {err[i]:.3g} > {bound[i]:.3g}"
        )


def rounding_bound(x, stored_dtype=np.float16) -> np.ndarray:
    """|round(x) - x| elementwise when x is stored as ``stored_dtype``: u |x| for normal
    numbers, half the subnormal spacing below the smallest normal."""
    info = np.finfo(stored_dtype)
    return unit_roundoff(stored_dtype) * _abs64(x) + float(info.smallest_subnormal) / 2


def recompute_bound(dtype=np.float32, stages: int = 256) -> float:
    """|e . x - e' . x| for unit vectors x when the unit fingerprint e is recomputed as e' in
    ``dtype`` through the model in another batch shape (or precision path): each chained
    reduction of the forward and backward passes (2 blocks x (attention, MLP, norms) each
    way on the test models, softmax and norms in float32 whatever the weights) moves e by
    O(u) relatively; ``stages`` x u bounds the chain with margin, and |x| = 1 carries it to
    the score (Cauchy-Schwarz)."""
    return stages * unit_roundoff(dtype)


FLOAT16_SCORE = UNIT_ROUNDOFF[np.dtype(np.float16)]
"""|q . x - q . round16(x)| <= u16 sum_k |q_k x_k| <= u16 for unit q and x: a score against a
float16-stored fingerprint."""


def gamma_probabilistic(n: int, dtype=np.float32, lam: float = 1.0) -> float:
    """lam sqrt(n) u: the bound that holds with probability >= 1 - 2 exp(-lam^2 / 2) (1 -
    3e-4 at lam = 4) for an n-term sum with independent rounding errors (Higham and Mary,
    "A new approach to probabilistic rounding error analysis", SISC 2019); gamma_n is the
    worst case, far looser for long sums."""
    return lam * np.sqrt(n) * unit_roundoff(dtype)
