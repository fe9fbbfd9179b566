"""How many candidates the exact second stage needs on the default (sketch) index.

For each model of ``bench_fidelity`` (demo 2 x 128, deep 6 x 256; trained and cached the
same way), or a real-text set built and trained by ``evaluation.real_sets`` (``.eval/NAME``:
text nobody here wrote, its corpus far larger than the candidates re-scored), and
projection seeds 0 and 1 of the default fingerprint (``FingerprintConfig()``, hessian none;
``--whiten`` / ``--projection``: another), over the corpus's first 100 queries:

- ``first_vs_own`` / ``first_seed``: top-10 overlap of the first stage with the unprojected
  ranking the exact stage scores by (k = 0: the plain gradient cosine, or the whitened one)
  and between the seeds;
- ``rescoreC`` / ``rescoreC_seed``: the same after re-scoring the first stage's top C by
  the unprojected scores (read from the reference matrix: the exact stage's scores are
  those, tests/service/test_sketch_index.py), for C in ``DEPTHS``.

This is what ``engine.index.DEFAULT_RESCORE`` is chosen from. Results:
benchmarks/results/bench_rescore_depth[_TAG].{json,md} (files before the default's switch
measured the whitened sketch, which was the default then).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import RESULTS_DIR, machine, md_table, write_results  # noqa: E402

DEPTHS = (50, 100, 150, 200, 300)
SEEDS = (0, 1)


def measure(
    name: str, workdir: Path, n_queries: int, projection: str = "sketch", whiten: bool = False
) -> dict[str, Any]:
    from benchmarks.bench_fidelity import (
        MODELS,
        Harness,
        overlap,
        prepare,
        rescored,
        top,
        unprojected,
    )
    from encoder.config import FingerprintConfig

    if name in MODELS:
        checkpoint, corpus_dir = prepare(MODELS[name], workdir)
    else:  # a real-text set as ``evaluation.real_sets`` built and trained it
        corpus_dir = Path(".eval") / name
        checkpoint = Path(
            json.loads((corpus_dir / "model" / "train.json").read_text())["checkpoint"]
        )
    h = Harness(checkpoint, corpus_dir, n_queries)
    # What the exact stage scores by: the plain gradient cosine, or the K-FAC-whitened one
    # (--whiten); uncorrected (the default).
    own = unprojected(h, projection, False, whiten)[0]
    own_top = top(own, 10)
    first, dim = {}, 0
    for seed in SEEDS:
        config = FingerprintConfig(seed=seed, hessian="none", projection=projection, whiten=whiten)
        enc, a, b, _ = h.phi(config)
        first[seed], dim = h.scores(enc.config, a, b)[0], enc.dim
    s0, s1 = (first[s] for s in SEEDS)
    row: dict[str, Any] = {
        "model": name,
        "projection": enc.config.projection,
        "d": dim,
        "queries": len(h.queries),
        "sequences": len(h.train),
        "first_vs_own": (overlap(top(s0, 10), own_top) + overlap(top(s1, 10), own_top)) / 2,
        "first_seed": overlap(top(s0, 10), top(s1, 10)),
    }
    for c in DEPTHS:
        r0, r1 = rescored(s0, own, c), rescored(s1, own, c)
        row[f"rescore{c}"] = (overlap(r0, own_top) + overlap(r1, own_top)) / 2
        row[f"rescore{c}_seed"] = overlap(r0, r1)
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--models",
        default="demo,deep",
        help="comma-separated: demo, deep, quick, or a real-text set trained by evaluation.real_sets",
    )
    p.add_argument("--queries", type=int, default=100, help="queries per model (default 100)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(".bench/fidelity"),
        help="trained models are cached here",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--tag", default=None, help="result file suffix, e.g. real_sets")
    p.add_argument(
        "--projection",
        default="sketch",
        choices=("sketch", "gaussian"),
        help="the fingerprint family (default: sketch, the index default)",
    )
    p.add_argument("--whiten", action="store_true", help="the K-FAC-whitened sketch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        measure(n.strip(), args.workdir, args.queries, args.projection, args.whiten)
        for n in args.models.split(",")
    ]
    cols = ["model", "d", "first_vs_own", "first_seed"] + [
        f"rescore{c}{s}" for c in DEPTHS for s in ("", "_seed")
    ]
    md = (
        "# Exact second stage depth on the default index\n\n"
        f"Top-10 overlaps, mean over {args.queries} queries; `_seed`: seed {SEEDS[0]} vs {SEEDS[1]}; the rest: "
        f"against the unprojected ranking the exact stage scores by (mean over the two seeds); "
        f"fingerprint family: {args.projection}{', K-FAC-whitened' if args.whiten else ''} "
        "(unwhitened unless said: the plain gradient).\n\n" + md_table(rows, cols)
    )
    payload = {
        "machine": machine(),
        "settings": {**vars(args), "workdir": str(args.workdir), "out": str(args.out)},
        "depths": list(DEPTHS),
        "rows": rows,
    }
    name = "rescore_depth" + (f"_{args.tag}" if args.tag else "")
    write_results(name, payload, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
