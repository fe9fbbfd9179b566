"""The peer at real size: bergson 2.5.1 against this project at the GPT-2-small shape, in one
run: gradient-collection tokens/s and peak RSS of each tool's process.

A random-init GPT-2 small (``bench_encode.build_model``) is saved with the demo's tokenizer
(bergson loads one; the token ids are given pre-tokenized, so its vocabulary is never used),
with random Adam second moments, and ``--sequences`` random sequences of ``--seq-len`` tokens.
bergson runs its ``build`` at its default projection (``projection_dim`` 16 per side, the
paper's) in its venv (``make peer-venv``); this project encodes the same sequences at its
default (the sketch) and at the paper's configuration (Gaussian, k = 16, the correction),
each in a fresh process; every process's peak RSS comes from ``/usr/bin/time -v``. Times are
the collection alone (model loading apart). Without the peer venv it says so and exits 0.

    python -m benchmarks.bench_peer_scale [--sequences 16] [--seq-len 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_common import RESULTS_DIR, machine, md_table, write_results
from benchmarks.bench_peer import (
    PEER_PYTHON,
    peer_command,
    peer_result,
    peer_version,
    write_dataset,
    write_optimizer_state,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CONFIGS = {
    "default": {},
    "paper": {"k": 16, "projection": "gaussian", "correction": True, "hessian": "none"},
}


def prepare(work: Path, model_name: str, sequences: int, seq_len: int, tokenizer: Path) -> int:
    """The model directory, dataset and optimizer state both tools read; returns tokens."""
    from benchmarks.bench_encode import build_model, random_batch, random_second_moments
    from encoder.batching import sequence_example

    model = build_model(model_name, seq_len)
    model.save_pretrained(work / "model")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, work / "model" / name)
    write_optimizer_state(random_second_moments(model), model, work / "optimizer.pt")
    ids = random_batch(model, seq_len, sequences).input_ids.tolist()
    return write_dataset([sequence_example(r) for r in ids], work / "dataset")


def ours(work: Path, config: str, batch: int, threads: int) -> float:
    """Seconds of this project's encode of the dataset at ``config`` (in this process)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_encode import random_second_moments
    from encoder.batching import collate, sequence_example
    from encoder.config import FingerprintConfig
    from encoder.fingerprint import TrackStarEncoder

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(work / "model").eval().requires_grad_(False)
    fp = FingerprintConfig(**CONFIGS[config])
    # The second moments written for bergson (seeded: the same values).
    sm = random_second_moments(model) if fp.correction else None
    encoder = TrackStarEncoder(model, fp, second_moments=sm)
    rows = load_from_disk(str(work / "dataset"))["input_ids"]
    batches = [
        collate([sequence_example(r) for r in rows[i : i + batch]])
        for i in range(0, len(rows), batch)
    ]
    t0 = time.perf_counter()
    for b in batches:
        encoder.project(b)
    return time.perf_counter() - t0


def peak_rss_gib(stderr: str) -> float:
    """The peak RSS ``/usr/bin/time -v`` reports, in GiB."""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if m is None:
        raise RuntimeError("no peak RSS in /usr/bin/time's report")
    return int(m.group(1)) * 1024 / 2**30


def _ours_process(work: Path, config: str, batch: int, threads: int) -> tuple[float, float]:
    code = (
        "from pathlib import Path; from benchmarks.bench_peer_scale import ours; "
        f"print(ours(Path({str(work)!r}), {config!r}, {batch}, {threads}))"
    )
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1]), peak_rss_gib(done.stderr)


def measure(args: argparse.Namespace, python: Path, work: Path) -> dict[str, Any]:
    """Both tools on the same prepared inputs, each in its own process."""
    tokens = prepare(work, args.model, args.sequences, args.seq_len, args.tokenizer)
    rows = []
    for config in CONFIGS:
        seconds, rss = _ours_process(work, config, args.batch, args.threads)
        rows.append({"tool": f"ours, {config}", "seconds": seconds, "peak_rss_GiB": rss})
    cmd = peer_command(
        python,
        work / "model",
        work / "dataset",
        work / "optimizer.pt",
        work / "peer",
        args.seq_len * args.batch,
        True,
        args.threads,
    )
    done = subprocess.run(
        ["/usr/bin/time", "-v", *cmd, "--projection-dim", "16"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"bergson failed ({done.returncode}):\n{done.stderr[-3000:]}")
    collect = float(peer_result(done.stdout)["collect_seconds"])
    rss = peak_rss_gib(done.stderr)
    rows.append({"tool": "bergson, projection_dim 16", "seconds": collect, "peak_rss_GiB": rss})
    for row in rows:
        row["tokens_per_s"] = tokens / row["seconds"]
    peer = rows[-1]["tokens_per_s"]
    for row in rows:
        row["over_bergson"] = row["tokens_per_s"] / peer
    return {"tokens": tokens, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--model", default="gpt2-small", help="a bench_encode model (default gpt2-small)"
    )
    p.add_argument("--sequences", type=int, default=16, help="sequences encoded (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=4, help="sequences per pass (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per tool (default 1)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT / ".demo" / "model" / "checkpoint-2560",
        help="a directory with tokenizer.json (default: the demo model's)",
    )
    p.add_argument("--tag", default="", help="result file suffix")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = p.parse_args(argv)
    version = peer_version(PEER_PYTHON)
    if version is None:
        print(f"bergson is not installed at {PEER_PYTHON}: run `make peer-venv`; nothing measured")
        return 0
    with tempfile.TemporaryDirectory() as d:
        res = measure(args, PEER_PYTHON, Path(d))
    md = (
        "# The peer at real size\n"
        f"bergson {version} against this project on a random-init {args.model}: "
        f"{args.sequences} sequences of {args.seq_len} random tokens ({res['tokens']} tokens), "
        f"{args.batch} per pass, {args.threads} torch thread(s) per tool, each tool in its own "
        "process (peak RSS from /usr/bin/time -v); seconds of the gradient collection alone. "
        "bergson at its default projection (projection_dim 16, the paper's); ours at the "
        "default (the sketch) and the paper's configuration (Gaussian k = 16, the "
        "correction).\n\n"
        + md_table(res["rows"], ["tool", "seconds", "tokens_per_s", "over_bergson", "peak_rss_GiB"])
    )
    payload = {"benchmark": "peer_scale", "machine": machine(), "bergson": version, **res}
    write_results("peer_scale" + (f"_{args.tag}" if args.tag else ""), payload, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
