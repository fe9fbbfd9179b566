"""Explain against the query that found the result: one 256-token training example of a
2-layer x 128 GPT-2 (the demo model's shape, context 256, random weights, random second
moments, k = 16, whitened), per-token contributions by one forward-mode pass (``jvp``, the
service's) and by one backward pass per chunk of targets (``copies``, the reference), next
to encoding one query; interleaved, medians. Issue goals: explain <= 10x its query and
<= 1 s on 2 CPU cores, contributions equal to 1e-5.

    python -m benchmarks.bench_explain [--tokens 256] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.bench_common import machine, md_table, write_results
from encoder.batching import Example, collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.optimizer_state import SecondMoments
from encoder.token_attribution import attribute_tokens
from encoder.whitening import Whitener


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab_size=4096,
        n_positions=max(256, args.tokens),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    v = {n: torch.rand(q.shape, generator=g) * 1e-2 + 1e-4 for n, q in model.named_parameters()}
    enc = TrackStarEncoder(
        model,
        FingerprintConfig(k=16, hessian="train", projection="gaussian", correction=True),
        second_moments=SecondMoments(v_hat=v, eps=1e-8, source="bench"),
    )
    ids = lambda n: torch.randint(1, 4096, (n,), generator=g).tolist()  # noqa: E731
    stats = enc.new_statistics()
    stats.update(enc.project(collate([sequence_example(ids(64)) for _ in range(8)])))
    enc.set_whitener(
        Whitener.from_statistics(stats, None, lambda_=None, lambda_component=1 / 64, delta=1e-3)
    )
    query = Example(tuple(ids(12)), tuple([False] * 8 + [True] * 4))
    example = sequence_example(ids(args.tokens))
    e_q = enc.encode(collate([query]))[0]
    runs = {
        "query encode": lambda: enc.encode(collate([query])),
        "explain (jvp)": lambda: attribute_tokens(enc, example, e_q, method="jvp"),
        "explain (copies)": lambda: attribute_tokens(enc, example, e_q, method="copies"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(t)) for k, t in times.items()}
    fast, slow = (attribute_tokens(enc, example, e_q, method=m) for m in ("jvp", "copies"))
    diff = float((fast.contributions - slow.contributions).abs().max())
    rows = [
        {"run": k, "median_s": v, "over_query": v / med["query encode"]} for k, v in med.items()
    ]
    goals = [
        {
            "goal": "explain <= 10x its query",
            "measured": med["explain (jvp)"] / med["query encode"],
            "met": med["explain (jvp)"] / med["query encode"] <= 10,
        },
        {
            "goal": "explain <= 1 s",
            "measured": med["explain (jvp)"],
            "met": med["explain (jvp)"] <= 1.0,
        },
        {"goal": "contributions equal to 1e-5", "measured": diff, "met": diff <= 1e-5},
    ]
    md = (
        f"# Explain a {args.tokens}-token example\n\n"
        + md_table(rows, ["run", "median_s", "over_query"])
        + "\n"
        + md_table(goals, ["goal", "measured", "met"])
        + f"\n2-layer x 128 GPT-2, k=16, hessian train, {args.threads} threads, {args.repeats} interleaved repeats.\n"
    )
    write_results(
        "explain",
        {
            "machine": machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
            "goals": goals,
        },
        md,
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
