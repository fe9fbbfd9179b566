"""``sketch``, the product's fingerprint: a seeded CountSketch of each module's gradient, by
default the plain one, optionally (``whiten``) after a K-FAC whitening.

phi_W = S_W vec(W_out G~_W W_in), S_W a CountSketch of the out*in entries into the module's
d_W dims, drawn from (seed, module name) (``encoder.projection.sketch_hash``). By default the
sides are the identity (the [1] scale 1): the plain gradient is sketched and nothing is
fitted. With ``whiten``, W = (C / n + delta mean_eig I)^-1/2 of each side's covariance C of
the corrected per-example gradients over a sample of the corpus (fitted once by the build,
``encoder.basis.BasisStatistics.kfac_roots``); either way the sides are saved with the index
as ``{module}.W_out`` / ``{module}.W_in``. A module whose gradient fits its share of the
budget is kept whole: its block is the (whitened) gradient itself. The sketch is unbiased for
inner products with a dense Gaussian projection's variance (1 / d_W), whatever the rank of
the gradient (``encoder.uncertainty``).
"""

from __future__ import annotations

import torch

from api.errors import ConfigError
from encoder import basis
from encoder.basis import BasisStatistics, Pairs
from encoder.blocks import Block, Precision, Sketched, dense_block
from encoder.families.base import Family, pair_tensors, pairs_from
from encoder.modules import TrackedModule
from encoder.projection import Plan, sketch_hash
from encoder.uncertainty import sketch_score_variance


def keeps_hash(device: torch.device) -> bool:
    """Whether the family keeps each module's hash (9 bytes per hashed weight) instead of
    making it at every use: on the CPU, whose memory is plentiful and whose arithmetic is
    not; an accelerator makes it at once where it is used (``sketch_hash``)."""
    return device.type == "cpu"


class Sketch(Family):
    """The whitened, CountSketched gradient (``encoder.families.sketch``)."""

    name = "sketch"
    exact_norms = True  # every block's pair is the whitening: its norm is W_out G~ W_in's

    def setup(self) -> None:
        """The modules not kept whole, their hash kept where ``keeps_hash``; the whitening is
        fitted later."""
        self.roots: Pairs = {}
        if not self.config.whiten:  # the identity: the plain gradient is sketched, nothing fitted
            self.set_whitening({m.name: (torch.ones(1), torch.ones(1)) for m in self.modules})
        self.hashed = {m.name for m in self.modules if not self.whole(m)}
        self.hashes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if keeps_hash(self.device):
            for m in self.modules:
                if m.name in self.hashed:
                    sizes = self.plan[m.name] or (0, 0)
                    self.hashes[m.name] = sketch_hash(
                        self.config.seed, m, sizes[0] * sizes[1], self.device
                    )

    @classmethod
    def shape_plan(cls, plan: Plan, modules: list[TrackedModule]) -> Plan:
        """Every module is whitened, so one kept whole gets the square pair (out, in)."""
        return {m.name: plan[m.name] or (m.out_features, m.in_features) for m in modules}

    @property
    def needs_fit(self) -> bool:
        return not self.roots

    def fit(self, stats: BasisStatistics) -> None:
        if not self.config.whiten:
            raise ConfigError("this sketch does not whiten (whiten off): it has nothing to fit")
        self.set_whitening(stats.kfac_roots(self.modules, self.config.delta, self.device))

    def placeholder(self) -> None:
        """The identity whitening in the fitted one's shapes: [n, n] up to ``MAX_SIDE``, the
        [1] scale beyond (a dense identity of a long side would cost what the fit never does)."""

        def side(n: int) -> torch.Tensor:
            return torch.eye(n) if n <= basis.MAX_SIDE else torch.ones(1)

        self.set_whitening(
            {m.name: (side(m.out_features), side(m.in_features)) for m in self.modules}
        )

    def whitening(self) -> Pairs | None:
        return {n: (a.float().cpu(), b.float().cpu()) for n, (a, b) in self.roots.items()}

    def set_whitening(self, pairs: Pairs) -> None:
        """Install (W_out, W_in) of every module: a side [n, n], or the [1] tensor s for s I."""
        if set(pairs) != {m.name for m in self.modules}:
            raise ConfigError("the whitening names other modules than the tracked ones")
        for m in self.modules:
            for side, n in zip(pairs[m.name], (m.out_features, m.in_features), strict=True):
                if side.numel() != 1 and tuple(side.shape) != (n, n):
                    raise ConfigError(
                        f"a whitening side of {m.name} is {tuple(side.shape)}, it needs ({n}, {n})"
                    )
        self.roots = {n: (self._to_device(a), self._to_device(b)) for n, (a, b) in pairs.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return pair_tensors(self.whitening() or {}, "W_out", "W_in")

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.set_whitening(pairs_from(tensors, "W_out", "W_in"))

    def block(self, m: TrackedModule, inv: torch.Tensor | None, precision: Precision) -> Block:
        w_out, w_in = self.roots[m.name]
        if m.name in self.hashed:
            sizes = self.plan[m.name] or (0, 0)
            resident = self.hashes.get(m.name)
            dims = sizes[0] * sizes[1]
            return Sketched(m, w_out, w_in, self.config.seed, resident, dims, inv, precision)
        return dense_block(m, inv, (w_out, w_in), precision)  # kept whole: W_out G~ W_in

    def score_variance(
        self, query: torch.Tensor, rows: torch.Tensor, block_dims: list[int]
    ) -> torch.Tensor:
        hashed = [m.name in self.hashed for m in self.modules]
        return sketch_score_variance(query, rows, hashed, block_dims)
