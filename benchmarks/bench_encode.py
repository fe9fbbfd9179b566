"""Encoding speed: the two fingerprints against a plain training step.

Time to encode one batch (``TrackStarEncoder.project``: forward, backward, each module's
block) against a plain forward+backward on the same batch and model (a training step without
optimizer: parameters require grad, weight gradients summed), for the product's default
(``sketch`` at its default sizing: the plain gradient sketched; results before the switch
measured the K-FAC-whitened one, fitted on the batch itself) and the paper's ``gaussian`` projection (fixed k, correction on), at the
models and sequence lengths given. The ratio is the cost of fingerprinting relative to
training on the same tokens. ``exact``: the default's exact second stage scoring the batch
as candidates of a query as long as they are (``encoder.rescoring.FactorScorer``, the
candidates' norms given as an index stores them). Fidelity is
``benchmarks/bench_fidelity.py``'s.

    python -m benchmarks.bench_encode [--quick] [--models ...] [--seq-lens ...]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.bench_common import machine, md_table, write_results
from encoder import products
from encoder.batching import Example, TokenBatch, collate, sequence_example, tokenize_query
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder, sequence_loss
from encoder.memory import auto_batch_size
from encoder.optimizer_state import SecondMoments
from encoder.rescoring import ExactRescorer
from engine.index import DEFAULT_RESCORE

log = logging.getLogger("bench_encode")

GOALS = {"default_ratio_max": 1.25, "paper_ratio_max": 1.5, "exact_ratio_max": 1.0}
"""Encode time over a plain step: the default at 0.8x a training step's tokens/s or better;
the default's exact second stage at one plain step per candidate or less."""
MODELS = {  # name: (n_layer, n_embd, n_head, vocab)
    "gpt2-medium": (24, 1024, 16, 50257),
    "gpt2-small": (12, 768, 12, 50257),
    "gpt2-4x256": (4, 256, 4, 8192),
    "gpt2-6x384": (6, 384, 6, 8192),
    "gpt2-2x128": (2, 128, 2, 4096),
    "tiny-2x64": (2, 64, 2, 1024),
}
NEOX_MODELS = {  # name: (n_layer, hidden, n_head, intermediate, vocab); shapes from the public configs
    "pythia-1b": (16, 2048, 8, 8192, 50304),
    "pythia-tiny": (2, 64, 2, 256, 1024),
}
LLAMA_MODELS = {  # name: LlamaConfig keywords (llama-3.2-1b: benchmarks/bench_plan.py's shape)
    "llama-3.2-1b": None,
    "llama-tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
    },
}
QUERY_TOKENS = 32
"""Tokens of the query whose encode is timed (prompt and completion)."""
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
"""Dense bf16 peak of the GPUs the GPU check runs on (SXM, without sparsity)."""


def corpus_examples(corpus, tokenizer, max_len: int) -> tuple[list[Example], list[Example]]:
    """Training sequences (passage + eos, as trained) and queries of a FactCorpus."""
    eos = tokenizer.eos_token_id
    ids = tokenizer([p.text for p in corpus.passages], add_special_tokens=False)["input_ids"]
    train = [sequence_example(x[:max_len] + [eos]) for x in ids]
    queries = [tokenize_query(tokenizer, q.prompt, q.completion) for q in corpus.queries]
    return train, queries


