"""An evaluation's result (``EvalResult``: rows, context, per-query values, paired tables) and
its combination over projection seeds (``combine_seeds``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation.stats import PER_QUERY_METRICS, across_seeds, paired_tables, strata_rows

SATURATED_P = 0.99
SATURATED_LOGP = float(np.log(SATURATED_P))
"""A query whose completion has p >= 0.99 before the tail-patch step is saturated."""


@dataclass
class EvalResult:
    """Everything the report writes: one row per method plus the run's context."""

    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    context: dict[str, Any] = field(default_factory=dict)
    per_query: dict[str, dict[str, Any]] = field(default_factory=dict)
    """method -> {top10, rr_at_10, hit_at_10, tailpatch_top1/3/10}: [Q] values, query order."""
    paired: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """``all`` / ``unsaturated`` queries -> trackstar minus each method (``evaluation.stats``)."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "rows": self.rows,
                "settings": self.settings,
                "context": self.context,
                "paired": self.paired,
                "per_query": self.per_query,
            },
            indent=2,
        )


def combine_seeds(results: list[EvalResult]) -> EvalResult:
    """One result over several projection seeds: rows hold each value's mean and its
    standard deviation over seeds (``_sd``); paired statistics use each query's value
    averaged over seeds; ``context["by_seed"]`` keeps every seed's rows and lambdas."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    per_query: dict[str, dict[str, Any]] = {}
    for method in first.per_query:
        per_query[method] = {"top10_by_seed": [r.per_query[method]["top10"] for r in results]}
        for metric in PER_QUERY_METRICS:
            per_query[method][metric] = np.mean(
                [r.per_query[method][metric] for r in results], axis=0
            ).tolist()
    base = np.mean([r.context["base_logprob"] for r in results], axis=0)
    unsaturated = np.flatnonzero(base < SATURATED_LOGP).tolist()
    seed = int(first.settings["seed"])
    learned = list(first.context.get("learned_queries", []))
    paired = paired_tables(
        per_query, {"all": None, "unsaturated": unsaturated, "learned": learned}, seed
    )
    context = dict(first.context)
    context["seeds"] = [r.settings["seed"] for r in results]
    context["by_seed"] = [
        {
            "seed": r.settings["seed"],
            "rows": r.rows,
            "lambdas_by_fold": r.context["lambdas_by_fold"],
        }
        for r in results
    ]
    settings = dict(first.settings, seed=context["seeds"])
    rows = across_seeds([r.rows for r in results])
    strata_rows(rows, per_query, learned)
    return EvalResult(
        rows=rows,
        settings=settings,
        context=context,
        per_query=per_query,
        paired=paired,
    )
