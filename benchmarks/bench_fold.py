"""What folding a fingerprint for Milvus (``indexer.milvus.fold``) costs the first stage.

On the demo index (the shipped default), each query's candidates are the top ``C = 10 k``
by the folded fingerprints, re-ranked by the stored ones, as a folded Milvus collection
serves them: ``overlap`` is the top-k overlap with the unfolded Flat search, per fold factor
(the fingerprint folded into d / factor dims; a d = 65,536 default folds by 2 for Milvus).

    python -m benchmarks.bench_fold [--workdir .demo] [--queries 200] [--k 10]

Writes ``benchmarks/results/bench_fold.{md,json}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.bench_common import machine, md_table, write_results
from engine.index import InfluenceIndex
from evaluation.corpus import load_queries
from evaluation.demo import SIZES, prepare
from indexer.milvus import fold

FACTORS = (1, 2, 4, 8)


def measure(fps: np.ndarray, q: np.ndarray, k: int, factor: int) -> dict:
    """Top-k overlap with Flat after re-ranking the folded top 10 k, and the folded score's
    error against the stored one."""
    width = -(-fps.shape[1] // factor)
    exact = q @ fps.T
    folded = fold(q, width) @ fold(fps, width).T
    candidates = np.argsort(-folded, axis=1)[:, : 10 * k]
    reranked = np.take_along_axis(exact, candidates, axis=1)
    top = np.take_along_axis(candidates, np.argsort(-reranked, axis=1)[:, :k], axis=1)
    want = np.argsort(-exact, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top, want, strict=True)])
    return {
        "factor": factor,
        "width": width,
        "queries": len(q),
        "k": k,
        "candidates": 10 * k,
        "overlap_with_flat": round(float(overlap), 4),
        "score_error_sd": round(float((folded - exact).std()), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="the demo's work dir")
    parser.add_argument("--queries", type=int, default=200, help="demo queries (default 200)")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    args = parser.parse_args()
    paths = prepare(args.workdir, SIZES["full"])
    index = InfluenceIndex.open(paths["index"])
    try:
        queries = load_queries(paths["queries"])[: args.queries]
        q = index.encode_queries([(x.prompt, x.completion) for x in queries])
        fps = np.asarray(index.fingerprints, dtype=np.float32)
    finally:
        index.close()
    rows = [measure(fps, q, args.k, f) for f in FACTORS]
    md = (
        "# Folding the fingerprint for Milvus (demo index)\n\n"
        + md_table(rows, list(rows[0]))
        + "\noverlap_with_flat: top-k overlap of the folded search's top 10 k, re-ranked by the "
        "stored fingerprints, with the unfolded Flat search; score_error_sd: the folded inner "
        "product's deviation from the stored one over all pairs (factor 1: none).\n"
    )
    write_results("fold", {"benchmark": "fold", "machine": machine(), "rows": rows}, md)


if __name__ == "__main__":
    main()
