"""Runs bergson's gradient collection once, inside bergson's own venv (``bench_peer.py``).

Imports nothing from this project: ``bench_peer`` starts it with the peer venv's python,
gives it a pre-tokenized dataset (``save_to_disk``: input_ids, labels) and an optimizer
state file, and reads back ``gradients.bin`` / ``info.json`` and the JSON line printed here.

    python peer_bergson_driver.py --model CKPT --dataset DS --optimizer-state OPT \\
        --out RUN --token-batch-size N [--lift-context-limit] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--optimizer-state", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--token-batch-size", type=int, required=True)
    p.add_argument("--lift-context-limit", action="store_true",
                   help="patch out bergson's check that a token batch fits the model's context")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

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
        run_path=args.out, model=args.model, data=DataConfig(dataset=args.dataset), projection_dim=0,
        optimizer_state=args.optimizer_state, token_batch_size=args.token_batch_size, precision="fp32",
        filter_modules="lm_head", overwrite=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    build_module.build(cfg, PreprocessConfig(unit_normalize=False))
    seconds = time.perf_counter() - t0
    print(json.dumps({"build_seconds": seconds, "collect_seconds": sum(timed), "run_path": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
