"""Encoding speed and factored-path fidelity (issue 7, "Encoding").

Speed: time to encode one batch (``TrackStarEncoder.project``: forward, backward, per-module
correction + projection) against a plain forward+backward on the same batch and model
(a training step without optimizer: parameters require grad, weight gradients summed),
for the exact and factored paths, at two model sizes and two sequence lengths. The ratio is
the cost of fingerprinting relative to training on the same tokens.

Fidelity: Spearman correlation of factored vs exact influence scores (e_q . e_t) and top-10
overlap per query on the fact corpus with its trained model (demo size; test size with
``--quick``), both paths whitened with their own R_train.

    python -m benchmarks.bench_encode [--quick] [--demo-checkpoint DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.bench_common import machine, md_table, write_results
from encoder import products
from encoder.batching import Example, TokenBatch, collate, sequence_example, tokenize_query
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder, sequence_loss
from encoder.memory import auto_batch_size
from encoder.optimizer_state import SecondMoments
from encoder.whitening import Whitener

log = logging.getLogger("bench_encode")

GOALS = {"exact_ratio_max": 1.5, "factored_ratio_max": 1.0, "spearman_min": 0.95}
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
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
"""Dense bf16 peak of the GPUs the GPU check runs on (SXM, without sparsity)."""


# -- fidelity ---------------------------------------------------------------------------
def corpus_examples(corpus, tokenizer, max_len: int) -> tuple[list[Example], list[Example]]:
    """Training sequences (passage + eos, as trained) and queries of a FactCorpus."""
    eos = tokenizer.eos_token_id
    ids = tokenizer([p.text for p in corpus.passages], add_special_tokens=False)["input_ids"]
    train = [sequence_example(x[:max_len] + [eos]) for x in ids]
    queries = [tokenize_query(tokenizer, q.prompt, q.completion) for q in corpus.queries]
    return train, queries


def _encode_all(
    enc: TrackStarEncoder, examples: list[Example], batch_size: int = 32
) -> torch.Tensor:
    return torch.cat(
        [
            enc.project(collate(examples[i : i + batch_size]))
            for i in range(0, len(examples), batch_size)
        ]
    )


def influence_scores(
    model, sm: SecondMoments, train, queries, *, mode: str, k: int, hessian: str
) -> np.ndarray:
    """Influence scores [Q, N] of every query on every training sequence for one mode."""
    cfg = FingerprintConfig(k=k, hessian=hessian, mode=mode, projection="gaussian", correction=True)
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    phi_train, phi_query = _encode_all(enc, train), _encode_all(enc, queries)
    if hessian != "none":
        st = enc.new_statistics()
        st.update(phi_train)
        enc.set_whitener(
            Whitener.from_statistics(
                st, None, lambda_=0.0, lambda_component=cfg.lambda_component, delta=cfg.delta
            )
        )
    return (enc.finalize(phi_query) @ enc.finalize(phi_train).T).double().cpu().numpy()


def fidelity(
    model, sm: SecondMoments, train, queries, *, k: int = 16, hessian: str = "train"
) -> dict[str, float]:
    """Factored vs exact influence scores.

    Returns:
        spearman_mean (mean over queries of the rank correlation over all training
        sequences), spearman_pooled (over all query x train pairs), top10_overlap (mean
        |top10_exact & top10_factored| / 10), n_train, n_queries.
    """
    exact = influence_scores(model, sm, train, queries, mode="exact", k=k, hessian=hessian)
    fact = influence_scores(model, sm, train, queries, mode="factored", k=k, hessian=hessian)
    per_query = [spearmanr(e, f).statistic for e, f in zip(exact, fact, strict=True)]
    top = min(10, exact.shape[1])
    te, tf = np.argsort(-exact, axis=1)[:, :top], np.argsort(-fact, axis=1)[:, :top]
    overlap = [len(set(a) & set(b)) / top for a, b in zip(te, tf, strict=True)]
    return {
        "spearman_mean": float(np.mean(per_query)),
        "spearman_min_query": float(np.min(per_query)),
        "spearman_pooled": float(spearmanr(exact.ravel(), fact.ravel()).statistic),
        "top10_overlap": float(np.mean(overlap)),
        "n_train": int(exact.shape[1]),
        "n_queries": int(exact.shape[0]),
    }


def demo_fidelity(size: str, checkpoint: Path | None, k: int) -> dict[str, Any]:
    from encoder.model_loading import load_model, load_tokenizer
    from encoder.optimizer_state import load_second_moments
    from evaluation.corpus import generate_fact_corpus
    from evaluation.train import train_fact_model

    corpus = generate_fact_corpus(size, seed=0)
    if checkpoint is None:
        t0 = time.perf_counter()
        checkpoint = train_fact_model(
            corpus, Path(tempfile.mkdtemp(prefix="bench_encode_")), size=size
        ).checkpoint_dir
        log.info("trained the %s model in %.0fs", size, time.perf_counter() - t0)
    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    sm = load_second_moments(checkpoint, model)
    train, queries = corpus_examples(corpus, tokenizer, max_len=model.config.n_positions - 1)
    out = {"corpus": size, "k": k, "hessian": "train"}
    for hessian in ("train", "none"):
        out[f"hessian_{hessian}"] = fidelity(model, sm, train, queries, k=k, hessian=hessian)
    return out


# -- speed ------------------------------------------------------------------------------
def build_model(name: str, n_positions: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in NEOX_MODELS:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        n_layer, hidden, n_head, inter, vocab = NEOX_MODELS[name]
        neox = GPTNeoXConfig(num_hidden_layers=n_layer, hidden_size=hidden, num_attention_heads=n_head,
                             intermediate_size=inter, vocab_size=vocab, max_position_embeddings=max(n_positions, 2048),
                             rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
        return GPTNeoXForCausalLM(neox).eval()
    n_layer, n_embd, n_head, vocab = MODELS[name]
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
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


def _train_step(model, batch: TokenBatch) -> None:
    loss = sequence_loss(model, batch)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def speed(
    model_name: str,
    seq_len: int,
    batch_size: int,
    k: int,
    repeats: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Median seconds per batch of the plain step, exact and factored encoders, and ratios.

    ``batch_size`` 0 = auto: the largest batch that fits the free memory for the exact path
    (``encoder.memory.auto_batch_size``), used for all three.
    """
    model = build_model(model_name, seq_len)
    sm = random_second_moments(model)
    model = model.to(device, dtype)
    dev = torch.device(device)
    encoders = {
        mode: TrackStarEncoder(
            model.requires_grad_(False),
            # A fitted basis has the Gaussian's shapes, hence its cost: no basis pass here.
            FingerprintConfig(k=k, hessian="none", mode=mode, projection="gaussian", correction=True),
            second_moments=sm,
        )
        for mode in ("exact", "factored")
    }
    auto = None
    if batch_size == 0:
        batch_size, est = auto_batch_size(encoders["exact"], seq_len)
        auto = {"fixed_MiB": est.fixed / 2**20, "per_example_MiB": est.per_example / 2**20, "method": est.method}
    g = torch.Generator().manual_seed(1)
    batch = collate([sequence_example(torch.randint(1, model.config.vocab_size, (seq_len,), generator=g).tolist())
                     for _ in range(batch_size)]).to(dev)  # fmt: skip

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def plain() -> None:
        model.requires_grad_(True)
        _train_step(model, batch)
        model.requires_grad_(False)

    # The K-FAC-whitened families at their default sizing (budget 2^16, no correction): kfac
    # folds the whitening into Kronecker pairs; sketch forms each whitened G_W and hashes it.
    # The whitening is fitted on the batch itself: its values do not change the cost.
    for family in ("kfac", "sketch"):
        enc = TrackStarEncoder(model, FingerprintConfig(hessian="none", projection=family))
        enc.fit_basis([batch])
        encoders[family] = enc
    runs = {"plain": plain, "exact": lambda: encoders["exact"].project(batch),
            "factored": lambda: encoders["factored"].project(batch),
            "kfac": lambda: encoders["kfac"].project(batch), "sketch": lambda: encoders["sketch"].project(batch)}  # fmt: skip
    peak: dict[str, float] = {}
    for name, fn in runs.items():  # warm-up (and peak memory per path on CUDA)
        if dev.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        fn()
        if dev.type == "cuda":
            sync()
            peak[name] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved so that machine noise hits all three alike
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    # A plain step's arithmetic: ~6 flops per parameter per token (forward 2, backward 4).
    tflops = 6 * n_params * batch_size * seq_len / med["plain"] / 1e12
    return {
        "model": model_name, "params_M": n_params / 1e6, "seq_len": seq_len, "batch": batch_size, "k": k,
        "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
        "d": encoders["exact"].dim, "plain_s": med["plain"], "exact_s": med["exact"], "factored_s": med["factored"],
        "exact_ratio": med["exact"] / med["plain"], "factored_ratio": med["factored"] / med["plain"],
        "factored_speedup_vs_exact": med["exact"] / med["factored"],
        "kfac_d": encoders["kfac"].dim, "kfac_s": med["kfac"], "kfac_ratio": med["kfac"] / med["plain"],
        "sketch_d": encoders["sketch"].dim, "sketch_s": med["sketch"], "sketch_ratio": med["sketch"] / med["plain"],
        "tokens_per_s_exact": batch_size * seq_len / med["exact"],
        "tokens_per_s_factored": batch_size * seq_len / med["factored"],
        "plain_TFLOPs": tflops, "peak_GiB": peak, "auto_batch": auto,
        # Model FLOPs utilization of the exact path: a plain step's 6 P flops per token.
        "mfu_exact": _mfu(6 * n_params * batch_size * seq_len / med["exact"], dev),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny model, test corpus")
    p.add_argument(
        "--demo-checkpoint",
        type=Path,
        default=None,
        help="trained demo checkpoint (else trained here)",
    )
    p.add_argument(
        "--corpus-size",
        choices=("test", "demo"),
        default=None,
        help="fact corpus for the fidelity part (default: demo; test with --quick)",
    )
    p.add_argument(
        "--models", default="gpt2-4x256,gpt2-6x384", help=f"comma-separated, of {sorted(MODELS | NEOX_MODELS)}"
    )
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seq-lens", default="128,256", help="comma-separated sequence lengths")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model weights (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--batch", default=None,
                   help="sequences per batch, or 'auto' (from free memory); default 4 on the CPU, auto on CUDA")
    p.add_argument("--no-fidelity", action="store_true", help="speed only")
    p.add_argument("--gradient-budget-mb", type=int, default=None,
                   help="exact path: MiB of per-example gradients formed at once (default: encoder's)")
    p.add_argument("--tag", default=None, help="result file suffix (default: the device type if not cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: OpenMP threads collapse on a shared, busy machine)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    cuda = torch.device(args.device).type == "cuda"
    if args.gradient_budget_mb:
        products.GRADIENT_BUDGET_BYTES = args.gradient_budget_mb << 20
        products.CUDA_GRADIENT_BUDGET_BYTES = args.gradient_budget_mb << 20
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    batch_arg = args.batch or ("auto" if cuda else "4")
    batch_size = 0 if batch_arg == "auto" else int(batch_arg)
    if args.quick:
        grid, batch_size, repeats, size = [("tiny-2x64", 32)], 4, 2, "test"
    else:
        seq_lens = [int(t) for t in args.seq_lens.split(",")]
        grid = [(m, t) for m in args.models.split(",") for t in seq_lens]
        repeats, size = (10 if cuda else 3), "demo"
    rows = []
    for model_name, seq_len in grid:
        rows.append(speed(model_name, seq_len, batch_size, args.k, repeats, args.device, dtype))
        log.info("%s", rows[-1])
        if cuda:
            torch.cuda.empty_cache()
    size = args.corpus_size or size
    fid: dict[str, Any] = {"skipped": True}
    if not args.no_fidelity:
        fid = demo_fidelity(size, args.demo_checkpoint, args.k)
        log.info("fidelity: %s", fid)

    worst_exact = max(r["exact_ratio"] for r in rows)
    worst_fact = max(r["factored_ratio"] for r in rows)
    goals = [
        {"goal": "exact encode <= 1.5x plain fwd+bwd (worst config)", "measured": worst_exact, "met": worst_exact <= GOALS["exact_ratio_max"]},
        {"goal": "factored encode <= 1.0x plain fwd+bwd (worst config)", "measured": worst_fact, "met": worst_fact <= GOALS["factored_ratio_max"]},
    ]  # fmt: skip
    if not args.no_fidelity:
        rho = fid["hessian_train"]["spearman_mean"]
        goals.append({"goal": "Spearman factored vs exact >= 0.95 (mean over queries)", "measured": rho,
                      "met": rho >= GOALS["spearman_min"]})  # fmt: skip
    payload = {
        "benchmark": "encode",
        "quick": args.quick,
        "machine": machine(),
        "speed": rows,
        "fidelity": fid,
        "goals": goals,
    }
    cols = [
        "model",
        "params_M",
        "seq_len",
        "batch",
        "d",
        "plain_s",
        "exact_s",
        "factored_s",
        "exact_ratio",
        "factored_ratio",
        "factored_speedup_vs_exact",
        "kfac_d",
        "kfac_ratio",
        "sketch_d",
        "sketch_ratio",
    ]
    if cuda:
        cols[4:4] = ["dtype", "plain_TFLOPs"]
        cols += ["tokens_per_s_factored"]
    fid_md = ""
    if not args.no_fidelity:
        fid_rows = [{"hessian": h, **fid[f"hessian_{h}"]} for h in ("train", "none")]
        fid_md = (f"\n## Factored vs exact influence scores ({size} fact corpus, trained model)\n\n"
                  + md_table(fid_rows, ["hessian", "spearman_mean", "spearman_min_query", "spearman_pooled", "top10_overlap", "n_train", "n_queries"]))  # fmt: skip
    md = (
        "# Encoding benchmark\n"
        f"Ratios are encode time / plain forward+backward (training step without optimizer) on the same batch, "
        f"median of {repeats} interleaved runs, k={args.k}, correction on, device {args.device}, weights {dtype} "
        f"(accumulation float32), batch {batch_arg}. `kfac` / `sketch`: the K-FAC-whitened families at their "
        "default sizing (budget 2^16; no correction, no projected R).\n\n"
        + md_table(rows, cols) + fid_md
        + "\n## Goals\n\n" + md_table(goals, ["goal", "measured", "met"])
    )  # fmt: skip
    tag = args.tag if args.tag is not None else ("" if not cuda else torch.device(args.device).type)
    name = "encode" + ("_quick" if args.quick else "") + (f"_{tag}" if tag else "")
    write_results(name, payload, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
