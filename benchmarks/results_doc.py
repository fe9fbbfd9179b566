"""``docs/results.md``, generated from ``benchmarks/results/*.json``: every committed result
with the machine it ran on, its goals (goal, measured, met) and, for an evaluation, each
method's attribution and influence.

    python -m benchmarks.results_doc [--check]

``--check`` exits 1 when the committed file differs from what the results give (the test
suite runs it), so a result added or rerun without regenerating the page is caught.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "results.md"
EVAL_COLUMNS = ("mrr", "recall_at_10", "tailpatch_top10")


def _number(value: Any) -> str:
    """A measured value as its file states it, shortened to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4g}"


def _title(stem: str) -> str:
    md = RESULTS / f"{stem}.md"
    if md.is_file():
        first = md.read_text().splitlines()[0] if md.read_text() else ""
        if first.startswith("# "):
            return first[2:].strip()
    return stem


def _machine(data: dict[str, Any]) -> str | None:
    m = data.get("machine")
    if not isinstance(m, dict):
        return None
    return f"{m.get('cpu_cores')} x {m.get('cpu')}, {m.get('memory_gib')} GiB; GPU: {m.get('gpu')}; torch {m.get('torch')}"


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| " + " | ".join(_number(r.get(c, "")).replace("|", "/") for c in cols) + " |"
        )
    return lines


def section(path: Path) -> list[str]:
    """The lines of one result's section."""
    data = json.loads(path.read_text())
    stem = path.stem
    link = (
        f"../benchmarks/results/{stem}.md"
        if (RESULTS / f"{stem}.md").is_file()
        else f"../benchmarks/results/{stem}.json"
    )
    out = [f"## {stem}", "", f"{_title(stem)} ([{Path(link).name}]({link}))", ""]
    if not isinstance(data, dict):
        return out
    machine = _machine(data)
    if machine:
        out += [f"Machine: {machine}.", ""]
    goals = data.get("goals")
    if isinstance(goals, list) and goals and isinstance(goals[0], dict):
        cols = [c for c in ("mode", "goal", "measured", "met") if c in goals[0]]
        out += [*_table(goals, cols), ""]
    rows = data.get("rows")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "method" in rows[0]:
        cols = ["method", *(c for c in EVAL_COLUMNS if c in rows[0])]
        out += [*_table(rows, cols), ""]
    return out


def _paired(data: dict[str, Any], method: str, metric: str) -> str:
    """The product minus ``method`` on ``metric`` over all queries: mean [95% CI]."""
    for r in data.get("paired", {}).get("shipped, all", []):
        if r["method"] == method and r["metric"] == metric:
            return f"{r['mean']:+.4f} [{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}]"
    return "-"


def _best(rows: list[dict[str, Any]], key: str, exclude: str = "") -> dict[str, Any]:
    return max((r for r in rows if r["method"] != exclude and key in r), key=lambda r: r[key])


def _tied(rows: list[dict[str, Any]], key: str, form: str) -> tuple[list[str], str]:
    """The methods at the best value of ``key`` as a report prints it (ties share it), and
    that value."""
    best = form.format(_best(rows, key)[key])
    return [r["method"] for r in rows if key in r and form.format(r[key]) == best], best


def _winners(rows: list[dict[str, Any]], key: str, form: str) -> str:
    tied, best = _tied(rows, key, form)
    return f"{', '.join(tied)} {best}"


