"""``influence index plan`` at the sizes users bring: GPT-2 small and a 350M GPT-2 on the
CPU, Llama-3.2-1B and Llama-3.1-8B shapes on one 80 GB GPU (public config values, no
weights), at the default fingerprint and the paper's. Writes bench_plan.{md,json}.

    python -m benchmarks.bench_plan [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, LlamaConfig

from benchmarks.bench_common import machine, md_table, write_results
from encoder.config import FingerprintConfig
from indexer.plan import MemoryPlan, build_plan, plan_lines

SHAPES = {  # name: (config, device, memory)
    "gpt2-small (12 x 768)": (GPT2Config(n_layer=12, n_embd=768, n_head=12), "cpu", None),
    "gpt2-medium (24 x 1024)": (GPT2Config(n_layer=24, n_embd=1024, n_head=16), "cpu", None),
    "llama-3.2-1b": (
        LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        "cuda",
        80 << 30,
    ),
    "llama-3.1-8b": (
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
        "cuda",
        80 << 30,
    ),
}
CONFIGS = {
    "default": FingerprintConfig(),
    "whitened": FingerprintConfig(whiten=True),
    "paper": FingerprintConfig(projection="gaussian", correction=True, hessian="mixed"),
}


MEASURED = ((256, 8), (512, 4), (128, 16), (1024, 2))
"""(sequence length, batch) of the encodes measured at the GPT-2-small shape."""


def measure(
    seq_len: int, batch_size: int, n_layer: int = 12, n_embd: int = 768
) -> dict[str, float]:
    """Peak RSS of one default encode of a random-init GPT-2 (GPT-2 small unless given) in
    this process (a configuration that needs a fit gets the identity whitening in the fitted
    one's shapes and cost; the default plain sketch needs none), beside the plan's build
    device total for the same sizes (its runtime term: this process before the model). Run
    in a fresh process."""
    import resource

    from transformers import GPT2LMHeadModel

    from encoder.batching import collate, sequence_example
    from encoder.fingerprint import TrackStarEncoder

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64))
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        sizes = {"seq_len": seq_len, "batch_size": batch_size, "sequences": 1}
        plan = build_plan(
            Path(d), FingerprintConfig(), dtype=torch.float32, device="cpu", memory=None, **sizes
        )
    model = GPT2LMHeadModel(config).eval().requires_grad_(False)
    enc = TrackStarEncoder(model, FingerprintConfig())
    if enc.needs_fit:
        enc.family.placeholder()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (batch_size, seq_len), generator=g)
    enc.project(collate([sequence_example(r.tolist()) for r in ids]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seq_len": seq_len,
        "batch": batch_size,
        "peak_rss_GiB": peak / 2**30,
        "plan_build_device_GiB": plan.total("build") / 2**30,
        "plan_over_measured": plan.total("build") / peak,
    }


def _measured_rows() -> list[dict[str, float]]:
    import json
    import subprocess
    import sys

    rows = []
    for seq_len, batch in MEASURED:
        code = f"import json; from benchmarks.bench_plan import measure; print(json.dumps(measure({seq_len}, {batch})))"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def shape_plan(shape: str, fp: FingerprintConfig) -> MemoryPlan:
    """The plan of ``SHAPES[shape]`` at 1,000,000 sequences of 1024 tokens: on the CPU in
    float32 at batch 8; on the GPU in bfloat16 at ``--batch-size auto`` (what fits its
    memory)."""
    config, device, memory = SHAPES[shape]
    cuda = device == "cuda"
    sizes = {"seq_len": 1024, "batch_size": 0 if cuda else 8, "sequences": 1_000_000}
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        plan = build_plan(Path(d), fp, dtype=dtype, device=device, memory=memory, **sizes)
    return dataclasses.replace(plan, model=shape)


def plan_row(plan: MemoryPlan) -> dict[str, Any]:
    """A plan's summary columns."""
    return {
        "d": plan.dim,
        "build_batch": plan.batch_size,
        "candidates_per_pass": plan.candidate_batch,
        "build_GiB": plan.total("build") / 2**30,
        "serve_GiB": plan.total("serve") / 2**30,
        "fits_build": plan.fits("build"),
        "fits_serve": plan.fits("serve"),
        "encode_over_plain_flops": plan.flops_encode / plan.flops_plain,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results)"
    )
    p.add_argument("--no-measure", action="store_true", help="the plans alone, no measured encodes")
    args = p.parse_args(argv)
    measured = [] if args.no_measure else _measured_rows()
    rows, sections = [], []
    for shape, (_, device, _) in SHAPES.items():
        for name, fp in CONFIGS.items():
            plan = shape_plan(shape, fp)
            rows.append(
                {
                    "shape": shape,
                    "config": name,
                    "device": device,
                    **plan_row(plan),
                    "terms": [dataclasses.asdict(t) for t in plan.terms],
                }
            )
            sections.append(
                f"## {shape}, {name}\n\n```\n" + "\n".join(plan_lines(plan)) + "\n```\n"
            )
    cols = [
        "shape",
        "config",
        "device",
        "d",
        "build_batch",
        "candidates_per_pass",
        "build_GiB",
        "serve_GiB",
        "fits_build",
        "fits_serve",
        "encode_over_plain_flops",
    ]
    md = (
        "# Memory plans at real model sizes\n"
        "`influence index plan` from each model's config (no weights): 1,000,000 sequences of 1024 "
        "tokens; CPU shapes in float32 at build batch 8, GPU shapes in bfloat16 on an 80 GiB device "
        "at `--batch-size auto` (the batch the build takes there) with the exact stage's candidates "
        "per pass sized the same way. "
        "An estimate (the state terms are the encoder's own sizes, tested; activations by formula).\n\n"
        + md_table(rows, cols)
        + "\n## The plan against a measured encode (GPT-2 small, CPU, float32)\n\n"
        + "Peak RSS of a fresh process that runs one default encode (the plain sketch: no "
        + "whitening) against the plan's build device total for the same sizes.\n\n"
        + (md_table(measured, list(measured[0])) if measured else "Not measured (--no-measure).\n")
        + "\n"
        + "\n".join(sections)
    )
    payload = {"benchmark": "plan", "machine": machine(), "rows": rows, "measured": measured}
    write_results("plan", payload, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
