"""Padding waste and encode throughput of length-sorted batches (the build's ``batches``)
against corpus-order batches, on the demo fact corpus and on a mixed-length corpus (its
passages joined in groups of 1 to 12, like documents of very different sizes), chunked as
the build chunks them. Throughput is the exact encoder's real tokens per second over the
same sequences, both orders interleaved (A/B/A/B), median ratio.

    python -m benchmarks.bench_batching [--size demo|test] [--batch-size 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_common import machine, md_table, write_results
from encoder.batching import collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.model_loading import load_model, load_tokenizer
from encoder.optimizer_state import load_second_moments
from evaluation.corpus import generate_fact_corpus
from evaluation.train import train_fact_model
from indexer.chunking import ChunkConfig, Chunker
from indexer.corpus import Document
from indexer.passes import length_order, padded_tokens

GOAL = 1.05


def _sequences(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    chunker = Chunker(tokenizer, ChunkConfig(seq_len, seq_len, False, True))
    return [
        c.input_ids for c in chunker.chunks(Document(str(i), t, None) for i, t in enumerate(texts))
    ]


def _encode_seconds(encoder, seqs, order, batch_size, pad) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        encoder.encode(collate([sequence_example(seqs[i]) for i in order[s : s + batch_size]], pad))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="test", choices=("test", "demo"), help="corpus and model size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="A/B pairs of the throughput run")
    p.add_argument("--max-sequences", type=int, default=1024, help="sequences encoded per run")
    p.add_argument(
        "--shard-size", type=int, default=256, help="the build sorts within shards of this size"
    )
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    corpus = generate_fact_corpus(args.size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train_fact_model(corpus, Path(tmp), size=args.size, seed=0).checkpoint_dir
        tokenizer, model = load_tokenizer(ckpt), load_model(ckpt, device="cpu")
        seq_len = int(model.config.n_positions)
        texts = [p.text for p in corpus.passages]
        rng = np.random.default_rng(0)
        mixed, i = [], 0
        while i < len(texts):
            n = int(rng.integers(1, 13))
            mixed.append(" ".join(texts[i : i + n]))
            i += n
        encoder = TrackStarEncoder(
            model,
            FingerprintConfig(k=16, hessian="none", projection="gaussian", correction=True),
            second_moments=load_second_moments(ckpt, model),
        )
        pad = int(tokenizer.pad_token_id or 0)
        rows = []
        for name, docs in (("demo corpus", texts), ("mixed-length corpus", mixed)):
            seqs = _sequences(tokenizer, docs, seq_len)[: args.max_sequences]
            lengths = np.array([len(s) for s in seqs])
            real = int(lengths.sum())
            shards = [
                (a, min(a + args.shard_size, len(seqs)))
                for a in range(0, len(seqs), args.shard_size)
            ]
            before = (
                sum(
                    padded_tokens(lengths[a:b], args.batch_size, by_length=False) for a, b in shards
                )
                / real
            )
            after = sum(padded_tokens(lengths[a:b], args.batch_size) for a, b in shards) / real
            corpus_order = np.arange(len(seqs))
            sorted_order = np.concatenate([a + length_order(lengths[a:b]) for a, b in shards])
            ratios = []
            for _ in range(args.rounds):
                a = _encode_seconds(encoder, seqs, corpus_order, args.batch_size, pad)
                b = _encode_seconds(encoder, seqs, sorted_order, args.batch_size, pad)
                ratios.append(a / b)
            rows.append(
                {
                    "corpus": name,
                    "sequences": len(seqs),
                    "mean_len": float(lengths.mean()),
                    "padded_over_real_before": before,
                    "padded_over_real_after": after,
                    "goal": GOAL,
                    "met": "yes" if after <= GOAL else "no",
                    "throughput_gain": float(np.median(ratios)),
                    "gain_range": f"{min(ratios):.3f}-{max(ratios):.3f}",
                }
            )
    md = (
        "# Length-sorted batches\n\n"
        + md_table(
            rows,
            [
                "corpus",
                "sequences",
                "mean_len",
                "padded_over_real_before",
                "padded_over_real_after",
                "goal",
                "met",
                "throughput_gain",
                "gain_range",
            ],
        )
        + f"\nModel: the {args.size}-size fact GPT-2, exact encoder, k=16, batch {args.batch_size}, sorted within shards of {args.shard_size}, 1 thread. "
        "throughput_gain = corpus-order seconds / length-sorted seconds, median of the A/B pairs.\n"
    )
    write_results(
        "batching",
        {"machine": machine(), "args": vars(args) | {"out_dir": str(args.out_dir)}, "rows": rows},
        md,
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
