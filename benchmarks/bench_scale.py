"""The default at the sizes users bring: GPT-2 small and a 350M GPT-2 (random init, on the
CPU), the default fingerprint against the paper's, in one run; the plan's Llama-3.2-1B and
Llama-3.1-8B rows (80 GiB GPU) beside them.

Each shape runs in a fresh process, so that its peak RSS is its own: ``bench_encode.speed``
(the default's and the paper's encode, and the default's exact second stage, against a plain
training step on the same batch, interleaved), one query's encode, and the plan's sizes. A
query's cost at ``rescore`` N is its encode plus N times the exact stage's measured cost per
candidate (N is the cap: the certified stage stops earlier). The default needs no basis step
(``--whiten`` does: ``benchmarks/bench_fit.py``).

    python -m benchmarks.bench_scale [--quick] [--shapes ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_common import machine, md_table, write_results
from benchmarks.bench_encode import QUERY_TOKENS

SHAPES = {"gpt2-small": "GPT-2 small (12 x 768)", "gpt2-medium": "GPT-2 medium, 350M (24 x 1024)"}
RESCORES = (0, 50, 200)


def measure(model_name: str, seq_len: int, batch: int, repeats: int) -> dict[str, Any]:
    """One shape in this process: encode and exact-stage speed, a query's encode, the index
    and family sizes, and the peak RSS. Run in a fresh process (``_measured``)."""
    import resource

    from benchmarks.bench_encode import build_model, speed
    from encoder.config import FingerprintConfig
    from indexer.plan import build_plan

    torch.set_num_threads(1)
    row = speed(model_name, seq_len, batch, 16, repeats)
    with tempfile.TemporaryDirectory() as d, torch.device("meta"):
        build_model(model_name, seq_len).config.save_pretrained(d)  # the config, no weights
        sizes = {"seq_len": seq_len, "batch_size": batch, "sequences": 1}
        state = {}
        for name, fp in (
            ("default", FingerprintConfig()),
            ("paper", FingerprintConfig(k=16, projection="gaussian", correction=True)),
        ):
            plan = build_plan(Path(d), fp, dtype=torch.float32, device="cpu", memory=None, **sizes)
            family = {"sketch hash", "projection pairs", "whitening", "correction"}
            state[name] = sum(t.bytes for t in plan.terms if t.name in family)
    return {
        **row,
        "default_state_GiB": state["default"] / 2**30,
        "paper_state_GiB": state["paper"] / 2**30,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    }


def _measured(model_name: str, seq_len: int, batch: int, repeats: int) -> dict[str, Any]:
    code = (
        "import json; from benchmarks.bench_scale import measure; "
        f"print(json.dumps(measure({model_name!r}, {seq_len}, {batch}, {repeats})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_for(m: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """The default's and the paper's rows of one measured shape."""
    tokens = m["seq_len"] * m["batch"]
    per_candidate = m["exact_s"] / m["batch"]
    rows = []
    for config in ("default", "paper"):
        row = {
            "shape": label,
            "params_M": round(m["params_M"], 1),
            "config": config,
            "d": m[f"{config}_d"],
            "encode_over_step": m[f"{config}_ratio"],
            "tokens_per_s": tokens / m[f"{config}_s"],
            "step_tokens_per_s": tokens / m["plain_s"],
            "basis_step": "none",
            "state_GiB": m[f"{config}_state_GiB"],
            "index_bytes_per_sequence": 2 * m[f"{config}_d"] + (8 if config == "default" else 0),
            "peak_rss_GiB": m["peak_rss_GiB"],
        }
        if config == "default":  # the exact stage is the default's (the paper's has R)
            row["candidate_over_step"] = m["exact_ratio"]
            for n in RESCORES:
                row[f"query_s_rescore_{n}"] = m["query_s"] + n * per_candidate
        rows.append(row)
    return rows


def plan_rows() -> list[dict[str, Any]]:
    """The plan's default rows for the GPU shapes (80 GiB, ``--batch-size auto``)."""
    from benchmarks.bench_plan import plan_row, shape_plan
    from encoder.config import FingerprintConfig

    shapes = ("llama-3.2-1b", "llama-3.1-8b")
    return [{"shape": s, **plan_row(shape_plan(s, FingerprintConfig()))} for s in shapes]


def goals(rows: list[dict[str, Any]], plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default's encode and exact stage against a plain step at each measured shape
    (``bench_encode.GOALS``), and the 1B / 8B plans fitting their GPU."""
    from benchmarks.bench_encode import GOALS

    out = []
    for row in (r for r in rows if r["config"] == "default"):
        for key, limit, what in (
            ("encode_over_step", GOALS["default_ratio_max"], "default encode"),
            ("candidate_over_step", GOALS["exact_ratio_max"], "exact stage per candidate"),
        ):
            out.append(
                {
                    "goal": f"{row['shape']}: {what} <= {limit}x a plain step",
                    "measured": row[key],
                    "met": row[key] <= limit,
                }
            )
    for plan in plans:
        out.append(
            {
                "goal": f"{plan['shape']}: default build and server fit the GPU",
                "measured": max(plan["build_GiB"], plan["serve_GiB"]),
                "met": bool(plan["fits_build"] and plan["fits_serve"]),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: a tiny model, one repeat")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each (default 2)")
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results)"
    )
    args = p.parse_args(argv)
    if args.quick:
        grid, seq_len, batch, repeats = {"tiny-2x64": "tiny (2 x 64)"}, 32, 2, 1
    else:
        grid = {s: SHAPES[s] for s in args.shapes}
        seq_len, batch, repeats = args.seq_len, args.batch, args.repeats
    measured = {name: _measured(name, seq_len, batch, repeats) for name in grid}
    rows = [r for name, label in grid.items() for r in rows_for(measured[name], label)]
    plans = plan_rows()
    cols = [
        "shape",
        "params_M",
        "config",
        "d",
        "encode_over_step",
        "tokens_per_s",
        "step_tokens_per_s",
        "basis_step",
        "state_GiB",
        "index_bytes_per_sequence",
        "peak_rss_GiB",
        "candidate_over_step",
        *(f"query_s_rescore_{n}" for n in RESCORES),
    ]
    md = (
        "# The default at real model sizes\n"
        f"Random-init models on the CPU (one torch thread, float32), batches of {batch} x "
        f"{seq_len} random tokens, the median of {repeats} interleaved runs after a warm-up; "
        "each shape in its own process (peak RSS: that process, both fingerprints' encoders "
        "and the exact stage included). `encode_over_step`: a batch's encode over a plain "
        "training step (forward and backward with weight gradients) on it; `state_GiB`: the "
        "fingerprint's own state (the sketch's hash; the paper's Gaussian pairs and Adam "
        "correction); `candidate_over_step`: the exact second stage per candidate over a plain "
        f"step per sequence; `query_s_rescore_N`: a {QUERY_TOKENS}-token query's encode plus N "
        "candidates at the measured cost (N is the cap; the certified stage stops earlier).\n\n"
        + md_table(rows, cols)
        + "\n## The plan at 1B and 8B (default, 80 GiB GPU, `--batch-size auto`)\n\n"
        + md_table(plans, list(plans[0]))
        + "\n## Goals\n\n"
        + md_table(goals(rows, plans), ["goal", "measured", "met"])
    )
    payload = {
        "benchmark": "scale",
        "goals": goals(rows, plans),
        "quick": args.quick,
        "machine": machine(),
        "measured": measured,
        "rows": rows,
        "plans": plans,
    }
    write_results("scale" + ("_quick" if args.quick else ""), payload, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
