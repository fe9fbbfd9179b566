"""Data-fitted Kronecker projections: ``projection: pca`` (a basis) and ``kfac`` (a whitening).

phi_W = A_W G~_W B_W^T as in ``encoder.projection``, but with A_W the top k_out eigenvectors
of C_out = sum_n G~_n G~_n^T and B_W the top k_in eigenvectors of C_in = sum_n G~_n^T G~_n,
summed over a sample of training sequences' corrected gradients (the Kronecker eigenbasis
of EK-FAC, George et al. 2018; LoGra initializes its projection by PCA likewise, Choe et al.
2024).
Most of the gradient's energy lies in few directions, so keeping them approximates the
unprojected inner product better than a random projection of the same size, and no seed
enters (benchmarks/results/bench_fidelity.md). It drops the low-variance directions that
tell passages apart, though, and attributes worse (eval_freedict_pca.md), so it is an
option, not the default.

``kfac`` keeps the seeded Gaussian matrices and multiplies them by the inverse square roots
of the same C_out / C_in (``BasisStatistics.kfac_roots``, ``kfac_pairs``): the Kronecker-factored
R_train of K-FAC, applied before the projection, so every one of a module's out*in
directions is whitened, not only the d_W the projected R sees. It is the default: it
attributes best (benchmarks/results/eval_freedict.md, eval_demo.md, rows ``kfac``).

A side longer than ``MAX_SIDE`` keeps its Gaussian matrix (its C would not fit in memory);
the sums take sum(side^2) x 8 bytes (GPT-2 small: 2.6 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from encoder.errors import ArtifactError, ConfigError
from encoder.modules import TrackedModule
from encoder.projection import Plan, projection_pair
from encoder.tensor_files import save_tensors

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name -> (A, B), or (W_out, W_in) for a whitening."""

MAX_SIDE = 4096
"""Longest side with a fitted basis: its float64 C takes 128 MiB; a longer one stays Gaussian."""


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

    def projections(
        self, modules: list[TrackedModule], plan: Plan, seed: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) float32 per projected module: orthonormal rows, the top eigenvectors (in
        decreasing eigenvalue, each signed so its largest entry is positive), or the seeded
        Gaussian matrix for a side not fitted."""
        if self.count == 0:
            raise ConfigError("no sequences to fit the projection basis from")
        out = {}
        for m in modules:
            sizes = plan[m.name]
            if sizes is None:
                continue
            gauss_a, gauss_b = projection_pair(seed, m, *sizes)
            c_out, c_in = self.sums[m.name]
            a = gauss_a if c_out is None else top_eigenvectors(c_out, sizes[0])
            b = gauss_b if c_in is None else top_eigenvectors(c_in, sizes[1])
            out[m.name] = (a, b)
        return out

    def kfac_roots(self, modules: list[TrackedModule], delta: float) -> Pairs:
        """The K-FAC whitening (W_out, W_in) of every module for ``projection: kfac``:
        W_out = s L_out [out, out], W_in = L_in [in, in], so phi_W = G_A W_out G~ W_in^T G_B^T.

        L = (C / n + delta mean_eig I)^-1/2 of each fitted side (``whitening_root``).
        s = sqrt(tr C / n) undoes the Kronecker split's scale (tr(C_out (x) C_in) = (tr C)^2
        against tr R = tr C), so a module's whitened gradient has covariance ~I like a full
        R^-1/2 and the modules keep their relative weight; with one side fitted, s = sqrt(the
        other side), the same energy per dim. A side not fitted (``MAX_SIDE``) is s I, held
        as the [1] tensor s (``whole_side``); a module not fitted at all stays unwhitened.
        """
        if self.count == 0:
            raise ConfigError("no sequences to fit the K-FAC whitening from")
        out: Pairs = {}
        for m in modules:
            if m.name not in self.sums:
                raise ConfigError(f"{m.name} has no projection pair in the plan (kfac gives every module one)")
            c_out, c_in = self.sums[m.name]
            if c_out is not None and c_in is not None:
                scale = float(c_out.trace() / self.count) ** 0.5
            elif c_out is not None or c_in is not None:
                scale = float(m.in_features if c_in is None else m.out_features) ** 0.5
            else:
                scale = 1.0
            w_out = torch.tensor([scale]) if c_out is None else whitening_root(c_out / self.count, delta) * scale
            w_in = torch.ones(1) if c_in is None else whitening_root(c_in / self.count, delta)
            out[m.name] = (w_out.contiguous(), w_in.contiguous())
        return out


def whole_side(w: torch.Tensor, n: int) -> torch.Tensor:
    """A whitening side as its [n, n] matrix (a [1] tensor s stands for s I)."""
    return torch.eye(n, dtype=w.dtype, device=w.device) * w if w.numel() == 1 else w


def kfac_pairs(roots: Pairs, modules: list[TrackedModule], plan: Plan, seed: int) -> Pairs:
    """(A, B) = (G_A W_out, G_B W_in) per module from ``BasisStatistics.kfac_roots``, G the
    seeded Gaussian matrices of the plan's sizes; a side kept whole (k = side) is W alone."""
    out: Pairs = {}
    for m in modules:
        sizes = plan[m.name]
        if sizes is None:
            raise ConfigError(f"{m.name} has no projection pair in the plan (kfac gives every module one)")
        gauss = projection_pair(seed, m, *sizes)
        sides = []
        for g, w, k, n in zip(gauss, roots[m.name], sizes, (m.out_features, m.in_features), strict=True):
            if k == n:
                sides.append(whole_side(w, n).float().clone())  # its own storage: saved next to W
            else:
                sides.append((g * w if w.numel() == 1 else g @ w.float()).contiguous())
        out[m.name] = (sides[0], sides[1])
    return out


