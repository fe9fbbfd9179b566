"""The FreeDict real-text set: dictd parsing on a hand-written dictionary, and the built
corpus's contract on the installed Debian package (make system-deps installs it)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from api.errors import InputError
from evaluation import dictionary as fd
from evaluation.corpus import load_queries


def _b64(n: int) -> str:
    out = ""
    while True:
        out = fd._B64[n % 64] + out
        n //= 64
        if n == 0:
            return out


def _write_dictd(root: Path, entries: list[tuple[str, str]]) -> Path:
    data, index = b"", []
    for head, text in entries:
        raw = text.encode()
        index.append(f"{head}\t{_b64(len(data))}\t{_b64(len(raw))}\n")
        data += raw
    (root / f"{fd.NAME}.index").write_text("".join(index), encoding="utf-8")
    with gzip.open(root / f"{fd.NAME}.dict.dz", "wb") as f:
        f.write(data)
    return root


def test_translations_from_a_dictd_file(tmp_path):
    root = _write_dictd(
        tmp_path,
        [
            ("house", "house /haʊs/\nHaus <neut>, Gebäude <neut>\n"),
            ("run", "run /ɹʌn/\nlaufen, rennen\n"),  # a verb: no gendered noun first
            ("home", "home /həʊm/\nHaus <neut>\n"),  # German word already taken
            ("New York", "New York /njuː/\nNew York <neut>\n"),  # not a single lowercase word
            ("tree", "tree /tɹiː/\nBaum <masc> [bot.]\n"),
            ("house", "house /haʊs/\nHeim <neut>\n"),  # headword repeated: the first entry wins
        ],
    )
    assert fd.translations(root) == [
        fd.Translation("house", "Haus"),
        fd.Translation("tree", "Baum"),
    ]
    with pytest.raises(InputError, match="apt-get install dict-freedict-eng-deu"):
        fd.translations(tmp_path / "missing")


INSTALLED = (fd.DICTD_DIR / f"{fd.NAME}.index").is_file()


@pytest.mark.skipif(
    not INSTALLED, reason="dict-freedict-eng-deu is not installed (make system-deps installs it)"
)
def test_built_set_hides_the_query_template_from_the_queried_facts(tmp_path):
    corpus, queries_path = fd.build(tmp_path, n_queried=30, n_support=60, seed=1)
    passages = {
        p["id"]: p["text"] for p in map(json.loads, corpus.read_text(encoding="utf-8").splitlines())
    }
    queries = load_queries(queries_path)
    assert len(passages) == (30 + 60) * fd.MENTIONS and len(queries) == 30
    prompt_head = fd.QUERY_TEMPLATE.split("{en}")[0]
    for q in queries:
        english = q.prompt[len(prompt_head) :].split(" is called")[0]
        german = q.completion.strip()
        assert len(q.relevant_ids) == fd.MENTIONS
        for pid in q.relevant_ids:
            assert english in passages[pid] and german in passages[pid]
        # Neither the query nor its template with this word is in any training text.
        assert not any(q.prompt in text for text in passages.values())
    # The template itself is taught, through the support facts: each takes MENTIONS of the
    # 1 + len(PARAPHRASES) templates, so 3/5 of the 60 include it (expected 36).
    assert sum(prompt_head in text for text in passages.values()) >= 24
    # Deterministic given the seed.
    again, _ = fd.build(tmp_path / "again", n_queried=30, n_support=60, seed=1)
    assert again.read_text(encoding="utf-8") == corpus.read_text(encoding="utf-8")
