"""`influence eval` end to end on the trained test model: real encoder, bm25s, tail-patch."""

from __future__ import annotations

import json

import pytest

from service.cli import main

METHODS = ["trackstar", "no_hessian", "bm25", "hybrid", "random"]


@pytest.fixture(scope="module")
def eval_run(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    corpus, queries = fact_corpus_files
    out = tmp_path_factory.mktemp("eval_out")
    argv = [
        "eval", "--model", str(trained_checkpoint.checkpoint_dir), "--corpus", str(corpus),
        "--queries", str(queries), "--out", str(out), "--max-queries", "16", "--no-progress",
        "--methods", *METHODS,
    ]  # fmt: skip
    return main(argv), out


@pytest.mark.slow
def test_eval_writes_table_json_and_plot(eval_run):
    rc, out = eval_run
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == METHODS
    for row in rows.values():
        assert 0.0 <= row["mrr"] <= row["recall_at_10"] <= 1.0
        assert set(row) >= {"tailpatch_top1", "tailpatch_top3", "tailpatch_top10"}
    assert data["context"]["n_queries"] == 16
    assert data["context"]["n_train_sequences"] > 100
    # Every method that looks at the data beats a random ranking on attribution, and the
    # passages retrieved by TrackStar move the completion more than random ones.
    for name in ("trackstar", "no_hessian", "bm25", "hybrid"):
        assert rows[name]["mrr"] > rows["random"]["mrr"] + 0.2, name
    assert rows["trackstar"]["tailpatch_top10"] > rows["random"]["tailpatch_top10"]
    assert data["context"]["oracle_tailpatch_relevant"] > 0
    assert len(data["context"]["lambdas_by_fold"]["trackstar"]) == 2
    md = (out / "eval.md").read_text()
    assert "influence eval --model" in md and "--max-queries 16" in md
    assert all(f"| {name} |" in md for name in METHODS)
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_rejects_queries_that_name_unknown_passages(trained_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "p0", "text": "Ana Tesko was born in Vanor."}) + "\n")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({
        "fact_id": "f0", "prompt": "Ana Tesko was born in", "completion": " Vanor",
        "relevant_ids": ["p9"],
    }) + "\n")  # fmt: skip
    rc = main([
        "eval", "--model", str(trained_checkpoint.checkpoint_dir), "--corpus", str(corpus),
        "--queries", str(queries), "--out", str(tmp_path / "out"), "--no-progress",
    ])  # fmt: skip
    assert rc == 2
    assert "absent from the corpus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "what"),
    [('{"prompt": "a", "completion": " b", "relevant": ["p1"]}', "unknown field(s) 'relevant'"),
     ('{"prompt": "a", "completion": " b"}', "'relevant_ids' is missing"),
     ('{"prompt": "a", "completion": "", "relevant_ids": ["p1"]}', "'completion' is empty"),
     ('not json', "not valid JSON")],
)
def test_eval_refuses_malformed_queries_before_loading_the_model(fact_corpus_files, tmp_path, capsys, line, what):
    corpus, _ = fact_corpus_files
    queries = tmp_path / "queries.jsonl"
    queries.write_text(line + "\n")
    rc = main(["eval", "--model", str(tmp_path / "no-model-needed"), "--corpus", str(corpus),
               "--queries", str(queries), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "[invalid_queries]" in err and "line 1" in err and what in err, err
    assert '"relevant_ids"' in err  # the schema is in the message
    assert "Traceback" not in err


def test_eval_help_documents_the_file_schemas(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "relevant_ids" in out and "fact_id" in out and '"text"' in out