def whitening_root(c: torch.Tensor, delta: float) -> torch.Tensor:
    """(c + delta * mean_eig(c) * I)^-1/2 [n, n] float32 of the symmetric PSD c (float64
    eigendecomposition; eigenvalues below 0 from rounding count as 0)."""
    w, v = torch.linalg.eigh(c.double())
    w = w.clamp_min(0.0)
    w = w + delta * float(w.mean())
    tiny = torch.finfo(torch.float64).tiny
    root: torch.Tensor = ((v * w.clamp_min(tiny).rsqrt()) @ v.T).float()
    return root


def basis_bytes(modules: list[TrackedModule], plan: Plan) -> int:
    """Host memory of ``BasisStatistics.empty(modules, plan)``: float64 C_out and C_in of
    every projected module's sides up to ``MAX_SIDE``."""
    sides = [n for m in modules if plan[m.name] is not None for n in (m.out_features, m.in_features)]
    return sum(8 * n * n for n in sides if n <= MAX_SIDE)


def save_projections(
    projections: Pairs, path: Path, roots: Pairs | None = None, metadata: dict[str, str] | None = None
) -> None:
    """(A, B) per module as ``{name}.A`` / ``{name}.B`` float32 tensors (safetensors), and a
    kfac whitening's (W_out, W_in) as ``{name}.W_out`` / ``{name}.W_in``; ``metadata`` goes
    in the header (an index records the config it was fitted with: ``tensor_files.fitted_with``)."""
    tensors = {}
    for suffixes, pairs in ((("A", "B"), projections), (("W_out", "W_in"), roots or {})):
        for name, pair in pairs.items():
            for suffix, t in zip(suffixes, pair, strict=True):
                tensors[f"{name}.{suffix}"] = t.float().cpu().contiguous()
    save_tensors(tensors, path, metadata=metadata)  # atomic


def _pairs(saved: dict[str, torch.Tensor], path: Path, first: str, second: str) -> Pairs:
    names = {key.rsplit(".", 1)[0] for key in saved if key.rsplit(".", 1)[1] in (first, second)}
    if any(f"{n}.{first}" not in saved or f"{n}.{second}" not in saved for n in names):
        raise ArtifactError(
            f"{path} holds an {first} without its {second} (or the reverse)", code="manifest_mismatch"
        )
    return {n: (saved[f"{n}.{first}"], saved[f"{n}.{second}"]) for n in names}


def load_fitted(path: Path) -> tuple[Pairs, Pairs | None]:
    """The (A, B) pairs and the kfac whitening (None if the file holds none) that
    ``save_projections`` wrote, from one read of the file.

    Raises:
        ArtifactError: an A without its B, a W_out without its W_in, or the reverse.
    """
    saved = load_file(str(path))
    return _pairs(saved, path, "A", "B"), _pairs(saved, path, "W_out", "W_in") or None


def load_projections(path: Path) -> Pairs:
    """The (A, B) pairs ``save_projections`` wrote (``load_fitted`` without the whitening)."""
    return load_fitted(path)[0]


def top_eigenvectors(c: torch.Tensor, k: int) -> torch.Tensor:
    """[k, n] float32: the eigenvectors of the symmetric c [n, n] with the k largest
    eigenvalues, largest first, each signed so that its largest-magnitude entry is positive."""
    _, vecs = torch.linalg.eigh(c.double())
    top = vecs[:, -k:].flip(1).T
    signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
    basis: torch.Tensor = (top * torch.where(signs == 0, 1.0, signs)).float().contiguous()
    return basis
