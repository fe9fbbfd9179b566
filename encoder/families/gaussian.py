"""``gaussian``, the paper's TrackStar projection: seeded Gaussian Kronecker pairs.

phi_W = A_W G~_W B_W^T with A_W [k_out, out], B_W [k_in, in] of i.i.d. N(0, 1/k) entries drawn
from (seed, module name) (``encoder.projection.projection_pair``); a module whose gradient fits
its share of the budget is kept whole. The paper's full pipeline adds the optimizer
correction and the projected mixed R (``FingerprintConfig(projection="gaussian",
correction=True, hessian="mixed")``). An index saves the pairs (``{module}.A`` /
``{module}.B``) and checks on open that its seed still draws them.
"""

from __future__ import annotations

import torch

from api.errors import ConfigError
from encoder.blocks import Block, Precision, dense_block
from encoder.families.base import Family, pair_tensors, pairs_from
from encoder.modules import TrackedModule
from encoder.projection import projection_pair
from encoder.uncertainty import kronecker_score_variance


class Gaussian(Family):
    """Seeded Gaussian Kronecker projections (``encoder.families.gaussian``)."""

    name = "gaussian"

    def setup(self) -> None:
        """Draw the pair of every projected module from (seed, module name)."""
        self.drawn = {
            m.name: projection_pair(self.config.seed, m, *sizes)
            for m in self.modules
            if (sizes := self.plan[m.name]) is not None
        }
        self.pairs = {
            n: (self._to_device(a), self._to_device(b)) for n, (a, b) in self.drawn.items()
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return pair_tensors(self.drawn, "A", "B")

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Check that the saved pairs are the ones the seed draws (nothing else to install)."""
        saved = pairs_from(tensors, "A", "B")
        if set(saved) != set(self.drawn):
            raise ConfigError("the saved projections name other modules than the config projects")
        for name, (a, b) in self.drawn.items():
            if not (torch.equal(saved[name][0], a) and torch.equal(saved[name][1], b)):
                raise ConfigError(
                    f"the projection of {name} differs from the saved one (seed or torch RNG changed)"
                )

    def block(self, m: TrackedModule, inv: torch.Tensor | None, precision: Precision) -> Block:
        return dense_block(m, inv, self.pairs.get(m.name), precision)

    def score_variance(
        self, query: torch.Tensor, rows: torch.Tensor, block_dims: list[int]
    ) -> torch.Tensor:
        return kronecker_score_variance(
            query, rows, [self.plan[m.name] for m in self.modules], block_dims
        )
