"""The exact second stage of several queries at once: their candidates' passes shared.

Queries answered together (a micro-batch) often share candidates: their first stages return
overlapping pools. ``SharedScorers`` runs each candidate's backward pass once and forms, in
it, the dot of every query whose pool holds the candidate (``encoder.rescoring.passes``:
each query's dot only for the rows it wants), so the second stages of a batch cost the
union of their pools' passes, not the sum.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import nullcontext

import torch

from encoder.batching import Example
from encoder.rescoring import Hold, QueryScorer, passes


class SharedScorers:
    """Exact scorers of several queries of one rescorer that share their candidates' passes
    (``passes``): a pass run for one query scores its candidates for every query whose pool
    holds them, so a candidate that several queries' first stages returned runs once.

    Args:
        scorers: the queries' scorers.
        pools: each query's candidate ids (None: whatever it asks for, shared with nobody).
    """

    def __init__(
        self, scorers: Sequence[QueryScorer], pools: Sequence[Collection[int] | None]
    ) -> None:
        self.scorers = list(scorers)
        self.pools = [None if p is None else set(p) for p in pools]
        self.done: list[dict[int, float]] = [{} for _ in self.scorers]
        self.sq: dict[int, float] = {}
        self.unit_norm = bool(self.scorers) and self.scorers[0].rescorer.unit_norm

    def missing(self, k: int, ids: Sequence[int]) -> list[int]:
        """The ids of ``ids`` query ``k`` has no score for yet (each once)."""
        return [i for i in dict.fromkeys(ids) if i not in self.done[k]]

    def run(
        self,
        k: int,
        ids: Sequence[int],
        candidates: Sequence[Example],
        sq: torch.Tensor | None = None,
        hold: Hold = nullcontext,
    ) -> None:
        """Score ``candidates`` (the sequences of ``ids``, which query ``k`` asks for) for
        query ``k`` and every other query whose pool holds them and has no score for them;
        ``sq``: their stored squared norms (else computed in the same passes)."""
        wanted = [
            torch.tensor(
                [i not in done and (j == k or (pool is not None and i in pool)) for i in ids],
                dtype=torch.bool,
            )
            for j, (pool, done) in enumerate(zip(self.pools, self.done, strict=True))
        ]
        dots, own = passes(self.scorers, candidates, wanted, hold, self.unit_norm and sq is None)
        for j, want in enumerate(wanted):
            for pos in torch.nonzero(want).flatten().tolist():
                self.done[j][ids[pos]] = float(dots[j, pos])
        norms = own if sq is None else sq.double()
        self.sq.update(zip(ids, norms.tolist(), strict=True))

    def scores(self, k: int, ids: Sequence[int]) -> torch.Tensor:
        """s(query k, candidate) of scored ``ids``; [len(ids)] float64."""
        dots = torch.tensor([self.done[k][i] for i in ids], dtype=torch.float64)
        sq = torch.tensor([self.sq[i] for i in ids], dtype=torch.float64)
        return self.scorers[k].scores(dots, sq)
