"""Shared helpers of the indexer tests: the repository root, re-chunk a corpus like a build did."""

from __future__ import annotations

from pathlib import Path

from indexer.chunking import ChunkConfig, Chunker
from indexer.corpus import read_corpus
from indexer.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]


def rechunk(manifest: Manifest, corpus: Path, tokenizer) -> list[list[int]]:
    """Token ids of every sequence, chunked as the manifest says."""
    c = manifest.corpus
    chunker = Chunker(
        tokenizer, ChunkConfig(c["seq_len"], c["stride"], c["packing"], c["append_eos"])
    )
    return [ch.input_ids for ch in chunker.chunks(read_corpus(corpus))]
