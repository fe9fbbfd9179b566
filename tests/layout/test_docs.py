"""The README is a manual whose numbers come from committed results, and docs/results.md is
what the results files give."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import results_doc

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"\(?(?:\.\./)?benchmarks/results/([\w.-]+)\.(?:md|json|png)\)?")
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")


def _blocks(text: str) -> list[str]:
    """Paragraphs and table rows outside fenced code, each one block."""
    out: list[str] = []
    fenced, para = False, []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("|"):
            out.append(line)
        elif line.strip():
            para.append(line)
            continue
        if para:
            out.append(" ".join(para))
            para = []
    if para:
        out.append(" ".join(para))
    return out


def test_every_number_the_readme_cites_is_in_the_file_it_cites():
    checked = 0
    for block in _blocks((ROOT / "README.md").read_text()):
        stems = set(CITED.findall(block))
        if not stems:
            continue
        sources = "".join(
            p.read_text()
            for s in stems
            for p in (ROOT / "benchmarks/results").glob(f"{s}.*")
            if p.suffix in (".md", ".json")
        )
        assert sources, f"cites a results file that does not exist: {stems}"
        for number in DECIMAL.findall(CITED.sub("", block)):
            # A whole number of the file, not a prefix of a longer one (0.98 is not in 0.986).
            found = re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", sources)
            assert found, (
                f"{number} is in no file this block cites ({sorted(stems)}): {block[:120]}"
            )
            checked += 1
    assert checked >= 10  # the "how well it works" table at least


def test_the_readme_is_a_manual():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 300
    assert "make demo" in text and "make test" in text


def test_the_results_page_is_generated_from_the_results():
    assert (ROOT / "docs" / "results.md").read_text() == results_doc.render(), (
        "docs/results.md is stale: run python -m benchmarks.results_doc"
    )


def test_the_question_table_names_ties_and_the_products_paired_intervals(tmp_path, monkeypatch):
    def row(method, mrr, tp):
        return {"method": method, "mrr": mrr, "tailpatch_top10": tp}

    def pair(method, metric, mean, low, high):
        return {
            "method": method,
            "metric": metric,
            "mean": mean,
            "ci95_low": low,
            "ci95_high": high,
        }

    data = {
        "rows": [row("shipped", 0.9, 0.02), row("bm25", 0.9, 0.01), row("grad_cosine", 0.5, 0.03)],
        "context": {"n_queries": 4, "learned_queries": [0, 2]},
        "paired": {
            "shipped, all": [
                pair("bm25", "rr_at_10", 0.0, -0.1, 0.1),
                pair("grad_cosine", "tailpatch_top10", -0.01, -0.02, -0.005),
            ]
        },
    }
    (tmp_path / "eval_x.json").write_text(json.dumps(data))
    (tmp_path / "eval_no_product.json").write_text(json.dumps({"rows": [row("bm25", 1.0, 0.0)]}))
    monkeypatch.setattr(results_doc, "RESULTS", tmp_path)
    (got,) = results_doc.question_rows()
    assert got == {
        "set": "eval_x",
        "queries (learned)": "4 (2)",
        "attribution winner (MRR@10)": "shipped, bm25 0.900",
        "shipped - bm25, MRR@10": "+0.0000 [-0.1000, +0.1000]",
        "influence winner (tail-patch top-10)": "grad_cosine +0.0300",
        "shipped - best other, tail-patch top-10": "-0.0100 [-0.0200, -0.0050] vs grad_cosine",
    }


def test_the_findings_checklist_reads_verdicts_from_the_paired_intervals(tmp_path, monkeypatch):
    methods = ["trackstar", "bm25", "no_correction", "no_hessian", "r_train_only", "no_unit_norm"]
    rows = [{"method": m, "mrr": 0.5, "tailpatch_top10": 0.01} for m in methods]
    rows[1]["mrr"] = 0.9  # BM25 best at attribution
    rows.append(
        {"method": "shipped_cosine", "mrr": 0.1, "tailpatch_top10": 0.05}
    )  # not brute force

    def pair(method, metric, low, high):
        return {"method": method, "metric": metric, "ci95_low": low, "ci95_high": high}

    paired = [
        pair("no_correction", "rr_at_10", 0.01, 0.02),
        pair("no_correction", "tailpatch_top10", -0.02, -0.01),
        pair("no_hessian", "rr_at_10", -0.01, 0.01),
    ]
    data = {"rows": rows, "paired": {"all": paired}}
    (tmp_path / "eval_y.json").write_text(json.dumps(data))
    monkeypatch.setattr(results_doc, "RESULTS", tmp_path)
    (got,) = results_doc.checklist_rows()
    assert got["BM25 best at attribution"] == "yes"
    assert got["TrackStar best at tail-patch"] == "yes"  # tied at the best of the brute-forced
    assert got["correction helps (MRR / tail-patch)"] == "yes / no"
    assert got["R helps (MRR / tail-patch)"] == "tie / -"
