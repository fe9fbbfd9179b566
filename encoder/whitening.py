"""Hessian approximation R and whitening R^-1/2 (DESIGN.md step 4, paper Sec. 3).

R is block-diagonal, one d_W x d_W block per tracked module:
    R_train = (1/N) sum_i phi_i phi_i^T over training sequences,
    R_eval  likewise over a query sample,
    R = lambda R_eval + (1 - lambda) R_train.
``RStatistics`` accumulates the sums in float64 batch by batch; two of them merge by adding
sums and counts, so workers can each take a share of the data. ``Whitener`` turns them into
damped inverse square roots (R + delta * mean_eig(R) I)^-1/2 per block.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from api.errors import ArtifactError, ConfigError
from encoder.tensor_files import save_tensors

log = logging.getLogger(__name__)

MAX_BLOCK_DIM = 16384
"""A larger block's d x d float64 statistics (> 2 GiB) are refused: use a projection."""


class RStatistics:
    """Streaming second-moment statistics of projected gradients, per module block.

    Args:
        names: module names, one per block, in fingerprint order.
        block_dims: d_W of each block; sum(block_dims) = d.
    """

    def __init__(self, names: list[str], block_dims: list[int]):
        if len(names) != len(block_dims):
            raise ConfigError("one block dim per module name is needed")
        too_big = [(n, d) for n, d in zip(names, block_dims, strict=True) if d > MAX_BLOCK_DIM]
        if too_big:
            raise ConfigError(
                f"Hessian blocks of {too_big[0][1]} dims ({too_big[0][0]}) exceed "
                f"{MAX_BLOCK_DIM}; use a projection (k > 0) or hessian 'none'"
            )
        self.names = list(names)
        self.block_dims = list(block_dims)
        self.sums = [torch.zeros(d, d, dtype=torch.float64) for d in block_dims]
        self.count = 0

    def blocks(self, phi: torch.Tensor) -> list[torch.Tensor]:
        """Split [B, d] into per-module [B, d_W] views."""
        return list(torch.split(phi, self.block_dims, dim=-1))

    def update(self, phi: torch.Tensor) -> None:
        """Add a batch of projected gradients phi [B, d]."""
        if phi.shape[-1] != sum(self.block_dims):
            raise ConfigError(f"phi has {phi.shape[-1]} dims, expected {sum(self.block_dims)}")
        for s, blk in zip(self.sums, self.blocks(phi), strict=True):
            # float32 products of accelerator tensors are summed in float64 on the host.
            s += (blk.T.double() @ blk.double()).cpu()
        self.count += int(phi.shape[0])

    def merge(self, other: RStatistics) -> RStatistics:
        """Add another worker's statistics (same blocks) into this one; returns self."""
        if other.names != self.names or other.block_dims != self.block_dims:
            raise ConfigError("cannot merge statistics of different module blocks")
        for s, o in zip(self.sums, other.sums, strict=True):
            s += o
        self.count += other.count
        return self

    def means(self) -> list[torch.Tensor]:
        """R blocks: (1/N) sum phi phi^T."""
        if self.count == 0:
            raise ConfigError("no examples were accumulated into the Hessian statistics")
        return [s / self.count for s in self.sums]

    def save(self, path: Path) -> None:
        meta = {
            "names": json.dumps(self.names),
            "block_dims": json.dumps(self.block_dims),
            "count": str(self.count),
        }
        save_tensors({f"sum.{i}": s for i, s in enumerate(self.sums)}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> RStatistics:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            try:
                stats = cls(json.loads(meta["names"]), json.loads(meta["block_dims"]))
            except KeyError as exc:
                raise ArtifactError(f"{path} is not a saved RStatistics file") from exc
            stats.sums = [f.get_tensor(f"sum.{i}") for i in range(len(stats.names))]
            stats.count = int(meta["count"])
        return stats


def choose_lambda(
    r_train: list[torch.Tensor], r_eval: list[torch.Tensor], component: float
) -> float:
    """The mixing weight of paper App. A.1.3.

    Pool the eigenvalues of all blocks, sort each set descending, and take
    lambda = s_train[c] / (s_eval[c] + s_train[c]) at c = component * d, which makes the
    two terms contribute equally at that component.
    """
    return lambda_at(pooled_eigenvalues(r_train), pooled_eigenvalues(r_eval), component)


def pooled_eigenvalues(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The eigenvalues of all blocks of a block-diagonal R, pooled and sorted descending."""
    return torch.sort(torch.cat([torch.linalg.eigvalsh(b) for b in blocks]), descending=True)[0]


def lambda_at(s_train: torch.Tensor, s_eval: torch.Tensor, component: float) -> float:
    """lambda = s_train[c] / (s_eval[c] + s_train[c]) at c = component * d (pooled, sorted)."""
    c = min(max(int(component * s_train.numel()), 0), s_train.numel() - 1)
    t, e = float(s_train[c].clamp_min(0)), float(s_eval[c].clamp_min(0))
    if t + e <= 0:
        raise ConfigError("the lambda rule found zero eigenvalues at its component")
    return t / (t + e)


def inverse_sqrt(r: torch.Tensor, delta: float) -> torch.Tensor:
    """(R + delta * mean_eig(R) I)^-1/2 by a float64 eigendecomposition of the symmetric PSD
    R [d, d] (a projected R block, or a side covariance of the sketch's whitening); float64.
    Eigenvalues below 0 from rounding count as 0; with delta 0 a null direction gets the
    largest finite weight instead of an infinite one.

    Raises:
        ConfigError: R is zero (its module received no gradient).
    """
    evals, evecs = torch.linalg.eigh(r.double())
    evals = evals.clamp_min(0)
    mean = float(evals.mean())
    if mean <= 0:
        raise ConfigError("a Hessian block is zero: its module received no gradient")
    scale = (evals + delta * mean).clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
    inv_sqrt: torch.Tensor = (evecs * scale) @ evecs.T
    return inv_sqrt


@dataclass
class Whitener:
    """Per-block R^-1/2 matrices and the lambda that built them.

    Attributes:
        names: module names in fingerprint order.
        matrices: one [d_W, d_W] float64 symmetric matrix per module.
        lambda_: the mixing weight used (0.0 when R = R_train).
    """

    names: list[str]
    matrices: list[torch.Tensor]
    lambda_: float
    _converted: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_statistics(
        cls,
        train: RStatistics,
        eval_: RStatistics | None,
        *,
        lambda_: float | None,
        lambda_component: float,
        delta: float,
    ) -> Whitener:
        """Build R = lambda R_eval + (1 - lambda) R_train and its damped inverse sqrt.

        Without query statistics R = R_train (lambda reported as 0).
        """
        r_train = train.means()
        if eval_ is None:
            lam = 0.0
            r = r_train
        else:
            r_eval = eval_.means()
            lam = (
                lambda_ if lambda_ is not None else choose_lambda(r_train, r_eval, lambda_component)
            )
            r = [lam * e + (1.0 - lam) * t for t, e in zip(r_train, r_eval, strict=True)]
        log.info("whitening %d blocks, lambda=%.4f, delta=%g", len(r), lam, delta)
        return cls(list(train.names), [inverse_sqrt(b, delta) for b in r], lam)

    def apply(self, phi: torch.Tensor) -> torch.Tensor:
        """R^-1/2 phi for a batch phi [B, d], blockwise; returns phi's dtype and device."""
        mats = self._matrices_like(phi)
        parts = torch.split(phi, [m.shape[0] for m in mats], dim=-1)
        return torch.cat([p @ m for p, m in zip(parts, mats, strict=True)], dim=-1)

    def _matrices_like(self, like: torch.Tensor) -> list[torch.Tensor]:
        """The blocks on ``like``'s device and dtype, converted once per (device, dtype)."""
        key = (like.device, like.dtype)
        if key not in self._converted:
            self._converted[key] = [
                m.to(device=like.device, dtype=like.dtype) for m in self.matrices
            ]
        return self._converted[key]

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        """The matrices, their names and lambda; ``metadata`` is added to the header."""
        meta = {"names": json.dumps(self.names), "lambda": repr(self.lambda_), **(metadata or {})}
        save_tensors(
            {f"W.{i}": m.contiguous() for i, m in enumerate(self.matrices)},
            str(path),
            metadata=meta,
        )

    @classmethod
    def load(cls, path: Path) -> Whitener:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "names" not in meta:
                raise ArtifactError(f"{path} is not a saved whitener")
            names = json.loads(meta["names"])
            mats = [f.get_tensor(f"W.{i}") for i in range(len(names))]
        return cls(names, mats, float(meta["lambda"]))
