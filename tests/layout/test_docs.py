"""The README is a manual whose numbers come from committed results, and docs/results.md is
what the results files give."""

from __future__ import annotations

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
