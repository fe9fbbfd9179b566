"""A data-fitted Kronecker basis for the projection (``FingerprintConfig.projection = "pca"``).

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


def basis_bytes(modules: list[TrackedModule], plan: Plan) -> int:
    """Host memory of ``BasisStatistics.empty(modules, plan)``: float64 C_out and C_in of
    every projected module's sides up to ``MAX_SIDE``."""
    sides = [n for m in modules if plan[m.name] is not None for n in (m.out_features, m.in_features)]
    return sum(8 * n * n for n in sides if n <= MAX_SIDE)


def save_projections(projections: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """(A, B) per module as ``{name}.A`` / ``{name}.B`` float32 tensors (safetensors)."""
    tensors = {}
    for name, (a, b) in projections.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = (
            a.float().cpu().contiguous(),
            b.float().cpu().contiguous(),
        )
    save_tensors(tensors, path)  # atomic


def load_projections(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of ``save_projections``.

    Raises:
        ArtifactError: an A without its B, or the reverse.
    """
    saved = load_file(str(path))
    names = {key.rsplit(".", 1)[0] for key in saved}
    if any(f"{n}.A" not in saved or f"{n}.B" not in saved for n in names):
        raise ArtifactError(
            f"{path} holds an A without its B (or the reverse)", code="manifest_mismatch"
        )
    return {n: (saved[f"{n}.A"], saved[f"{n}.B"]) for n in names}


def top_eigenvectors(c: torch.Tensor, k: int) -> torch.Tensor:
    """[k, n] float32: the eigenvectors of the symmetric c [n, n] with the k largest
    eigenvalues, largest first, each signed so that its largest-magnitude entry is positive."""
    _, vecs = torch.linalg.eigh(c.double())
    top = vecs[:, -k:].flip(1).T
    signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
    basis: torch.Tensor = (top * torch.where(signs == 0, 1.0, signs)).float().contiguous()
    return basis
