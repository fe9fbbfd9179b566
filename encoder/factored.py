"""The factored fast path (DESIGN.md, last paragraph of "The fingerprint, exactly").

The exact correction G~_W = G_W * S_W with S_W = 1 / (sqrt(v_hat_W) + eps) ([out, in])
breaks the outer-product structure of G_W = sum_t g_t a_t^T, so the exact path must form
every example's G_W. Replacing S_W by a rank-1 matrix r c^T (r [out], c [in]) restores it:

    A (G o r c^T) B^T = A diag(r) G diag(c) B^T = sum_t (A' g_t)(B' a_t)^T,
    A' = A diag(r)  [k, out],   B' = B diag(c)  [k, in],

so phi_W comes from the per-token activations a_t and output gradients g_t with two thin
projections and a [k, T] x [T, k] product per example, without any [out, in] tensor.

Choice of r, c (Adafactor, Shazeer & Stern 2018, Sec. 3): Adafactor approximates a
non-negative second-moment matrix V by its row sums R and column sums C as
V ~ R C^T / sum(R), the rank-1 matrix that minimizes the generalized KL divergence to V.
We apply it to D = (sqrt(v_hat) + eps)^2, the square of the denominator the optimizer
actually divides by, not to v_hat itself:
- D keeps eps, so rows/columns of never-updated weights (v_hat = 0) stay finite;
- when the correction S is exactly rank-1, D = 1 / (r c^T)^2 is rank-1 and Adafactor
  recovers it exactly, so the factored phi equals the exact phi (tested);
- for eps -> 0 it is Adafactor on v_hat, i.e. what an Adafactor optimizer would apply.
Then S ~ 1 / sqrt(R C^T / sum R) = r c^T with r = 1 / sqrt(R), c = sqrt(sum R) / sqrt(C).
How well this preserves influence rankings is measured against the exact path
(benchmarks/bench_encode.py, tests/encoder/test_factored.py), never assumed.
"""

from __future__ import annotations

import torch


def rank1_correction(v_hat: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 factors of the optimizer correction 1 / (sqrt(v_hat) + eps).

    Args:
        v_hat: [out, in] bias-corrected second moments (>= 0), [out, in] orientation.
        eps: the optimizer's epsilon.
    Returns:
        r [out], c [in] (dtype of v_hat, computed in float64) with
        r c^T ~ 1 / (sqrt(v_hat) + eps), exact when the right-hand side is rank-1.
    """
    denom_sq = (v_hat.double().clamp_min(0).sqrt() + eps).square()  # D [out, in]
    row = denom_sq.sum(dim=1)  # R [out]
    col = denom_sq.sum(dim=0)  # C [in]
    r = row.rsqrt()
    c = (row.sum() / col).sqrt()
    return r.to(v_hat.dtype), c.to(v_hat.dtype)


def fold_projections(
    a_mat: torch.Tensor, b_mat: torch.Tensor, r: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the rank-1 correction into the projections.

    Args:
        a_mat: A [k, out]; b_mat: B [k, in]; r: [out]; c: [in].
    Returns:
        A' = A diag(r) [k, out], B' = B diag(c) [k, in], in the dtype of a_mat.
    """
    return (a_mat * r.to(a_mat.dtype)).contiguous(), (b_mat * c.to(b_mat.dtype)).contiguous()


def factored_phi(
    acts: torch.Tensor, grads: torch.Tensor, a_folded: torch.Tensor, b_folded: torch.Tensor
) -> torch.Tensor:
    """phi_W = sum_t (A' g_t)(B' a_t)^T per example, without forming any [out, in] gradient.

    Also the exact phi of the uncorrected gradient when A', B' are the plain projections.

    Args:
        acts: [B, T, in] module inputs (zero at padding).
        grads: [B, T, out] gradients of the summed loss w.r.t. the module outputs.
        a_folded: A' [k, out]; b_folded: B' [k, in].
    Returns:
        phi_W [B, k*k] (row-major vec of the [k, k] matrix A' G B'^T).
    """
    left = grads @ a_folded.T  # [B, T, k]
    right = acts @ b_folded.T  # [B, T, k]
    return torch.bmm(left.transpose(1, 2), right).flatten(1)
