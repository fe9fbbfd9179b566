"""How far a score could move under another projection: a per-result standard deviation.

Each module's block of a fingerprint is projected by its own independent Kronecker pair
(A: k1 x out, B: k2 x in, Gaussian N(0, 1/k) entries), so a score s = sum_W <X_W, Y_W> is a
sum of independent per-module estimates. For one module with unprojected X, Y (out x in),
with M = A^T A and N = B^T B (independent Wishart matrices), <A X B^T, A Y B^T> is unbiased
for <X, Y> with variance (derived from E[M_ab M_cd] = d_ab d_cd + (d_ac d_bd + d_ad d_bc)/k):

    Var = (||X Y^T||^2 + tr((X Y^T)^2)) / k1 + (||X^T Y||^2 + tr((X^T Y)^2)) / k2
          + (||X||^2 ||Y||^2 + ||X Y^T||^2 + ||X^T Y||^2 + <X, Y>^2) / (k1 k2).

The unprojected X, Y are not stored, so the projected blocks (k1 x k2) stand in for them
(a plug-in estimate), and the unit-norm fingerprints' blocks are used as they are. Modules
stored exactly contribute nothing. The standard deviation of the difference between this
projection's score and another's is sqrt(2) times this one. Whitening is not modelled (R
changes with the projection too), so only hessian-none indexes report it (a ``sketch`` hashes the
fixed whitened gradient: ``sketch_score_variance``); the calibration
test (tests/encoder/test_uncertainty.py) measures the stated against the observed coverage
for hessian none.
"""

from __future__ import annotations

import torch


def _sq(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||m||_F^2 and tr(m^2) of a batch of square matrices [n, k, k]."""
    return m.square().sum(dim=(1, 2)), torch.einsum("nij,nji->n", m, m)


def kronecker_variance(x: torch.Tensor, y: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """Var <A X B^T, A Y B^T> over Gaussian A (k1 x out), B (k2 x in) for X, Y [n, out, in]."""
    xyt_f, xyt_tr = _sq(x @ y.transpose(1, 2))  # X Y^T: [n, out, out]
    xty_f, xty_tr = _sq(x.transpose(1, 2) @ y)  # X^T Y: [n, in, in]
    dot = (x * y).sum(dim=(1, 2))
    norms = x.square().sum(dim=(1, 2)) * y.square().sum(dim=(1, 2))
    return (
        (xyt_f + xyt_tr) / k1
        + (xty_f + xty_tr) / k2
        + (norms + xyt_f + xty_f + dot.square()) / (k1 * k2)
    )


def kronecker_score_variance(
    query: torch.Tensor,
    rows: torch.Tensor,
    sizes: list[tuple[int, int] | None],
    block_dims: list[int],
) -> torch.Tensor:
    """Variance of the scores query [d] . rows [n, d] under a fresh draw of Gaussian Kronecker
    pairs; ``sizes`` holds each block's (k1, k2), None for a module kept whole (no variance).
    [n] float64."""
    q, t = query.double(), rows.double()
    out = torch.zeros(t.shape[0], dtype=torch.float64)
    for (start, stop), pair in zip(_spans(block_dims), sizes, strict=True):
        if pair is None:
            continue
        k1, k2 = pair
        x = q[start:stop].view(1, k1, k2).expand(t.shape[0], k1, k2)
        y = t[:, start:stop].reshape(-1, k1, k2)
        norms = x.square().sum(dim=(1, 2)) * y.square().sum(dim=(1, 2))
        # The projected ||X Y^T||^2 and ||X^T Y||^2 exceed the unprojected ones by about
        # ||X||^2 ||Y||^2 / k2 and / k1 in expectation (same Wishart moments): removed.
        out += (kronecker_variance(x, y, k1, k2) - 2 * norms / (k1 * k2)).clamp_min(0)
    return out


def sketch_score_variance(
    query: torch.Tensor, rows: torch.Tensor, hashed: list[bool], block_dims: list[int]
) -> torch.Tensor:
    """Variance of the scores query [d] . rows [n, d] under a fresh CountSketch of the blocks
    marked ``hashed``: per block (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / d_W, of
    which the last term (unknown from the sketch, small for spread-out gradients) is dropped.
    The sums run in float32 (relative error ~ sqrt(d_W) 2^-24, far below the estimate's own
    spread; no float64 copy of the rows), the terms are combined in float64. [n] float64."""
    q, t = query.float(), rows.float()
    out = torch.zeros(t.shape[0], dtype=torch.float64)
    for (start, stop), on in zip(_spans(block_dims), hashed, strict=True):
        if on:
            x, y = q[start:stop], t[:, start:stop]
            norms = torch.einsum("nd,nd->n", y, y).double() * float(x @ x)
            out += (norms + (y @ x).double().square()) / (stop - start)
    return out


def _spans(block_dims: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for dim in block_dims:
        out.append((start, start + dim))
        start += dim
    return out
