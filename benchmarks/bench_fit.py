"""The basis step (the whitened sketch's K-FAC fit, ``--whiten``) against encoding the same
sequences.

Per batch: a plain forward+backward (weight gradients), the whitened sketch's encode
(``TrackStarEncoder.project``), and the fit's side sums (``TrackStarEncoder.basis_statistics``)
two ways: from the token factors where that is cheaper (``BasisStatistics.add_factors``, the
build's path) and through each example's formed gradient (``add``, the previous path). Once
per model: the eigendecompositions that turn the sums into the whitening
(``BasisStatistics.kfac_roots``). The build fits on ``basis_sample`` sequences, so its basis
step costs sample / batch x sums + roots against sample / batch x encode for those sequences.

    python -m benchmarks.bench_fit [--models gpt2-4x256,gpt2-small] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from benchmarks.bench_common import machine, md_table, write_results
from benchmarks.bench_encode import _time_runs, build_model, plain_step, random_batch
from encoder.basis import BasisStatistics
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from indexer.build_config import BuildConfig

log = logging.getLogger("bench_fit")

GOAL = 1.0
"""The basis step costs at most one encode of the sequences it samples."""


def measure(model_name: str, seq_len: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Seconds per batch of each pass, the roots once, and the build's basis-step ratio."""
    model = build_model(model_name, seq_len).requires_grad_(False)
    batch = random_batch(model, seq_len, batch_size)
    enc = TrackStarEncoder(model, FingerprintConfig(whiten=True))  # the sketch that fits
    stats = enc.basis_statistics([batch])
    enc.family.fit(stats)  # encoding needs the whitening; its values do not change the cost

    def formed() -> None:
        with mock.patch.object(BasisStatistics, "factors_pay", lambda *a: False):
            enc.basis_statistics([batch])

    runs = {
        "plain": lambda: plain_step(model, batch),
        "encode": lambda: enc.project(batch),
        "sums": lambda: enc.basis_statistics([batch]),
        "sums_formed": formed,
    }
    med, _ = _time_runs(runs, repeats, torch.device("cpu"))
    start = time.perf_counter()
    stats.kfac_roots(enc.modules, enc.config.delta)
    roots_s = time.perf_counter() - start
    sample = int(BuildConfig.__dataclass_fields__["basis_sample"].default)
    batches = sample / batch_size
    return {
        "model": model_name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "seq_len": seq_len,
        "batch": batch_size,
        "plain_s": med["plain"],
        "encode_s": med["encode"],
        "sums_s": med["sums"],
        "sums_formed_s": med["sums_formed"],
        "sums_ratio": med["sums"] / med["encode"],
        "sums_formed_ratio": med["sums_formed"] / med["encode"],
        "roots_s": roots_s,
        "basis_sample": sample,
        "basis_step_ratio": (batches * med["sums"] + roots_s) / (batches * med["encode"]),
        "basis_step_formed_ratio": (batches * med["sums_formed"] + roots_s)
        / (batches * med["encode"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: a tiny model, two repeats")
    p.add_argument("--models", default="gpt2-4x256,gpt2-small", help="comma-separated")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--out", type=Path, default=None, help="results dir (default benchmarks/results)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    grid = (
        [("tiny-2x64", 32)] if args.quick else [(m, args.seq_len) for m in args.models.split(",")]
    )
    repeats = 2 if args.quick else 3
    rows = []
    for name, seq_len in grid:
        rows.append(measure(name, seq_len, args.batch, repeats))
        log.info("%s", rows[-1])
    worst = max(r["basis_step_ratio"] for r in rows)
    goals = [
        {
            "goal": f"basis step <= {GOAL}x encoding the sequences it samples (worst config)",
            "measured": worst,
            "met": worst <= GOAL,
        }
    ]
    payload = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}}
    md = (
        "# Basis-step benchmark\n\n"
        "Seconds per batch (median of interleaved runs, one torch thread): `plain` a forward+"
        "backward with weight gradients; `encode` the whitened sketch's fingerprint; `sums` the fit's "
        "side covariances from the token factors where cheaper (the build's path), "
        "`sums_formed` through each example's formed gradient (the previous path); `roots_s` "
        "the eigendecompositions, once. `basis_step_ratio` = (sample / batch x sums + roots) "
        "/ (sample / batch x encode) at the build's `basis_sample`.\n\n"
        + md_table(rows, list(rows[0]))
        + "\n## Goals\n\n"
        + md_table(goals, ["goal", "measured", "met"])
    )
    name = "fit_quick" if args.quick else "fit"
    write_results(name, {**payload, "rows": rows, "goals": goals}, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
