"""Shared helpers of the indexer tests: run the CLI, re-chunk a corpus like a build did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from indexer.chunking import ChunkConfig, Chunker
from indexer.corpus import read_corpus

REPO = Path(__file__).resolve().parents[2]


def influence(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m indexer ...`` (the same commands as ``influence``) in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "indexer", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def rechunk(manifest: dict, corpus: Path, tokenizer) -> list[list[int]]:
    """Token ids of every sequence, chunked as the manifest says."""
    c = manifest["corpus"]
    chunker = Chunker(tokenizer, ChunkConfig(c["seq_len"], c["stride"], c["packing"], c["append_eos"]))
    return [ch.input_ids for ch in chunker.chunks(read_corpus(corpus))]
