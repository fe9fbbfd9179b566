"""Shared fixtures: tiny models built in code, artifacts built once per session."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_gpt2(
    seed: int = 0, *, n_embd: int = 8, n_layer: int = 2, vocab: int = 40, dtype=torch.float32
):
    """A randomly initialized, frozen GPT-2 small enough for dense references."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(dtype)
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_model():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def fact_corpus():
    """The test-size synthetic fact corpus (evaluation.corpus)."""
    from evaluation.corpus import generate_fact_corpus

    return generate_fact_corpus("test", seed=0)


@pytest.fixture(scope="session")
def fact_corpus_files(fact_corpus, tmp_path_factory):
    """(corpus.jsonl, queries.jsonl) of the test-size corpus."""
    return fact_corpus.write(tmp_path_factory.mktemp("fact_corpus"))


@pytest.fixture(scope="session")
def trained_checkpoint(fact_corpus, tmp_path_factory):
    """A test-size GPT-2 trained on the fact corpus with HF Trainer + AdamW, once per
    session: a real Trainer checkpoint directory (model, tokenizer, optimizer.pt)."""
    from evaluation.train import train_fact_model

    result = train_fact_model(fact_corpus, tmp_path_factory.mktemp("trained"), size="test", seed=0)
    return result


PAPER_TRACKSTAR = {"projection": "gaussian", "correction": True, "hessian": "mixed"}
"""The paper's TrackStar (Gaussian projection, optimizer correction, mixed R): the reference
path ``paper_index`` exercises."""

TINY_INDEX_CLI_OPTIONS = ("--shard-size", "16", "--batch-size", "8")
"""`influence index build` options that reproduce `tiny_index` (the default fingerprint)."""

PAPER_INDEX_CLI_OPTIONS = (
    "-k",
    "8",
    *TINY_INDEX_CLI_OPTIONS,
    "--projection",
    "gaussian",
    "--correction",
    "--hessian",
    "mixed",
)
"""`influence index build` options that reproduce `paper_index` (with its --queries file)."""


def _build(checkpoint, corpus, out, fingerprint, queries=None):
    from indexer.build import BuildConfig, run_build

    cfg = BuildConfig(
        model=checkpoint,
        corpus=corpus,
        queries=queries,
        out=out,
        fingerprint=fingerprint,
        shard_size=16,
        batch_size=8,
    )
    return run_build(cfg)


@pytest.fixture(scope="session")
def tiny_index(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    """The product as shipped: a built exact (Flat) index of the default fingerprint (the
    sketch, its whitening fitted on the corpus, the exact second stage on by default) on the
    trained test model and the fact corpus: the index directory Path."""
    from encoder.config import FingerprintConfig

    out = tmp_path_factory.mktemp("tiny_index") / "index"
    return _build(trained_checkpoint.checkpoint_dir, fact_corpus_files[0], out, FingerprintConfig())


@pytest.fixture(scope="session")
def paper_index(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    """The paper's TrackStar as the reference path: k=8 Gaussian pairs, the optimizer
    correction and mixed R (R_eval from the query file): the index directory Path."""
    from encoder.config import FingerprintConfig

    corpus, queries = fact_corpus_files
    out = tmp_path_factory.mktemp("paper_index") / "index"
    return _build(
        trained_checkpoint.checkpoint_dir,
        corpus,
        out,
        FingerprintConfig(k=8, **PAPER_TRACKSTAR),
        queries,
    )
