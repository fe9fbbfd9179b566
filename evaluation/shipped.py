"""The product as served, as an evaluation method (``shipped``).

``influence index build`` at its defaults over the evaluation's corpus (the build's own
chunking, basis sample, FAISS and stored norms), then every query through the engine
(``engine.batch.run_batch`` at the index's defaults: the first stage, then the certified exact
second stage), exactly as ``influence serve`` answers it. The other gradient methods are
computed by brute force over the evaluation's own fingerprints; this row is the pipeline
users get, so the README's numbers for the default come from it.

A hit is mapped back to the evaluation's passage by its ``document_id``; a passage split
into several sequences counts at its best-ranked one.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from encoder.config import FingerprintConfig
from engine.batch import run_batch
from engine.index import InfluenceIndex
from engine.query import Limits, Query
from evaluation.inputs import Run, read_corpus
from indexer.build import run_build
from indexer.build_config import BuildConfig

log = logging.getLogger(__name__)

QUERY_BATCH = 16
"""Queries per ``run_batch`` call (one encode pass)."""


def rank_shipped(
    run: Run, depth: int, projection: str | None = None, whiten: bool = False
) -> np.ndarray:
    """The served rankings of every query: [Q, depth] passage rows, -1 where the index
    returned fewer distinct passages. ``projection`` / ``whiten``: another fingerprint than
    the default's, at the build's defaults otherwise (``shipped_cosine``: the Gaussian family
    without correction or R, whose exact stage is the plain gradient cosine;
    ``shipped_whitened``: the K-FAC-whitened sketch, whose exact stage is the whitened one)."""
    fingerprint = replace(FingerprintConfig(), seed=run.settings.seed, whiten=whiten)
    if projection is not None:
        fingerprint = replace(fingerprint, projection=projection)
    with tempfile.TemporaryDirectory(prefix="influence-eval-") as tmp:
        out = Path(tmp) / "index"
        cfg = BuildConfig(
            model=run.model_dir, corpus=run.corpus_path, out=out, fingerprint=fingerprint
        )
        run_build(cfg)
        index = InfluenceIndex.open(out)
        try:
            return rank_with(index, run, depth)
        finally:
            index.close()


def rank_with(index: InfluenceIndex, run: Run, depth: int) -> np.ndarray:
    """[Q, depth] passage rows of ``run``'s queries as ``index`` answers them at its
    defaults (``rank_shipped``; a test compares it with an index built on its own)."""
    passage_ids, _ = read_corpus(run.corpus_path)
    row_of = {pid: i for i, pid in enumerate(passage_ids)}
    limits = Limits(max_prompt_tokens=1 << 20, max_completion_tokens=1 << 20)
    rankings = np.full((len(run.queries), depth), -1, dtype=np.int64)
    for s in range(0, len(run.queries), QUERY_BATCH):
        chunk = run.queries[s : s + QUERY_BATCH]
        outcomes = run_batch(index, [Query(q.prompt, q.completion, depth) for q in chunk], limits)
        for qi, outcome in enumerate(outcomes, start=s):
            if outcome.error is not None:
                raise outcome.error
            rows = list(dict.fromkeys(row_of[h.record.document_id] for h in outcome.hits))
            rankings[qi, : len(rows[:depth])] = rows[:depth]
    return rankings
