"""Rank fusion of two or more rankings, for the hybrid (BM25 + influence) search.

Reciprocal-rank fusion (Cormack et al. 2009): score(d) = sum_r w_r / (c + rank_r(d)), with
ranks starting at 1 and c = 60, the constant of the original paper. It needs no score
calibration between BM25 (unbounded) and the influence score (cosine in [-1, 1]), which is why it is
the default over a weighted score mix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from api.errors import InputError

RRF_C = 60


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int] | np.ndarray],
    k: int,
    *,
    c: int = RRF_C,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked id lists into one top-k ranking.

    Args:
        rankings: R lists of ids, each best first; negative ids (padding) are ignored.
            An id absent from a list gets nothing from it.
        k: length of the fused ranking.
        c: the RRF constant.
        weights: R weights (default all 1).
    Returns:
        (scores [k] float64, ids [k] int64), best first, ties broken by the lower id;
        padded with score 0 and id -1 when fewer than k distinct ids were given.
    """
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    w = [1.0] * len(rankings) if weights is None else list(weights)
    if len(w) != len(rankings):
        raise InputError(f"{len(rankings)} rankings but {len(w)} weights")
    fused: dict[int, float] = {}
    for ranking, weight in zip(rankings, w, strict=True):
        for rank, doc in enumerate(np.asarray(ranking, dtype=np.int64).tolist(), start=1):
            if doc >= 0:
                fused[doc] = fused.get(doc, 0.0) + weight / (c + rank)
    best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    scores = np.zeros(k, dtype=np.float64)
    ids = np.full(k, -1, dtype=np.int64)
    for i, (doc, score) in enumerate(best):
        ids[i], scores[i] = doc, score
    return scores, ids
