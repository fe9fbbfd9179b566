"""`influence eval` end to end on the trained test model: real encoder, bm25s, tail-patch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.cli import main

METHODS = [
    "trackstar",
    "no_hessian",
    "sketch",
    "sketch_whitened",
    "shipped",
    "shipped_cosine",
    "shipped_whitened",
    "bm25",
    "hybrid",
    "dense",
    "random",
]


@pytest.fixture(scope="module")
def eval_run(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    corpus, queries = fact_corpus_files
    out = tmp_path_factory.mktemp("eval_out")
    argv = [
        "eval",
        "--model",
        str(trained_checkpoint.checkpoint_dir),
        "--corpus",
        str(corpus),
        "--queries",
        str(queries),
        "--out",
        str(out),
        "--max-queries",
        "16",
        "--no-progress",
        "--methods",
        *METHODS,
        "--k",
        "8",
        "--seeds",
        "0",
    ]
    return main(argv), out


@pytest.mark.slow
def test_eval_writes_table_json_and_plot(eval_run, fact_corpus_files):
    from encoder.hashing import sha256_file

    rc, out = eval_run
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    # The result names its inputs by content.
    corpus, queries = fact_corpus_files
    assert data["context"]["corpus_sha256"] == sha256_file(corpus)
    assert data["context"]["queries_sha256"] == sha256_file(queries)
    assert f"corpus sha256 {sha256_file(corpus)[:12]}" in (out / "eval.md").read_text()
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == METHODS
    for row in rows.values():
        assert 0.0 <= row["mrr"] <= row["recall_at_10"] <= 1.0
        assert set(row) >= {"tailpatch_top1", "tailpatch_top3", "tailpatch_top10"}
    assert data["context"]["n_queries"] == 16
    assert data["context"]["n_train_sequences"] > 100
    # --k 8 fixes every gradient method's d at 64 per module, whatever its block cap.
    dims = data["context"]["method_dims"]
    assert set(dims) == {"trackstar", "no_hessian", "sketch", "sketch_whitened"}
    assert len(set(dims.values())) == 1
    assert dims["sketch"] == data["context"]["fingerprint_dim"] and dims["sketch"] % 64 == 0
    # Every method that looks at the data beats a random ranking on attribution, and the
    # passages retrieved by TrackStar move the completion more than random ones.
    for name in ("trackstar", "no_hessian", "sketch", "shipped", "bm25", "hybrid", "dense"):
        assert rows[name]["mrr"] > rows["random"]["mrr"] + 0.2, name
    assert rows["trackstar"]["tailpatch_top10"] > rows["random"]["tailpatch_top10"]
    assert data["context"]["oracle_tailpatch_relevant"] > 0
    assert len(data["context"]["lambdas_by_fold"]["trackstar"]) == 2
    # Per-query values of every method (paired comparisons), and trackstar minus each method.
    for name in METHODS:
        pq = data["per_query"][name]
        assert len(pq["rr_at_10"]) == len(pq["tailpatch_top10"]) == len(pq["top10"]) == 16
        assert np.mean(pq["rr_at_10"]) == pytest.approx(rows[name]["mrr"])
    paired = data["paired"]["all"]
    assert {(r["method"], r["metric"]) for r in paired} == {
        (m, metric)
        for m in METHODS[1:]
        for metric in (
            "rr_at_10",
            "hit_at_10",
            "tailpatch_top1",
            "tailpatch_top3",
            "tailpatch_top10",
        )
    }
    for r in paired:
        assert r["ci95_low"] <= r["mean"] <= r["ci95_high"] and r["se"] >= 0 and r["n"] == 16
    # The learned-facts stratum: its rows, its paired table, its count in the report.
    learned = data["context"]["learned_queries"]
    assert 0 < len(learned) <= 16 and len(data["paired"]["learned"]) == len(paired)
    for name in METHODS:
        want = np.mean([data["per_query"][name]["rr_at_10"][i] for i in learned])
        assert rows[name]["mrr_learned"] == pytest.approx(want)
    # The product as served against every other method too.
    shipped = data["paired"]["shipped, all"]
    assert {r["method"] for r in shipped} == set(METHODS) - {"shipped"}
    assert {r["reference"] for r in shipped} == {"shipped"}
    vs_random = next(r for r in paired if r["method"] == "random" and r["metric"] == "rr_at_10")
    assert vs_random["ci95_low"] > 0  # TrackStar beats the floor, and the interval says so
    assert 0.0 <= data["context"]["saturated_fraction"] <= 1.0
    assert all(
        r["n"] == round(16 * (1 - data["context"]["saturated_fraction"]))
        for r in data["paired"]["unsaturated"]
    )
    md = (out / "eval.md").read_text()
    assert "influence eval --model" in md and "--max-queries 16" in md and "--seeds 0" in md
    assert (
        "MRR@10" in md and "Paired differences, trackstar minus method (all queries, n = 16)" in md
    )
    assert "Paired differences, shipped minus method (all queries, n = 16)" in md
    assert f"Paired differences, trackstar minus method (learned queries, n = {len(learned)})" in md
    assert all(f"| {name} |" in md for name in METHODS)
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_shipped_row_is_what_the_engine_answers(eval_run, tiny_index, fact_corpus_files):
    """The eval's ``shipped`` rankings are the answers of an index built on its own at the
    defaults (``tiny_index``) for the same queries, second stage included."""
    from engine.batch import run_batch
    from engine.index import InfluenceIndex
    from engine.query import Limits, Query

    rc, out = eval_run
    assert rc == 0
    got = json.loads((out / "eval.json").read_text())["per_query"]["shipped"]["top10"]
    corpus, queries = fact_corpus_files
    row_of = {json.loads(line)["id"]: i for i, line in enumerate(corpus.read_text().splitlines())}
    asked = [json.loads(line) for line in queries.read_text().splitlines()][:16]
    index = InfluenceIndex.open(tiny_index)
    try:
        outcomes = run_batch(
            index, [Query(q["prompt"], q["completion"], 10) for q in asked], Limits(4096, 4096)
        )
    finally:
        index.close()
    assert all(o.certificate is not None and o.certificate.rescored >= 10 for o in outcomes)
    assert got == [[row_of[h.record.document_id] for h in o.hits] for o in outcomes]


def test_eval_rejects_queries_that_name_unknown_passages(trained_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "p0", "text": "Ana Tesko was born in Vanor."}) + "\n")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps(
            {
                "fact_id": "f0",
                "prompt": "Ana Tesko was born in",
                "completion": " Vanor",
                "relevant_ids": ["p9"],
            }
        )
        + "\n"
    )
    rc = main(
        [
            "eval",
            "--model",
            str(trained_checkpoint.checkpoint_dir),
            "--corpus",
            str(corpus),
            "--queries",
            str(queries),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "absent from the corpus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"prompt": "a", "completion": " b", "relevant": ["p1"]}', "unknown field(s) 'relevant'"),
        ('{"prompt": "a", "completion": " b"}', "'relevant_ids' is missing"),
        ('{"prompt": "a", "completion": "", "relevant_ids": ["p1"]}', "'completion' is empty"),
        ("not json", "not valid JSON"),
    ],
)
def test_eval_refuses_malformed_queries_before_loading_the_model(
    fact_corpus_files, tmp_path, capsys, line, what
):
    corpus, _ = fact_corpus_files
    queries = tmp_path / "queries.jsonl"
    queries.write_text(line + "\n")
    rc = main(
        [
            "eval",
            "--model",
            str(tmp_path / "no-model-needed"),
            "--corpus",
            str(corpus),
            "--queries",
            str(queries),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "[invalid_queries]" in err and "line 1" in err and what in err, err
    assert '"relevant_ids"' in err  # the schema is in the message
    assert "Traceback" not in err


def test_eval_help_documents_the_file_schemas(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "relevant_ids" in out and "fact_id" in out and '"text"' in out


@pytest.mark.slow
def test_the_hybrid_fuses_bm25_with_the_products_fingerprint(
    trained_checkpoint, fact_corpus_files, tmp_path
):
    """The hybrid is BM25 fused with the product's first stage (the plain sketch), as
    the service's hybrid mode is: its run fingerprints with that and nothing else."""
    from evaluation.settings import HYBRID_GRADIENT, METHODS

    corpus, queries = fact_corpus_files
    argv = ["eval", "--model", str(trained_checkpoint.checkpoint_dir), "--corpus", str(corpus)]
    argv += ["--queries", str(queries), "--out", str(tmp_path), "--max-queries", "8"]
    argv += ["--no-progress", "--methods", "hybrid", "bm25", "--seeds", "0"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    product = next(m for m in METHODS if m.name == HYBRID_GRADIENT)
    assert (product.projection, product.correction, product.hessian) == ("sketch", False, "none")
    assert not product.whiten  # the product's sketch is of the plain gradient
    fingerprinted = [k for k in data["context"]["timings"] if k.startswith("fingerprints_")]
    assert fingerprinted == ["fingerprints_uncorrected_sketch_s"]
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["hybrid"]["mrr"] > 0.5
