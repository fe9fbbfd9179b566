"""The side covariances the sketch's K-FAC whitening is fitted from (``encoder.families.sketch``).

C_out = sum_n G~_n G~_n^T and C_in = sum_n G~_n^T G~_n of each module, summed over a sample
of training sequences' corrected gradients (the Kronecker factors of K-FAC / EK-FAC, George
et al. 2018), give W_out = s (C_out / n + delta mean_eig I)^-1/2 and W_in likewise
(``BasisStatistics.kfac_roots``): every one of a module's out*in directions is whitened
before the sketch, where a projected R sees only the d_W it keeps.

A side longer than ``MAX_SIDE`` stays unwhitened (its C would not fit in memory); the sums
take sum(side^2) x 8 bytes (GPT-2 small: 2.6 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from api.errors import ConfigError
from encoder.modules import TrackedModule
from encoder.projection import Plan
from encoder.whitening import inverse_sqrt

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name -> (A, B), or (W_out, W_in) for a whitening."""

MAX_SIDE = 4096
"""Longest side with a fitted basis: its float64 C takes 128 MiB; a longer one stays unwhitened."""


@dataclass
class BasisStatistics:
    """Running C_out / C_in sums per projected module (float64, CPU); None: side not fitted.

    Args:
        sums: module name -> (C_out [out, out] or None, C_in [in, in] or None).
        count: sequences summed.
    """

    sums: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)
    count: int = 0

    @classmethod
    def empty(cls, modules: list[TrackedModule], plan: Plan) -> BasisStatistics:
        def side(n: int) -> torch.Tensor | None:
            return torch.zeros(n, n, dtype=torch.float64) if n <= MAX_SIDE else None

        return cls(
            {
                m.name: (side(m.out_features), side(m.in_features))
                for m in modules
                if plan[m.name] is not None
            }
        )

    def add(self, name: str, g: torch.Tensor) -> None:
        """Add the corrected gradients g [B, out, in] of one module."""
        c_out, c_in = self.sums[name]
        if c_out is not None:
            c_out += torch.einsum("boi,bki->ok", g, g).double().cpu()
        if c_in is not None:
            c_in += torch.einsum("boi,bok->ik", g, g).double().cpu()

    def factors_pay(self, name: str, t: int, n_out: int, n_in: int) -> bool:
        """Whether ``add_factors`` costs less than forming the gradients for ``add``: per
        example of T tokens, T^2 (in + out) + T out^2 and T^2 (out + in) + T in^2
        multiply-adds (each fitted side) against out in T, plus out^2 in and out in^2,
        through G (a sequence longer than its module's sides forms G)."""
        c_out, c_in = self.sums[name]
        shared = 2 * t * t * (n_out + n_in)
        factors = (shared + t * n_out * n_out if c_out is not None else 0) + (
            shared + t * n_in * n_in if c_in is not None else 0
        )
        whole = (
            n_out
            * n_in
            * (t + (n_out if c_out is not None else 0) + (n_in if c_in is not None else 0))
        )
        return factors < whole

    def add_factors(self, name: str, acts: torch.Tensor, grads: torch.Tensor) -> None:
        """Add the uncorrected gradients G_b = sum_t g_t a_t^T of one module from their token
        factors, acts [B, T, in] and grads [B, T, out] (padding zeroed), without forming G:
        G G^T = g^T (a a^T) g and G^T G = a^T (g g^T) a (``factors_pay`` says when that is
        cheaper)."""
        c_out, c_in = self.sums[name]
        for c, x, y in ((c_out, grads, acts), (c_in, acts, grads)):
            if c is not None:
                # sum_b x_b^T (y_b y_b^T) x_b as one [n, B T] x [B T, n] product.
                m = (y @ y.transpose(1, 2)) @ x
                c += (x.reshape(-1, x.shape[-1]).T @ m.reshape(-1, x.shape[-1])).double().cpu()

    def kfac_roots(
        self, modules: list[TrackedModule], delta: float, device: torch.device | None = None
    ) -> Pairs:
        """The K-FAC whitening (W_out, W_in) of every module: W_out = s L_out [out, out],
        W_in = L_in [in, in], so the whitened gradient is W_out G~ W_in.

        L = (C / n + delta mean_eig I)^-1/2 of each fitted side (``whitening.inverse_sqrt``).
        s = sqrt(tr C / n) undoes the Kronecker split's scale (tr(C_out (x) C_in) = (tr C)^2
        against tr R = tr C), so a module's whitened gradient has covariance ~I like a full
        R^-1/2 and the modules keep their relative weight; with one side fitted, s = sqrt(the
        other side), the same energy per dim. A side not fitted (``MAX_SIDE``) is s I, held
        as the [1] tensor s (never made dense); a module not fitted at all stays unwhitened.
        The eigendecompositions run on ``device`` (an accelerator's, one side at a time; the
        sums stay on the host), in float64 either way; the roots come back to the host.
        """

        def root(c: torch.Tensor) -> torch.Tensor:
            return inverse_sqrt((c / self.count).to(device), delta).float().cpu()

        if self.count == 0:
            raise ConfigError("no sequences to fit the K-FAC whitening from")
        out: Pairs = {}
        for m in modules:
            if m.name not in self.sums:
                raise ConfigError(f"{m.name} has no side sums (the sketch whitens every module)")
            c_out, c_in = self.sums[m.name]
            if c_out is not None and c_in is not None:
                scale = float(c_out.trace() / self.count) ** 0.5
            elif c_out is not None or c_in is not None:
                scale = float(m.in_features if c_in is None else m.out_features) ** 0.5
            else:
                scale = 1.0
            w_out = torch.tensor([scale]) if c_out is None else root(c_out) * scale
            w_in = torch.ones(1) if c_in is None else root(c_in)
            out[m.name] = (w_out.contiguous(), w_in.contiguous())
        return out


def basis_bytes(modules: list[TrackedModule], plan: Plan) -> int:
    """Host memory of ``BasisStatistics.empty(modules, plan)``: float64 C_out and C_in of
    every projected module's sides up to ``MAX_SIDE``."""
    sides = [
        n for m in modules if plan[m.name] is not None for n in (m.out_features, m.in_features)
    ]
    return sum(8 * n * n for n in sides if n <= MAX_SIDE)
