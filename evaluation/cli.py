"""``influence eval``: the fact-tracing evaluation as a command (CLI edge: progress bars)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from evaluation.corpus import QUERIES_SCHEMA
from evaluation.settings import EvalSettings
from indexer.options import add_flags, from_flags

TRAIN_SIZES = ("test", "demo", "deep")
"""``evaluation.train.SPECS`` (not imported here: ``--help`` stays light)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``train`` subcommands to the ``influence`` dispatcher."""
    _register_train(subparsers)
    p = subparsers.add_parser(
        "eval",
        help="fact-tracing evaluation: TrackStar, ablations, BM25, hybrid; MRR, recall@10, tail-patch",
        description="Rank every training sequence for every fact query with each method, "
        "then write eval.json, eval.md and eval.png into --out.",
        epilog=f'--corpus: one JSON object per line, {{"id": ..., "text": str}}. --queries: {QUERIES_SCHEMA}.',
    )
    p.add_argument(
        "--model", required=True, type=Path, help="Trainer checkpoint directory (with optimizer.pt)"
    )
    p.add_argument(
        "--corpus", required=True, type=Path, help="corpus.jsonl the model was trained on"
    )
    p.add_argument(
        "--queries",
        required=True,
        type=Path,
        help="queries.jsonl: prompt, completion, relevant_ids (corpus ids), optional fact_id",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--stem", default="eval", help="output file stem (default: eval)")
    add_flags(p, EvalSettings)  # every EvalSettings field, from its docstring
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run once per projection seed and report mean and spread (overrides --seed)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: tiny matmuls, shared cores)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace, settings: EvalSettings) -> str:
    """The command that reproduces this run, every setting spelled out (for the report)."""
    s = settings
    parts = [
        "influence",
        "eval",
        "--model",
        str(args.model),
        "--corpus",
        str(args.corpus),
        "--queries",
        str(args.queries),
        "--out",
        str(args.out),
        "--stem",
        args.stem,
        *(["--k", str(s.k)] if s.k is not None else []),
        "--projection",
        s.projection,
        *(["--seeds", *map(str, args.seeds)] if args.seeds else ["--seed", str(s.seed)]),
        "--batch-size",
        str(s.batch_size),
        "--tailpatch-lr",
        f"{s.tailpatch_lr:g}",
        "--tailpatch-optimizer",
        s.tailpatch_optimizer,
        "--methods",
        *s.methods,
    ]
    if s.max_queries is not None:
        parts += ["--max-queries", str(s.max_queries)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and write the report; returns the exit code."""
    import torch
    from tqdm import tqdm

    from evaluation.report import write_report
    from evaluation.results import combine_seeds
    from evaluation.run import run_evaluation

    settings: EvalSettings = from_flags(EvalSettings, args)
    seeds = args.seeds or [settings.seed]
    settings = replace(settings, seed=seeds[0])

    def progress(desc: str, total: int) -> tqdm:  # noqa: F821 (imported above)
        return tqdm(total=total, desc=desc, unit="seq", disable=args.no_progress, file=sys.stderr)

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        result = combine_seeds(
            [
                run_evaluation(
                    args.model, args.corpus, args.queries, replace(settings, seed=s), progress
                )
                for s in seeds
            ]
        )
    finally:
        torch.set_num_threads(previous)
    for path in write_report(
        result, args.out, stem=args.stem, command=command_line(args, settings)
    ):
        print(path)
    return 0


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the tiny GPT-2 (HF Trainer + AdamW) on any JSONL corpus and check what it learned",
        description="Train a byte-level BPE tokenizer and a GPT-2 on the corpus texts (one text = one "
        "training sequence, eos appended) and save a Trainer checkpoint with optimizer.pt, ready for "
        "`influence index build` and `influence eval`. With --queries, report the fact accuracy: the "
        "share of queries whose completion greedy decoding reproduces after the prompt.",
        epilog=f'--corpus: one JSON object per line, {{"id": ..., "text": str}}. --queries: {QUERIES_SCHEMA}.',
    )
    p.add_argument("--corpus", required=True, type=Path, help="corpus.jsonl to train on")
    p.add_argument(
        "--queries", type=Path, default=None, help="queries.jsonl whose fact accuracy to report"
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output directory (the checkpoint lands in out/checkpoint-N)",
    )
    p.add_argument(
        "--size",
        choices=TRAIN_SIZES,
        default="demo",
        help="model size: test (2 x 64), demo (2 x 128), deep (6 x 256); default demo",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the size's)")
    p.add_argument(
        "--seed", type=int, default=0, help="initialization and data-order seed (default 0)"
    )
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="exit 1 when the fact accuracy on --queries is below this (e.g. 0.8)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Train on the corpus, print the checkpoint and the fact accuracy; returns the exit code."""
    import json

    from api.errors import InputError
    from evaluation.corpus import FactCorpus, Passage, load_queries
    from evaluation.inputs import read_corpus

    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {args.epochs}")
    if args.min_accuracy is not None and not 0.0 <= args.min_accuracy <= 1.0:
        raise InputError(f"--min-accuracy must lie in [0, 1], got {args.min_accuracy}")
    ids, texts = read_corpus(args.corpus)
    if not texts:
        raise InputError(f"{args.corpus} holds no texts", code="invalid_corpus")
    queries = load_queries(args.queries) if args.queries is not None else []
    corpus = FactCorpus(
        [Passage(i, t, "corpus") for i, t in zip(ids, texts, strict=True)], queries, seed=args.seed
    )
    from evaluation.train import train_fact_model

    result = train_fact_model(
        corpus,
        args.out,
        size=args.size,
        seed=args.seed,
        epochs=args.epochs,
        progress=not args.no_progress,
    )
    summary = {
        "checkpoint": str(result.checkpoint_dir),
        "size": args.size,
        "sequences": len(texts),
        "train_seconds": round(result.train_seconds, 1),
        "final_loss": result.final_loss,
        "queries": len(queries),
        "fact_accuracy": result.fact_accuracy if queries else None,
    }
    Path(args.out, "train.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    if queries and args.min_accuracy is not None and result.fact_accuracy < args.min_accuracy:
        print(
            f"influence train: fact accuracy {result.fact_accuracy:.3f} is below --min-accuracy "
            f"{args.min_accuracy:g}: train longer (--epochs) or larger (--size)",
            file=sys.stderr,
        )
        return 1
    return 0
