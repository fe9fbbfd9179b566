"""Runs bergson's gradient collection once, inside bergson's own venv (``bench_peer.py``).

Imports nothing from this project: ``bench_peer`` starts it with the peer venv's python,
gives it a pre-tokenized dataset (``save_to_disk``: input_ids, labels) and an optimizer
state file, and reads back ``gradients.bin`` / ``info.json`` and the JSON line printed here.

    python peer_bergson_driver.py --model CKPT --dataset DS --optimizer-state OPT \\
        --out RUN --token-batch-size N [--lift-context-limit] [--threads T] [--projection-dim P]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--optimizer-state", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--token-batch-size", type=int, required=True)
    p.add_argument(
        "--lift-context-limit",
        action="store_true",
        help="patch out bergson's check that a token batch fits the model's context",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--projection-dim",
        type=int,
        default=0,
        help="bergson's projection per side (default 0: exact gradients)",
    )
    p.add_argument(
        "--trackstar-queries",
        default=None,
        help="run bergson's whole TrackStar pipeline against this query dataset instead, and save "
        "its scores [N, Q] as OUT/scores.npy",
    )
    p.add_argument(
        "--unit-normalize",
        action="store_true",
        help="TrackStar's unit norm (bergson's default is off)",
    )
    args = p.parse_args()
    if args.trackstar_queries:
        return trackstar(args)

    import torch

    torch.set_num_threads(args.threads)
    from bergson import build as build_module
    from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig
    from bergson.utils import worker_utils

    # The collection alone (the hooked backward passes and the writes), as build_worker calls it
    # in this process for one rank: model and dataset loading are outside it.
    collect, timed = build_module.collect_gradients, []

    def timed_collect(**kwargs):
        t = time.perf_counter()
        collect(**kwargs)
        timed.append(time.perf_counter() - t)

    build_module.collect_gradients = timed_collect

    if args.lift_context_limit:
        worker_utils.max_tokens_for_model = lambda *a, **k: 1 << 30
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = IndexConfig(
        run_path=args.out,
        model=args.model,
        data=DataConfig(dataset=args.dataset),
        projection_dim=args.projection_dim,
        optimizer_state=args.optimizer_state,
        token_batch_size=args.token_batch_size,
        precision="fp32",
        filter_modules="lm_head",
        overwrite=True,
    )
    t0 = time.perf_counter()
    build_module.build(cfg, PreprocessConfig(unit_normalize=False))
    seconds = time.perf_counter() - t0
    print(
        json.dumps({"build_seconds": seconds, "collect_seconds": sum(timed), "run_path": args.out})
    )
    return 0


def trackstar(args: argparse.Namespace) -> int:
    """bergson's TrackStar with its defaults (projection_dim 16, mixed autocorrelation
    Hessian, target_downweight_components 1000), all sequences for the statistics."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from bergson.cli.trackstar import trackstar as run
    from bergson.config.config import (
        DataConfig,
        PreprocessConfig,
        QuerySetConfig,
        TrackstarConfig,
        TrackstarIndexConfig,
    )
    from bergson.data import load_scores
    from bergson.utils import worker_utils

    if args.lift_context_limit:
        worker_utils.max_tokens_for_model = lambda *a, **k: 1 << 30
    shutil.rmtree(args.out, ignore_errors=True)
    index_cfg = TrackstarIndexConfig(
        run_path=args.out,
        model=args.model,
        data=DataConfig(dataset=args.dataset),
        optimizer_state=args.optimizer_state,
        token_batch_size=args.token_batch_size,
        precision="fp32",
        filter_modules="lm_head",
        overwrite=True,
    )
    cfg = TrackstarConfig(
        query=QuerySetConfig(dataset=args.trackstar_queries),
        preprocess_cfg=PreprocessConfig(unit_normalize=args.unit_normalize),
        stats_sample_size=None,
    )
    t0 = time.perf_counter()
    run(index_cfg, cfg)
    seconds = time.perf_counter() - t0
    scores = load_scores(Path(args.out) / "scores")
    np.save(Path(args.out) / "scores.npy", np.asarray(scores[:], dtype=np.float32))
    print(json.dumps({"pipeline_seconds": seconds, "run_path": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