def question_rows() -> list[dict[str, Any]]:
    """Per evaluation that ran the product (``shipped``) beside BM25: which method wins each
    question, and the product against the strongest other method with its paired interval."""
    out = []
    for path in sorted(RESULTS.glob("eval_*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows", [])
        names = {r["method"] for r in rows}
        if not {"shipped", "bm25"} <= names or "shipped, all" not in data.get("paired", {}):
            continue
        c = data["context"]
        rival = _best(rows, "tailpatch_top10", exclude="shipped")
        out.append(
            {
                "set": path.stem,
                "queries (learned)": f"{c['n_queries']} ({len(c.get('learned_queries', []))})",
                "attribution winner (MRR@10)": _winners(rows, "mrr", "{:.3f}"),
                "shipped - bm25, MRR@10": _paired(data, "bm25", "rr_at_10"),
                "influence winner (tail-patch top-10)": _winners(
                    rows, "tailpatch_top10", "{:+.4f}"
                ),
                "shipped - best other, tail-patch top-10": (
                    f"{_paired(data, rival['method'], 'tailpatch_top10')} vs {rival['method']}"
                ),
            }
        )
    return out


FINDINGS = (
    ("correction helps", "no_correction"),
    ("R helps", "no_hessian"),
    ("mixed R beats R_train", "r_train_only"),
    ("unit norm helps", "no_unit_norm"),
)
"""The paper's ablations (TrackStar against it without one component) checked per set."""


def _verdict(data: dict[str, Any], method: str, metric: str) -> str:
    """yes / no / tie: TrackStar minus ``method`` on ``metric``, by its paired interval."""
    for r in data.get("paired", {}).get("all", []):
        if r["method"] == method and r["metric"] == metric:
            return "yes" if r["ci95_low"] > 0 else "no" if r["ci95_high"] < 0 else "tie"
    return "-"


def _best_at(rows: list[dict[str, Any]], name: str, key: str, form: str) -> str:
    """yes when ``name`` has the best value of ``key`` as printed (a shared best counts)."""
    if not any(r["method"] == name for r in rows):
        return "-"
    return "yes" if name in _tied(rows, key, form)[0] else "no"


def checklist_rows() -> list[dict[str, Any]]:
    """The paper's findings, per evaluation that ran TrackStar and its ablations: BM25 best at
    attribution, TrackStar best at influence (of the gradient methods brute-forced, the
    product rows aside), and each component's help as attribution / influence verdicts."""
    out = []
    for path in sorted(RESULTS.glob("eval_*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows", [])
        if not {m for _, m in FINDINGS} | {"trackstar", "bm25"} <= {r["method"] for r in rows}:
            continue
        brute = [r for r in rows if not r["method"].startswith("shipped")]
        row = {
            "set": path.stem,
            "BM25 best at attribution": _best_at(rows, "bm25", "mrr", "{:.3f}"),
            "TrackStar best at tail-patch": _best_at(
                brute, "trackstar", "tailpatch_top10", "{:+.4f}"
            ),
        }
        for finding, method in FINDINGS:
            row[f"{finding} (MRR / tail-patch)"] = (
                f"{_verdict(data, method, 'rr_at_10')} / {_verdict(data, method, 'tailpatch_top10')}"
            )
        out.append(row)
    return out


def render() -> str:
    lines = [
        "# Results",
        "",
        "Generated by `python -m benchmarks.results_doc` from `benchmarks/results/*.json`; do not edit.",
        "Each section names the file that holds the full table, the command that produced it and",
        "its caveats. Numbers from one run on the machine named; compare ratios within a file.",
        "",
    ]
    questions = question_rows()
    if questions:
        lines += [
            "## Which method answers which question",
            "",
            "Per evaluation set: the best method at attribution (MRR@10) and at influence",
            "(tail-patch top-10), and the product as served (`shipped`) minus BM25 and minus the",
            "strongest other method, paired over queries (an interval that holds 0 is a tie).",
            "",
            *_table(questions, list(questions[0])),
            "",
        ]
    checklist = checklist_rows()
    if checklist:
        lines += [
            "## The paper's findings, set by set",
            "",
            "yes / no / tie: whether the finding holds on the set, each component by TrackStar",
            "minus TrackStar without it, paired over queries (tie: the interval holds 0).",
            "",
            *_table(checklist, list(checklist[0])),
            "",
        ]
    for path in sorted(RESULTS.glob("*.json")):
        lines += section(path)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--check", action="store_true", help="exit 1 if docs/results.md is not up to date"
    )
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(
                f"{OUT.relative_to(ROOT)} is stale: run python -m benchmarks.results_doc",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
