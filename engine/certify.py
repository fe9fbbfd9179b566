"""When the exact second stage may stop: a certificate that its top-k is the exhaustive one.

Candidates are re-scored in first-stage order. After each chunk, the k-th best exact score
so far, ``s_k``, is a bar that every unscored candidate would have to clear to change the
top-k. The first stage estimates each candidate's exact score: ``f_j`` with a calibrated
standard deviation ``sd_j`` under the projection (``encoder.uncertainty``: the exact score
is ``f_j + e_j``, ``e_j ~ N(0, sd_j^2)``). By the union bound,

    P(some unscored candidate clears s_k) <= sum_j Q((s_k - f_j) / sd_j),

Q the standard normal upper tail. Once that sum is at most ``1 - confidence``, no
unscored candidate can still enter the top-k at that confidence: the answer is certified
and the stage stops. Candidates the first stage did not return all scored at most the
last one it returned, ``f_last``; they count ``n_rest`` times at ``f_last`` with the
largest ``sd`` seen (their own is not computed, and the bar is far above ``f_last`` by the
time it matters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

DEFAULT_CONFIDENCE = 0.95
"""The confidence a certificate is given at unless a query asks another."""

RESCORE_CHUNK = 32
"""Candidates re-scored between two checks of the certificate (after the first k): a few
backward passes of the exact stage (``encoder.rescoring.CANDIDATE_BATCH``), whose batches
are formed by length within the chunk (less padding than batches in first-stage order)."""


@dataclass(frozen=True)
class Certificate:
    """How the second stage ended for one query.

    Attributes:
        rescored: candidates re-scored exactly.
        certified: the top-k is the exhaustive exact top-k at ``confidence``.
        confidence: the confidence asked for.
        miss_probability: the union bound on an unscored candidate entering the top-k
            (1.0 where it is not modelled: no first-stage uncertainty).
    """

    rescored: int
    certified: bool
    confidence: float
    miss_probability: float


def miss_probability(
    bar: float,
    first: np.ndarray,
    sd: np.ndarray,
    *,
    n_rest: int = 0,
    rest_first: float = -np.inf,
    rest_sd: float = 0.0,
) -> float:
    """The union bound that an unscored candidate's exact score clears ``bar``.

    Args:
        bar: the k-th best exact score so far (``s_k``).
        first: [U] first-stage scores of the unscored candidates the first stage returned.
        sd: [U] their scores' standard deviations (0: exact, no projection noise).
        n_rest: candidates the first stage did not return, each scored at most
            ``rest_first`` by it with standard deviation at most ``rest_sd``.
    Returns:
        The bound, at most 1.
    """
    f = np.append(np.asarray(first, dtype=np.float64), rest_first)
    s = np.append(np.asarray(sd, dtype=np.float64), rest_sd)
    weight = np.append(np.ones(len(f) - 1), float(n_rest))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s > 0, (bar - f) / np.where(s > 0, s, 1.0), np.where(f > bar, -np.inf, np.inf))
    return min(1.0, float((weight * ndtr(-z)).sum()))
