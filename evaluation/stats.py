"""Paired statistics of an evaluation: how sure is "method A beats method B"?

Every method is scored on the same queries, so comparisons are paired: the per-query
difference d_q = metric_A(q) - metric_B(q) has mean, standard error sd(d) / sqrt(Q), and a
percentile bootstrap 95% interval (queries resampled with replacement, seeded). Metrics per
query: reciprocal rank within the top 10 (MRR@10), hit@10 (recall@10), and mean tail-patch
of the top 1 / 3 / 10.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 2000
PER_QUERY_METRICS = ("rr_at_10", "hit_at_10", "tailpatch_top1", "tailpatch_top3", "tailpatch_top10")


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    seed: int = 0,
    samples: int = BOOTSTRAP_SAMPLES,
) -> dict[str, float]:
    """Mean of a - b over paired queries, its standard error and bootstrap 95% interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no paired values")
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "mean": float(d.mean()),
        "se": se,
        "ci95_low": float(lo),
        "ci95_high": float(hi),
        "n": int(d.size),
    }


def paired_table(
    per_query: Mapping[str, Mapping[str, Sequence[float]]],
    reference: str = "trackstar",
    *,
    rows: Sequence[int] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``reference`` minus every other method, per metric: one row per (method, metric).

    Args:
        per_query: method -> metric -> [Q] values (``PER_QUERY_METRICS``).
        reference: the method the others are compared with.
        rows: only these query indices (e.g. the unsaturated ones); None = all.
    """
    if reference not in per_query:
        return []
    out = []
    for method, metrics in per_query.items():
        if method == reference:
            continue
        for metric in PER_QUERY_METRICS:
            a, b = np.asarray(per_query[reference][metric]), np.asarray(metrics[metric])
            if rows is not None:
                a, b = a[list(rows)], b[list(rows)]
            if a.size == 0:
                continue
            out.append(
                {
                    "reference": reference,
                    "method": method,
                    "metric": metric,
                    **paired_difference(a, b, seed=seed),
                }
            )
    return out


PAIRED_REFERENCES = ("trackstar", "shipped")
"""The methods every other is compared with: the paper's and the product as served."""


def paired_tables(
    per_query: Mapping[str, Mapping[str, Sequence[float]]],
    subsets: Mapping[str, Sequence[int] | None],
    seed: int,
) -> dict[str, list[dict[str, Any]]]:
    """``paired_table`` of each of ``PAIRED_REFERENCES`` present, on each subset of the
    queries (name -> query indices, None: all): keys ``{subset}`` (TrackStar) and
    ``shipped, {subset}``."""
    out = {}
    for reference in PAIRED_REFERENCES:
        if reference not in per_query:
            continue
        prefix = "" if reference == "trackstar" else f"{reference}, "
        for name, rows in subsets.items():
            out[f"{prefix}{name}"] = paired_table(per_query, reference, rows=rows, seed=seed)
    return out


def strata_rows(
    rows: list[dict[str, Any]],
    per_query: Mapping[str, Mapping[str, Sequence[float]]],
    learned: Sequence[int],
) -> None:
    """Add each method's attribution and tail-patch means over the ``learned`` queries (the
    facts the model completes in the query's wording) to its row: ``*_learned``."""
    for row in rows:
        values = per_query[row["method"]]
        for metric, key in (
            ("rr_at_10", "mrr_learned"),
            ("hit_at_10", "recall_at_10_learned"),
            ("tailpatch_top10", "tailpatch_top10_learned"),
        ):
            picked = [values[metric][i] for i in learned]
            row[key] = float(np.mean(picked)) if picked else float("nan")


def across_seeds(rows_by_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per method, the mean and standard deviation over seeds of each numeric row value."""
    out = []
    for rows in zip(*rows_by_seed, strict=True):
        merged: dict[str, Any] = {
            "method": rows[0]["method"],
            "description": rows[0].get("description", ""),
            "seeds": len(rows),
        }
        for key, value in rows[0].items():
            if isinstance(value, float) and not key.endswith("_se"):
                values = np.array([r[key] for r in rows], dtype=np.float64)
                merged[key] = float(values.mean())
                merged[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(merged)
    return out
