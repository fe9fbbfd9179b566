"""Exact (Flat) index: stored fingerprints and search scores against the encoder itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from api.errors import NotFoundError
from encoder.batching import collate, sequence_example
from engine.index import InfluenceIndex, OpenOptions
from indexer.__main__ import main
from indexer.passes import length_order, shard_ranges
from service.cli import main as influence_main
from tests.indexer.helpers import rechunk
from tests.tolerances import (
    assert_within,
    dot_bound,
    gamma,
    recompute_bound,
    rounding_bound,
    storage_bound,
)


@pytest.fixture(scope="module")
def opened(tiny_index):
    idx = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    yield idx
    idx.close()


def test_stored_fingerprints_are_the_encoders(opened, fact_corpus_files):
    seqs = rechunk(opened.manifest, fact_corpus_files[0], opened.tokenizer)
    assert len(seqs) == opened.size == opened.manifest.sequences
    pad = int(opened.tokenizer.pad_token_id)
    bs, shard_size = opened.manifest.build["batch_size"], opened.manifest.build["shard_size"]
    enc = np.empty((len(seqs), opened.encoder.dim), dtype=np.float32)
    for start, stop in shard_ranges(
        len(seqs), shard_size
    ):  # the build's batches: by length per shard
        order = start + length_order(np.array([len(s) for s in seqs[start:stop]]))
        for i in range(0, len(order), bs):
            rows = order[i : i + bs]
            enc[rows] = opened.encoder.encode(
                collate([sequence_example(seqs[r]) for r in rows], pad)
            ).numpy()
    stored = np.asarray(opened.fingerprints, dtype=np.float32)
    # Unit norm up to the float32 sum of squares and the square root (d + 1 roundings).
    assert_within(np.linalg.norm(enc, axis=1), 1.0, gamma(enc.shape[1] + 1), "norms")
    assert_within(stored, enc, rounding_bound(enc), "float16 storage")
    # Flat search scores are the dot products of the query with the encoder's fingerprints.
    q = opened.encode_queries(
        [("Drorex is headquartered in", " Dutrus"), ("Cara Nalkun works for", " Buneco")]
    )
    scores, ids = opened.search(q, 10)
    take = lambda m: np.take_along_axis(m, ids, axis=1)  # noqa: E731
    exact_bound = take(dot_bound(q, stored))
    assert_within(scores, take(q @ enc.T), exact_bound + take(storage_bound(q, enc)), "vs encoder")
    assert_within(scores, take(q @ stored.T), exact_bound, "vs stored")
    brute = np.argsort(-(q @ stored.T), axis=1, kind="stable")[:, :10]
    assert_within(
        scores, np.take_along_axis(q @ stored.T, brute, axis=1), exact_bound, "vs brute force"
    )


def test_search_pads_and_examples(opened):
    q = opened.encode_queries([("Drorex is headquartered in", " Dutrus")])
    scores, ids = opened.search(q, opened.size + 3)
    assert (ids[0, -3:] == -1).all() and np.isneginf(scores[0, -3:]).all()
    assert sorted(ids[0, : opened.size].tolist()) == list(range(opened.size))
    rec = opened.example(int(ids[0, 0]))
    assert rec.id == int(ids[0, 0]) and rec.text and rec.document_id
    with pytest.raises(NotFoundError):
        opened.example(opened.size)


def test_query_cli_json_matches_brute_force(opened, tiny_index, capsys):
    prompt, completion = "Cara Nalkun works for", " Buneco"
    rc = influence_main(
        [
            "query",
            "--index",
            str(tiny_index),
            "--prompt",
            prompt,
            "--completion",
            completion,
            "-k",
            "7",
            "--json",
            "--device",
            "cpu",
            "--rescore",
            "0",  # the first stage against brute force (the second stage: test_certified)
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)["results"]
    q = opened.encode_queries([(prompt, completion)])[0]
    brute = np.asarray(opened.fingerprints, dtype=np.float32) @ q
    order = np.argsort(-brute, kind="stable")[:7]
    assert [r["rank"] for r in rows] == list(range(1, 8))
    assert [r["id"] for r in rows] == order.tolist()
    stored = np.asarray(opened.fingerprints, dtype=np.float32)[order]
    assert_within(
        [r["score"] for r in rows], brute[order], dot_bound(q[None], stored)[0], "CLI scores"
    )
    recs = opened.examples(order.tolist())
    assert [r["text"] for r in rows] == [x.text for x in recs]
    assert {"source", "document_id"} <= set(rows[0])


def test_published_index_is_world_readable(tiny_index):
    """Served by other users (a non-root container): no artifact may be private."""
    for path in [tiny_index, *tiny_index.rglob("*")]:
        assert path.stat().st_mode & 0o444 == 0o444, path


def test_build_writes_a_checksummed_bm25_index(opened, tiny_index, tmp_path, caplog):
    """bm25/ is published with the index (listed in the manifest's checksums), so the service
    loads it instead of building one on its first bm25/hybrid query."""
    import logging
    import shutil

    from indexer import manifest as mf
    from indexer.bm25 import BM25Index

    listed = [name for name in mf.read_manifest(tiny_index)["files"] if name.startswith("bm25/")]
    assert "bm25/ids.npy" in listed and len(listed) >= 3
    with caplog.at_level(logging.INFO, logger="indexer.bm25"):
        reopened = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    assert "building BM25" not in caplog.text
    served = reopened.lexical
    reopened.close()
    texts = [r.text for r in opened.examples(list(range(opened.size)))]
    fresh = BM25Index.build(texts, np.arange(opened.size))
    queries = ["Drorex is headquartered in Dutrus", "Cara Nalkun works for Buneco"]
    for got, want in zip(served.search(queries, 10), fresh.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)

    copy = tmp_path / "copy"
    shutil.copytree(tiny_index, copy)
    victim = copy / listed[-1]
    victim.write_bytes(victim.read_bytes() + b" ")
    assert main(["verify", str(copy)]) == 2


def test_vectors_do_not_depend_on_the_batching(opened, fact_corpus_files):
    """Corpus-order batches of 3 and one sequence at a time give the stored (length-batched)
    fingerprints up to float32 batch-shape noise and float16 storage."""
    seqs = rechunk(opened.manifest, fact_corpus_files[0], opened.tokenizer)[:24]
    pad = int(opened.tokenizer.pad_token_id)
    stored = np.asarray(opened.fingerprints[: len(seqs)], dtype=np.float32)
    for bs in (1, 3):
        enc = np.concatenate(
            [
                opened.encoder.encode(
                    collate([sequence_example(s) for s in seqs[i : i + bs]], pad)
                ).numpy()
                for i in range(0, len(seqs), bs)
            ]
        )
        bound = (
            rounding_bound(enc) + recompute_bound()
        )  # |e| = 1 bounds each entry's share of the noise
        assert_within(stored, enc, bound, f"batches of {bs}")


def test_length_batching_removes_padding():
    from indexer.passes import padded_tokens

    rng = np.random.default_rng(0)
    lengths = np.concatenate(
        [rng.integers(8, 512, 300), np.full(100, 512)]
    )  # mixed, like real corpora
    real = int(lengths.sum())
    assert padded_tokens(lengths, 8, by_length=False) / real > 1.3
    assert padded_tokens(lengths, 8) / real <= 1.05
