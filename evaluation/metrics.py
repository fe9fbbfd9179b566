"""Attribution metrics of fact tracing (Chang et al. 2024, Section 4.1).

For a query whose fact is stated by a set of relevant training passages, a method returns
a ranking of training sequences. MRR is 1/rank of the first relevant sequence within the
top k (0 if none is there); recall@10 is 1 if any of the top 10 is relevant. Both are
averaged over queries.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from api.errors import InputError

MRR_CUTOFF = 10
RECALL_CUTOFF = 10


def reciprocal_rank(
    ranking: Sequence[int] | np.ndarray, relevant: Collection[int], k: int
) -> float:
    """1 / (1-based rank of the first relevant id among the top k), 0.0 if none.

    Args:
        ranking: ids, best first.
        relevant: ids that state the fact.
        k: cutoff.
    """
    for rank, doc in enumerate(np.asarray(ranking).tolist()[:k], start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def hit_at(ranking: Sequence[int] | np.ndarray, relevant: Collection[int], k: int) -> float:
    """1.0 if any of the top k ids is relevant, else 0.0 (recall@k as defined in the paper)."""
    return float(any(doc in relevant for doc in np.asarray(ranking).tolist()[:k]))


def attribution_metrics(
    rankings: Sequence[Sequence[int]] | np.ndarray,
    relevant: Sequence[Collection[int]],
    *,
    mrr_k: int = MRR_CUTOFF,
    recall_k: int = RECALL_CUTOFF,
) -> dict[str, float]:
    """Mean MRR@mrr_k and recall@recall_k over queries.

    Args:
        rankings: Q rankings (ids, best first), e.g. an [Q, k] array.
        relevant: Q sets of relevant ids.
    Returns:
        {"mrr": float, "recall_at_10": float} (the recall key names its cutoff).
    Raises:
        InputError: no queries, or rankings and relevant sets differ in count.
    """
    if len(rankings) != len(relevant):
        raise InputError(f"{len(rankings)} rankings but {len(relevant)} relevant sets")
    if len(rankings) == 0:
        raise InputError("no queries to evaluate")
    rr = [reciprocal_rank(r, set(rel), mrr_k) for r, rel in zip(rankings, relevant, strict=True)]
    hits = [hit_at(r, set(rel), recall_k) for r, rel in zip(rankings, relevant, strict=True)]
    return {"mrr": float(np.mean(rr)), f"recall_at_{recall_k}": float(np.mean(hits))}
