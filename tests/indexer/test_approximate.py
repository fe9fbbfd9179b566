"""Approximate FAISS indexes: recall@10 against Flat is measured and reported; re-ranked
scores are exact inner products with the stored fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.index import InfluenceIndex, OpenOptions
from indexer import faiss_index
from indexer.__main__ import main
from indexer.faiss_index import SearchParams
from tests.conftest import TINY_INDEX_CLI_OPTIONS
from tests.tolerances import assert_within, dot_bound


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["IVF4,PQ16x4", "HNSW32", "PQ128x4fs"])
def test_approximate_index(
    factory, tiny_index, trained_checkpoint, fact_corpus_files, tmp_path, capsys
):
    corpus, queries = fact_corpus_files
    out = tmp_path / "approx"
    rc = main(
        [
            "build",
            "--model",
            str(trained_checkpoint.checkpoint_dir),
            "--corpus",
            str(corpus),
            "--queries",
            str(queries),
            "--out",
            str(out),
            "--faiss",
            factory,
            "--no-progress",
            *TINY_INDEX_CLI_OPTIONS,
        ]
    )
    assert rc == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    recall = info["recall"]
    assert info["faiss"] == factory and recall["n_queries"] == 100 and recall["k"] == 10
    assert 0.0 <= recall["recall_at_k"] <= recall["recall_at_k_reranked"] <= 1.0
    assert main(["info", str(out)]) == 0
    assert "recall@10" in capsys.readouterr().out

    flat = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    approx = InfluenceIndex.open(out, OpenOptions(device="cpu"))
    try:
        fps = np.asarray(approx.fingerprints, dtype=np.float32)
        assert np.array_equal(fps, np.asarray(flat.fingerprints, dtype=np.float32))
        q = approx.encode_queries(
            [("Drorex is headquartered in", " Dutrus"), ("Cara Nalkun works for", " Buneco")]
        )
        scores, ids = approx.search(q, 10)
        assert (ids >= 0).all()
        exact = np.take_along_axis(q @ fps.T, ids, axis=1)
        assert_within(
            scores, exact, np.take_along_axis(dot_bound(q, fps), ids, axis=1), "re-ranked"
        )
        assert (np.diff(scores, axis=1) <= 0).all()
        flat_scores, flat_ids = flat.search(q, 10)
        hits = np.mean(
            [
                len(set(a) & set(b)) / 10
                for a, b in zip(ids.tolist(), flat_ids.tolist(), strict=True)
            ]
        )
        assert hits >= 0.8, f"re-ranked recall@10 {hits} on real queries"
        if "PQ" in factory:  # PQ's own scores are approximate; re-ranking is what makes them exact
            raw, raw_ids = faiss_index.search(approx.vectors.index, fps, q, 10, candidates=0)
            raw_exact = np.take_along_axis(q @ fps.T, raw_ids, axis=1)
            assert np.abs(raw - raw_exact).max() > 1e-4
    finally:
        flat.close()
        approx.close()

    # Query-time knobs: every list visited, a wide beam, every vector a candidate: the
    # re-ranked answer is the exact one. candidates=0 returns the index's own scores.
    wide = InfluenceIndex.open(
        out,
        OpenOptions(
            device="cpu", search_params=SearchParams(nprobe=64, ef_search=512, candidates=10_000)
        ),
    )
    raw_only = InfluenceIndex.open(
        out, OpenOptions(device="cpu", search_params=SearchParams(candidates=0))
    )
    flat = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    try:
        q = wide.encode_queries([(f"Query {i} about", f" thing {i}") for i in range(8)])
        scores, ids = wide.search(q, 10)
        flat_scores, flat_ids = flat.search(q, 10)
        np.testing.assert_array_equal(ids, flat_ids)
        fps = np.asarray(flat.fingerprints, dtype=np.float32)
        assert_within(
            scores, flat_scores, np.take_along_axis(dot_bound(q, fps), ids, axis=1), "vs Flat"
        )
        own = faiss_index.search(raw_only.vectors.index, fps, q, 10, candidates=0)
        np.testing.assert_array_equal(raw_only.search(q, 10)[1], own[1])
    finally:
        for opened in (wide, raw_only, flat):
            opened.close()
