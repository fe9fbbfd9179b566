"""The certified second stage on the demo index (the shipped default: sketch, exact stage
over at most ``DEFAULT_RESCORE`` candidates): per k, how often the top-k is certified at the default
confidence, how many candidates that takes (mean, p90), one query's latency in process on
this machine, and whether the answer equals the one every candidate under the cap gives
(the previous default, which scored all 200).

    python -m benchmarks.bench_certified [--workdir .demo] [--queries 40] [--ks 1,5,10]

Builds the demo (``influence demo``'s steps, cached in ``--workdir``) when it is missing.
Writes ``benchmarks/results/bench_certified.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_common import machine, md_table, write_results
from encoder.batching import Example
from engine.batch import run_batch
from engine.certify import DEFAULT_CONFIDENCE
from engine.index import DEFAULT_RESCORE, InfluenceIndex
from engine.query import Limits, Query
from evaluation.corpus import load_queries
from evaluation.demo import SIZES, prepare

LIMITS = Limits(1000, 1000)


def _run(index: InfluenceIndex, query: Query) -> tuple[list[int], float, int, bool, Example]:
    start = time.perf_counter()
    (outcome,) = run_batch(index, [query], LIMITS)
    seconds = time.perf_counter() - start
    if outcome.error is not None:
        raise outcome.error
    assert outcome.traced is not None
    c = outcome.certificate
    scored = 0 if c is None else c.rescored
    return (
        [h.id for h in outcome.hits],
        seconds,
        scored,
        bool(c and c.certified),
        outcome.traced.example,
    )


def _all_scored(
    index: InfluenceIndex, example: Example, vector: np.ndarray, k: int
) -> tuple[list[int], float]:
    """The top-k when every candidate under the cap is scored (the previous default): the
    first stage's top ``DEFAULT_RESCORE`` through ``index.rescore``, which never stops early."""
    start = time.perf_counter()
    _, ids = index.search(vector[None, :], DEFAULT_RESCORE)
    candidates = [int(i) for i in ids[0] if i >= 0]
    exact = index.rescore(example, candidates)
    order = np.argsort(-exact, kind="stable")[:k]
    return [candidates[i] for i in order], time.perf_counter() - start


def measure(index: InfluenceIndex, queries: list, k: int, confidence: float) -> dict:
    rows = []
    for q in queries:
        capped = Query(q.prompt, q.completion, k, rescore=DEFAULT_RESCORE, confidence=confidence)
        ids, seconds, scored, certified, example = _run(index, capped)
        first, first_s, _, _, _ = _run(index, Query(q.prompt, q.completion, k, rescore=0))
        vector = np.asarray(index.encode_examples([example]), dtype=np.float32)[0]
        full, full_s = _all_scored(index, example, vector, k)
        rows.append(
            (
                ids == full,
                scored,
                certified,
                seconds,
                full_s,
                first_s,
                len(set(first) & set(full)) / k,
            )
        )
    same, scored, certified, seconds, full_s, first_s, first_overlap = (
        np.array(c, dtype=float) for c in zip(*rows, strict=True)
    )
    return {
        "k": k,
        "confidence": confidence,
        "queries": len(queries),
        "certified": round(float(certified.mean()), 3),
        "candidates_mean": round(float(scored.mean()), 1),
        "candidates_p90": float(np.percentile(scored, 90)),
        "cap": DEFAULT_RESCORE,
        "same_as_all_scored": round(float(same.mean()), 3),
        "first_stage_overlap": round(float(first_overlap.mean()), 3),
        "latency_p50_ms": round(float(np.median(seconds)) * 1e3, 1),
        "latency_p90_ms": round(float(np.percentile(seconds, 90)) * 1e3, 1),
        "all_scored_p50_ms": round(float(np.median(full_s)) * 1e3, 1),
        "first_stage_p50_ms": round(float(np.median(first_s)) * 1e3, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        help="the demo's work directory (default .demo)",
    )
    parser.add_argument(
        "--queries", type=int, default=40, help="demo queries, evenly spaced (default 40)"
    )
    parser.add_argument("--ks", default="1,5,10", help="result counts to measure (default 1,5,10)")
    parser.add_argument(
        "--confidence", type=float, default=DEFAULT_CONFIDENCE, help="certificate confidence"
    )
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    info = prepare(args.workdir, SIZES["full"])
    queries = load_queries(info["queries"])
    queries = queries[:: max(1, len(queries) // args.queries)][: args.queries]
    index = InfluenceIndex.open(info["index"])
    try:
        rows = [measure(index, queries, int(k), args.confidence) for k in args.ks.split(",")]
    finally:
        index.close()
    columns = list(rows[0])
    md = "\n".join(
        [
            "# The certified second stage on the demo index",
            "",
            md_table(rows, columns),
            "",
            "certified: share of queries whose top-k was certified before the cap; candidates: re-scored "
            "exactly; same_as_all_scored: the answer equals scoring every candidate under the cap; "
            "first_stage_overlap: top-k overlap of the first stage alone with that answer. Latencies: one "
            "query at a time, in process (no HTTP), on this machine.",
            "",
        ]
    )
    write_results("certified", {"machine": machine(), "rows": rows}, md)


if __name__ == "__main__":
    main()
