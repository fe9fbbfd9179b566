"""Work-based admission: requests are admitted by the backward passes they may cost, not by
how many they are.

A query costs its share of an encode pass plus, with the exact second stage, up to its cap
of candidates (it stops earlier once its top-k is certified). What each costs, and how many
candidates a stage scores, is learned from finished batches. A request expected alone to
outlast the request timeout is refused up front (413 ``work_over_budget``, naming the
numbers) instead of timing out a minute later; one that would wait behind more work than
the timeout allows is refused with 503 and a ``Retry-After`` computed from that backlog.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from api.errors import BacklogError, WorkOverBudgetError
from engine.query import Outcome, Query


def candidates(query: Query, default_rescore: int, size: int) -> int:
    """Second-stage candidates ``query`` may cost (besides its one encode): its cap (the
    index's default where the query does not say; none outside mode ``influence``), at
    most the ``size`` sequences of the index."""
    rescore = query.rescore if query.rescore is not None else default_rescore
    if query.mode != "influence" or not rescore:
        return 0
    return min(size, max(rescore, query.k))


class WorkMeter:
    """What work costs here, learned from finished batches (exponential averages), and the
    seconds of work admitted but not yet done. Used from the event loop only.

    A query costs its share of a batch's encode and, with the exact second stage, a fixed
    part (its own backward pass, its pool) plus a part per candidate scored: a line fitted
    through the (candidates, seconds) of each second stage. How many candidates a stage
    scores is learned too: a stage that is not certified ran to its cap; a certified one
    stopped after about as many candidates as certified stages have needed here. A request
    is charged what it is expected to cost on that model: the share of stages that ran to
    their cap at its cap, the rest at the count certified stages needed (at most its cap),
    never every cap in full: a stage that certifies early would otherwise be charged for
    candidates it never scores, and an idle server would refuse work as backlog.

    Args:
        timeout_s: the request timeout every admitted request must fit in.
        smoothing: weight of the newest batch in the averages.
    """

    def __init__(self, timeout_s: float, smoothing: float = 0.3) -> None:
        self.timeout_s = timeout_s
        self.smoothing = smoothing
        self.encode_s: float | None = None
        self.candidate_s: float | None = None
        self.stage_s = 0.0
        self.capped: float | None = None
        """Share of second stages that ran to their cap (were not certified)."""
        self.certified_n: float | None = None
        """Candidates a certified second stage scored (average)."""
        self.pending_s = 0.0
        self._moments: tuple[float, float, float, float] | None = None
        """Averages of n, s, n^2 and n s over second stages (n candidates in s seconds)."""

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe(self, outcomes: list[Outcome]) -> None:
        """Learn from a finished batch: its shared encode and search over its queries, and
        each query's own second stage: the candidates it scored, in what time, and whether
        it stopped certified or at its cap."""
        if not outcomes:
            return
        shared = max(o.encode_ms + o.search_ms for o in outcomes) / 1e3
        self.encode_s = self._average(self.encode_s, shared / len(outcomes))
        for o in outcomes:
            c = o.certificate
            if c is None:
                continue
            self._fit_stage(c.rescored, o.rescore_ms / 1e3)
            self.capped = self._average(self.capped, 0.0 if c.certified else 1.0)
            if c.certified:
                self.certified_n = self._average(self.certified_n, float(c.rescored))

    def _fit_stage(self, n: int, seconds: float) -> None:
        """Move the line seconds = stage_s + n candidate_s toward one second stage's."""
        n_f = float(n)
        point = (n_f, seconds, n_f * n_f, n_f * seconds)
        old, blend = self._moments, self._average
        if old is not None:
            point = (
                blend(old[0], point[0]),
                blend(old[1], point[1]),
                blend(old[2], point[2]),
                blend(old[3], point[3]),
            )
        self._moments = point
        mean_n, mean_s, mean_nn, mean_ns = point
        if mean_n <= 0:
            return
        var = mean_nn - mean_n * mean_n
        # A spread of candidate counts fits both parts; one count alone charges it all per
        # candidate, which is exact again for a stage expected to score that count.
        slope = (mean_ns - mean_n * mean_s) / var if var >= 1.0 else mean_s / mean_n
        self.candidate_s = max(slope, 0.0)
        self.stage_s = max(mean_s - self.candidate_s * mean_n, 0.0)

    def expected_candidates(self, cap: int) -> float:
        """Candidates a second stage capped at ``cap`` is expected to score here."""
        if self.capped is None or self.certified_n is None:
            return float(cap)
        return self.capped * cap + (1.0 - self.capped) * min(float(cap), self.certified_n)

    def estimate(self, caps: Sequence[int]) -> float | None:
        """Seconds a request of ``len(caps)`` queries is expected to take, ``caps[i]``
        the second-stage cap of query i (0: no second stage); None until a batch has been
        seen (and while candidates have no measured cost yet)."""
        staged = [cap for cap in caps if cap]
        if self.encode_s is None or (staged and self.candidate_s is None):
            return None
        candidate_s = self.candidate_s or 0.0
        second = sum(self.stage_s + self.expected_candidates(c) * candidate_s for c in staged)
        return len(caps) * self.encode_s + second

    def admit(self, caps: Sequence[int]) -> float:
        """Count a request's expected seconds in (see :meth:`estimate`), or refuse it.
        Returns what to ``release``.

        Raises:
            WorkOverBudgetError: the request alone would outlast the timeout.
            BacklogError: with the work already admitted it would (``retry_after_s``: when
                that backlog should have cleared).
        """
        alone = self.estimate(caps)
        if alone is None:
            return 0.0
        if alone > self.timeout_s:
            queries, candidates = len(caps), sum(caps)
            raise WorkOverBudgetError(
                f"this request of {queries} queries with up to {candidates} second-stage "
                f"candidates is expected to take ~{alone:.0f} s on this server, over the "
                f"{self.timeout_s:g} s request timeout: lower rescore or k, or split the batch",
                queries=queries,
                candidates=candidates,
                estimated_s=round(alone, 1),
                timeout_s=self.timeout_s,
            )
        if self.pending_s + alone > self.timeout_s:
            raise BacklogError(
                f"~{self.pending_s:.0f} s of admitted work is ahead of this request; retry later",
                retry_after_s=max(1, math.ceil(self.pending_s)),
            )
        self.pending_s += alone
        return alone

    def release(self, seconds: float) -> None:
        """The request that ``admit`` counted ``seconds`` for has finished (or given up)."""
        self.pending_s = max(0.0, self.pending_s - seconds)