# -- speed ------------------------------------------------------------------------------
def build_model(name: str, n_positions: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in LLAMA_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        from benchmarks.bench_plan import SHAPES

        keywords = LLAMA_MODELS[name]
        config = SHAPES[name][0] if keywords is None else LlamaConfig(**keywords)
        config.max_position_embeddings = max(n_positions, 2048)
        return LlamaForCausalLM(config).eval()
    if name in NEOX_MODELS:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        n_layer, hidden, n_head, inter, vocab = NEOX_MODELS[name]
        neox = GPTNeoXConfig(
            num_hidden_layers=n_layer,
            hidden_size=hidden,
            num_attention_heads=n_head,
            intermediate_size=inter,
            vocab_size=vocab,
            max_position_embeddings=max(n_positions, 2048),
            rotary_pct=0.25,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        return GPTNeoXForCausalLM(neox).eval()
    n_layer, n_embd, n_head, vocab = MODELS[name]
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def random_second_moments(model) -> SecondMoments:
    """Adam-like v_hat: squared gradients spread over orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    v = {
        n: (torch.randn(p.shape, generator=g) * 1e-3).square() + 1e-10
        for n, p in model.named_parameters()
    }
    return SecondMoments(v_hat=v, eps=1e-8, source="bench-random")


def _mfu(flops_per_s: float, dev: torch.device) -> float | None:
    """flops_per_s over the device's dense bf16 peak (None where the peak is not known)."""
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None if peak is None else flops_per_s / (peak * 1e12)


def plain_step(model, batch: TokenBatch) -> None:
    """A training step's forward and backward (weight gradients summed) on a frozen model."""
    model.requires_grad_(True)
    loss = sequence_loss(model, batch)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    model.requires_grad_(False)


def random_batch(model, seq_len: int, batch_size: int) -> TokenBatch:
    """``batch_size`` sequences of ``seq_len`` random tokens (seeded)."""
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    return collate(
        [
            sequence_example(torch.randint(1, vocab, (seq_len,), generator=g).tolist())
            for _ in range(batch_size)
        ]
    )


def _encoders(model, sm: SecondMoments, k: int, batch: TokenBatch) -> dict[str, TrackStarEncoder]:
    """The product's default (sketch, fitted on ``batch``) and the paper's projection."""
    default = TrackStarEncoder(model, FingerprintConfig())
    if default.needs_fit:  # a whitened default (its values do not change the cost)
        default.fit_basis([batch])
    paper = TrackStarEncoder(
        model,
        FingerprintConfig(k=k, hessian="none", projection="gaussian", correction=True),
        second_moments=sm,
    )
    return {"default": default, "paper": paper}


def _exact_stage(model, default: TrackStarEncoder, batch: TokenBatch) -> Callable[[], object]:
    """The default's exact second stage over ``batch`` as candidates, against its first row
    as the query (every token a target), the candidates' norms given (as served)."""
    rescorer = ExactRescorer(model, FingerprintConfig(), None, default.family.whitening())
    rows = batch.input_ids.cpu().tolist()
    candidates = [sequence_example(r) for r in rows]
    scorer = rescorer.for_query(candidates[0], pad_id=0)
    sq = torch.ones(len(candidates), dtype=torch.float64)
    return lambda: scorer(candidates, sq)


def _time_runs(
    runs: dict[str, Any], repeats: int, dev: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each run (interleaved, so machine noise hits all alike), and the peak
    GPU memory of each (warm-up pass; empty on the CPU)."""

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    peak: dict[str, float] = {}
    for name, fn in runs.items():
        if dev.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        fn()
        if dev.type == "cuda":
            sync()
            peak[name] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}, peak


def speed(
    model_name: str,
    seq_len: int,
    batch_size: int,
    k: int,
    repeats: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Median seconds per batch of the plain step and of each fingerprint, and their ratios.

    ``batch_size`` 0 = auto: the largest batch that fits the free memory for the default
    (``encoder.memory.auto_batch_size``), used for all three.
    """
    model = build_model(model_name, seq_len)
    sm = random_second_moments(model)
    model = model.to(device, dtype).requires_grad_(False)
    dev = torch.device(device)
    auto = None
    if batch_size == 0:
        batch_size, est = auto_batch_size(TrackStarEncoder(model, FingerprintConfig()), seq_len)
        auto = {
            "fixed_MiB": est.fixed / 2**20,
            "per_example_MiB": est.per_example / 2**20,
            "method": est.method,
        }
    batch = random_batch(model, seq_len, batch_size).to(dev)
    query = random_batch(model, QUERY_TOKENS, 1).to(dev)
    encoders = _encoders(model, sm, k, batch)
    runs = {
        "plain": lambda: plain_step(model, batch),
        **{name: (lambda e=enc: e.project(batch)) for name, enc in encoders.items()},
        "exact": _exact_stage(model, encoders["default"], batch),
        "query": lambda: encoders["default"].project(query),
    }
    med, peak = _time_runs(runs, repeats, dev)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = batch_size * seq_len
    # A plain step's arithmetic: ~6 flops per parameter per token (forward 2, backward 4).
    return {
        "model": model_name,
        "params_M": n_params / 1e6,
        "seq_len": seq_len,
        "batch": batch_size,
        "k": k,
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "plain_s": med["plain"],
        "default_d": encoders["default"].dim,
        "default_s": med["default"],
        "default_ratio": med["default"] / med["plain"],
        "paper_d": encoders["paper"].dim,
        "paper_s": med["paper"],
        "paper_ratio": med["paper"] / med["plain"],
        "exact_s": med["exact"],
        "exact_ratio": med["exact"] / med["plain"],
        "query_s": med["query"],
        # A query at the default cap, every candidate scored (the certified stage stops earlier).
        "query_s_at_cap": med["query"] + DEFAULT_RESCORE * med["exact"] / batch_size,
        "tokens_per_s_plain": tokens / med["plain"],
        "tokens_per_s_default": tokens / med["default"],
        "plain_TFLOPs": 6 * n_params * tokens / med["plain"] / 1e12,
        "peak_GiB": peak,
        "auto_batch": auto,
        # Model FLOPs utilization of the default: a plain step's 6 P flops per token.
        "mfu_default": _mfu(6 * n_params * tokens / med["default"], dev),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: a tiny model, two repeats")
    p.add_argument(
        "--models",
        default="gpt2-4x256,gpt2-6x384",
        help=f"comma-separated, of {sorted(MODELS | NEOX_MODELS | LLAMA_MODELS)}",
    )
    p.add_argument(
        "--k", type=int, default=16, help="the paper configuration's k per side (default 16)"
    )
    p.add_argument(
        "--seq-lens", default="128,256", help="comma-separated sequence lengths (default 128,256)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="model weights (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument(
        "--batch",
        default=None,
        help="sequences per batch, or 'auto' (from free memory); default 4 on the CPU, auto on CUDA",
    )
    p.add_argument(
        "--gradient-budget-mb",
        type=int,
        default=None,
        help="MiB of per-example gradients formed at once (default: the encoder's)",
    )
    p.add_argument(
        "--tag", default=None, help="result file suffix (default: the device type if not cpu)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: OpenMP threads collapse on a shared, busy machine)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    if args.gradient_budget_mb:
        products.GRADIENT_BUDGET_BYTES = args.gradient_budget_mb << 20
        products.CUDA_GRADIENT_BUDGET_BYTES = args.gradient_budget_mb << 20
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    )
    batch_arg = args.batch or ("auto" if cuda else "4")
    batch_size = 0 if batch_arg == "auto" else int(batch_arg)
    if args.quick:
        grid, batch_size, repeats = [("tiny-2x64", 32)], 4, 2
    else:
        grid = [(m, int(t)) for m in args.models.split(",") for t in args.seq_lens.split(",")]
        repeats = 10 if cuda else 3
    rows = []
    for model_name, seq_len in grid:
        rows.append(speed(model_name, seq_len, batch_size, args.k, repeats, args.device, dtype))
        log.info("%s", rows[-1])
        if cuda:
            torch.cuda.empty_cache()
    goals = []
    for name, limit, what in (
        ("default", GOALS["default_ratio_max"], "default encode"),
        ("paper", GOALS["paper_ratio_max"], "paper encode"),
        ("exact", GOALS["exact_ratio_max"], "default exact stage per candidate"),
    ):
        worst = max(r[f"{name}_ratio"] for r in rows)
        goals.append(
            {
                "goal": f"{what} <= {limit}x plain fwd+bwd (worst config)",
                "measured": worst,
                "met": worst <= limit,
            }
        )
    payload = {
        "benchmark": "encode",
        "quick": args.quick,
        "machine": machine(),
        "speed": rows,
        "goals": goals,
    }
    cols = [
        "model",
        "params_M",
        "seq_len",
        "batch",
        "plain_s",
        "default_d",
        "default_s",
        "default_ratio",
        "paper_d",
        "paper_s",
        "paper_ratio",
        "exact_s",
        "exact_ratio",
        "tokens_per_s_default",
        "query_s_at_cap",
    ]
    if cuda:
        cols[4:4] = ["dtype", "plain_TFLOPs"]
    md = (
        "# Encoding benchmark\n"
        "Ratios are encode time / plain forward+backward (training step without optimizer) on the same batch, "
        f"median of {repeats} interleaved runs, device {args.device}, weights {dtype} (accumulation float32), "
        f"batch {batch_arg}. `default`: the sketch at its default sizing (budget 2^16, no correction, no projected "
        f"R); `paper`: the Gaussian projection, k={args.k}, correction on; `exact`: the default's exact second "
        "stage scoring the batch as candidates of a query as long as they are, their norms given as stored; "
        f"`query_s_at_cap`: a {QUERY_TOKENS}-token query's encode plus {DEFAULT_RESCORE} candidates (the "
        "default cap) at the exact stage's cost.\n\n"
        + md_table(rows, cols)
        + "\n## Goals\n\n"
        + md_table(goals, ["goal", "measured", "met"])
    )
    tag = args.tag if args.tag is not None else ("" if not cuda else torch.device(args.device).type)
    name = "encode" + ("_quick" if args.quick else "") + (f"_{tag}" if tag else "")
    write_results(name, payload, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
