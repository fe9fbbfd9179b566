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
changes with the projection too), so only hessian-none indexes report it (kfac's whitening is
fixed before the projection: ``kfac_random_plan``; ``sketch`` hashes the fixed whitened gradient:
``score_variance(sketch=True)``); the calibration
test (tests/encoder/test_uncertainty.py) measures the stated against the observed coverage
for hessian none.
"""

from __future__ import annotations

import torch

from encoder.modules import TrackedModule
from encoder.projection import Plan


def _sq(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||m||_F^2 and tr(m^2) of a batch of square matrices [n, k, k]."""
    return m.square().sum(dim=(1, 2)), torch.einsum("nij,nji->n", m, m)


def kronecker_variance(x: torch.Tensor, y: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """Var <A X B^T, A Y B^T> over Gaussian A (k1 x out), B (k2 x in) for X, Y [n, out, in]."""
    xyt_f, xyt_tr = _sq(x @ y.transpose(1, 2))  # X Y^T: [n, out, out]
    xty_f, xty_tr = _sq(x.transpose(1, 2) @ y)  # X^T Y: [n, in, in]
    dot = (x * y).sum(dim=(1, 2))
    norms = x.square().sum(dim=(1, 2)) * y.square().sum(dim=(1, 2))
    return (xyt_f + xyt_tr) / k1 + (xty_f + xty_tr) / k2 + (norms + xyt_f + xty_f + dot.square()) / (k1 * k2)


def score_variance(
    query: torch.Tensor, rows: torch.Tensor, plan: Plan, block_dims: list[int], sketch: bool = False
) -> torch.Tensor:
    """Variance of the scores query . rows under a fresh projection draw.

    Args:
        query: [d] fingerprint.
        rows: [n, d] fingerprints.
        plan: the encoder's plan (module name -> (k1, k2) or None), in fingerprint order.
        block_dims: the encoder's block dims, in the same order.
        sketch: the blocks are CountSketches (``projection: sketch``), not Kronecker pairs:
            per block (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / d_W, of which the
            last term (unknown from the sketch, small for spread-out gradients) is dropped.
    Returns:
        [n] float64 variances.
    """
    q = query.double()
    t = rows.double()
    out = torch.zeros(t.shape[0], dtype=torch.float64)
    start = 0
    for sizes, dim in zip(plan.values(), block_dims, strict=True):
        stop = start + dim
        if sizes is not None and sketch:
            x, y = q[start:stop], t[:, start:stop]
            out += (x.square().sum() * y.square().sum(dim=1) + (y @ x).square()) / dim
        elif sizes is not None:
            k1, k2 = sizes
            x = q[start:stop].view(1, k1, k2).expand(t.shape[0], k1, k2)
            y = t[:, start:stop].reshape(-1, k1, k2)
            norms = x.square().sum(dim=(1, 2)) * y.square().sum(dim=(1, 2))
            # The projected ||X Y^T||^2 and ||X^T Y||^2 exceed the unprojected ones by about
            # ||X||^2 ||Y||^2 / k2 and / k1 in expectation (same Wishart moments): removed.
            out += (kronecker_variance(x, y, k1, k2) - 2 * norms / (k1 * k2)).clamp_min(0)
        start = stop
    return out


def kfac_random_plan(modules: list[TrackedModule], plan: Plan) -> Plan | None:
    """The random part of a kfac plan: phi_W = G_A (W_out X W_in^T) G_B^T is a Gaussian
    Kronecker projection of the fixed whitened gradient, so the variance above holds with
    the whitened X; a module kept whole on both sides (no Gaussian) is exact (None). None
    when some module is kept whole on one side only, which the variance does not model."""
    out: Plan = {}
    for m in modules:
        sizes = plan[m.name]
        whole = (True, True) if sizes is None else (sizes[0] == m.out_features, sizes[1] == m.in_features)
        if whole[0] != whole[1]:
            return None
        out[m.name] = None if whole[0] else sizes
    return out


def sketch_random_plan(modules: list[TrackedModule], plan: Plan) -> Plan:
    """The random part of a sketch plan: a module kept whole (plan = (out, in)) is exact."""
    return {m.name: None if plan[m.name] in (None, (m.out_features, m.in_features)) else plan[m.name] for m in modules}


def random_plan(modules: list[TrackedModule], plan: Plan, projection: str) -> Plan | None:
    """The plan whose projected blocks vary with the seed, for ``score_variance``."""
    if projection == "kfac":
        return kfac_random_plan(modules, plan)
    if projection == "sketch":
        return sketch_random_plan(modules, plan)
    return plan


def score_sd(
    query: torch.Tensor, rows: torch.Tensor, plan: Plan, block_dims: list[int], sketch: bool = False
) -> torch.Tensor:
    """Standard deviation of each score under a fresh projection draw; [n] float64."""
    return score_variance(query, rows, plan, block_dims, sketch).clamp_min(0).sqrt()
