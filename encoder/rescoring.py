"""The exact second stage of a search: re-score a query's candidates without projection noise.

The first stage ranks by e_q . e_t, whose random projection decides much of a small-d
top-10 (``benchmarks/bench_fidelity.py``). The second stage recomputes the corrected
gradients G~ = G / (sqrt(v_hat) + eps) of the query and of its top-C candidates and scores
them with no projection at all:

    s(q, t) = sum_W <G~_q,W, G~_t,W> / (||G~_q|| ||G~_t||)     (unit norm; the dot without)

which is the score of the unprojected configuration (k = 0, hessian none): the re-ranked
top-10 equals that configuration's top-10 whenever its members are among the C candidates.
No projected R: it lives in the projected space, and an unprojected R (d_W x d_W per
module) is what the projection exists to avoid. A family that whitens before projecting (the
sketch) has its second stage score the whitened gradients W_out G~ W_in of every module
(``Family.whitening``, saved with the index): the score its projection estimates.
Per-module dot products are accumulated while the backward pass runs
(``encoder.hooks.GradientCapture``), so no full-size gradient of a candidate is ever kept:
memory is one full-size query gradient plus one module's batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch
from torch import nn

from api.errors import ConfigError
from encoder.basis import Pairs
from encoder.batching import Example, collate
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.optimizer_state import SecondMoments

CANDIDATE_BATCH = 8
"""Candidates per backward pass."""


def exact_config(config: FingerprintConfig) -> FingerprintConfig:
    """The unprojected, unwhitened configuration the second stage scores with."""
    return replace(config, k=0, hessian="none")


class ExactRescorer:
    """Scores candidates against a query by their unprojected corrected gradients.

    Args:
        model: the frozen model of the index.
        config: the index's fingerprint configuration (correction and unit norm apply).
        second_moments: the index's second moments (when ``config.correction``).
        whitening: the index's whitening (``Family.whitening``); required by a family that
            whitens.
    """

    def __init__(
        self,
        model: nn.Module,
        config: FingerprintConfig,
        second_moments: SecondMoments | None,
        whitening: Pairs | None = None,
    ) -> None:
        self.unit_norm = config.unit_norm
        self.encoder = TrackStarEncoder(
            model,
            exact_config(config),
            second_moments=second_moments if config.correction else None,
        )
        if whitening is not None:
            self.encoder.family.set_whitening(whitening)
        if self.encoder.needs_fit:
            raise ConfigError(f"the exact stage of a {config.projection} index needs its whitening")

    def _blocks(
        self, examples: Sequence[Example], pad_id: int, fn: Callable[[str, torch.Tensor], None]
    ) -> None:
        self.encoder.stream_blocks(collate(list(examples), pad_id), fn)

    def scores(self, query: Example, candidates: Sequence[Example], pad_id: int) -> torch.Tensor:
        """s(query, candidate) for each candidate; [C] float64 on the CPU."""
        return self.for_query(query, pad_id)(candidates)

    def for_query(self, query: Example, pad_id: int) -> QueryScorer:
        """A scorer of candidates against ``query`` whose gradient is computed once, here,
        so that candidates can be scored a chunk at a time (the certified second stage)."""
        return QueryScorer(self, query, pad_id)


class QueryScorer:
    """Scores candidates against one query (``ExactRescorer.for_query``): the query's
    per-module blocks are kept (one full-size gradient), each call runs the candidates'
    backward passes."""

    def __init__(self, rescorer: ExactRescorer, query: Example, pad_id: int) -> None:
        self.rescorer = rescorer
        self.pad_id = pad_id
        self.q_blocks: dict[str, torch.Tensor] = {}
        rescorer._blocks([query], pad_id, lambda name, g: self.q_blocks.__setitem__(name, g[0]))
        self.q_norm = sum(float(b.double().square().sum()) for b in self.q_blocks.values()) ** 0.5

    def __call__(self, candidates: Sequence[Example]) -> torch.Tensor:
        """s(query, candidate) for each candidate; [C] float64 on the CPU."""
        dots, sq = self.dots(candidates)
        if not self.rescorer.unit_norm:
            return dots
        tiny = torch.finfo(torch.float64).tiny
        cosines: torch.Tensor = dots / (sq.sqrt() * self.q_norm).clamp_min(tiny)
        return cosines

    def token_contributions(
        self, sequence: Example, hold: Callable[[], AbstractContextManager[object]] = nullcontext
    ) -> tuple[torch.Tensor, float]:
        """The exact score of ``sequence`` split over its target tokens' loss terms.

        The gradient is linear in the loss terms, so the sequence scored once per target
        token with only that token's loss gives dots that sum to the whole sequence's dot;
        divided by the query's and the whole sequence's norms (unit norm) they sum to its
        score. One candidate pass per target token; ``hold()`` is entered around each
        backward pass (the caller's model lock, so other work runs in between).

        Returns:
            [T] float64 contributions (0 where a token is no target) and the score: their sum,
            which equals the whole sequence's score up to float32 rounding of the passes.
        """
        targets = [t for t, on in enumerate(sequence.target_mask) if on]
        alone = [
            Example(sequence.input_ids, tuple(i == t for i in range(len(sequence.input_ids))))
            for t in targets
        ]
        dots, sq = self.dots([*alone, sequence], hold)  # the last: the whole sequence
        scale = 1.0
        if self.rescorer.unit_norm:
            scale = 1.0 / max(float(sq[-1].sqrt()) * self.q_norm, torch.finfo(torch.float64).tiny)
        contributions = torch.zeros(len(sequence.input_ids), dtype=torch.float64)
        contributions[targets] = dots[: len(targets)] * scale
        # Their sum is the score (the whole pass's own dot differs by float32 rounding only).
        return contributions, float(contributions.sum())

    def dots(
        self,
        candidates: Sequence[Example],
        hold: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """<q, candidate> and ||candidate||^2 of each candidate's gradient blocks; [C] float64.
        ``hold()`` is entered around each backward pass."""
        dots = torch.zeros(len(candidates), dtype=torch.float64)
        sq = torch.zeros(len(candidates), dtype=torch.float64)
        for s in range(0, len(candidates), CANDIDATE_BATCH):
            rows = slice(s, min(s + CANDIDATE_BATCH, len(candidates)))

            def add(name: str, g: torch.Tensor, rows: slice = rows) -> None:
                # Per module in the gradient's own dtype (no float64 copy of a [B, out*in]
                # block), summed over modules in float64.
                dots[rows] += (g @ self.q_blocks[name]).double().cpu()
                sq[rows] += torch.linalg.vector_norm(g, dim=1).double().square().cpu()

            with hold():
                self.rescorer._blocks(candidates[rows], self.pad_id, add)
        return dots, sq
