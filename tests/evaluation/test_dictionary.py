"""The FreeDict real-text set: dictd parsing on a hand-written dictionary, and the built
corpus's contract on the installed Debian package (make system-deps installs it)."""

from __future__ import annotations

import gzip
import json
import re
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


def _write_dictd(root: Path, name: str, entries: list[tuple[str, str]]) -> Path:
    data, index = b"", []
    for head, text in entries:
        raw = text.encode()
        index.append(f"{head}\t{_b64(len(data))}\t{_b64(len(raw))}\n")
        data += raw
    (root / f"{name}.index").write_text("".join(index), encoding="utf-8")
    with gzip.open(root / f"{name}.dict.dz", "wb") as f:
        f.write(data)
    return root


def test_translations_from_a_dictd_file(tmp_path):
    spec = fd.SETS["freedict-eng-deu"]
    root = _write_dictd(
        tmp_path,
        spec.name,
        [
            ("house", "house /haʊs/\nHaus <neut>, Gebäude <neut>\n"),
            ("run", "run /ɹʌn/\nlaufen, rennen\n"),  # a verb: no gendered noun first
            ("home", "home /həʊm/\nHaus <neut>\n"),  # German word already taken
            ("New York", "New York /njuː/\nNew York <neut>\n"),  # not a single lowercase word
            ("tree", "tree /tɹiː/\nBaum <masc> [bot.]\n"),
            ("house", "house /haʊs/\nHeim <neut>\n"),  # headword repeated: the first entry wins
        ],
    )
    assert fd.facts(spec, root) == [fd.Fact("house", "Haus"), fd.Fact("tree", "Baum")]
    with pytest.raises(InputError, match="apt-get install dict-freedict-eng-deu"):
        fd.facts(spec, tmp_path / "missing")


def test_french_translations_skip_copies_and_take_the_first_sense(tmp_path):
    spec = fd.SETS["freedict-eng-fra"]
    root = _write_dictd(
        tmp_path,
        spec.name,
        [
            ("adhesive", "adhesive /ədhiːsiv/\n1. adhésif\n2. agglutinant, colle\n"),
            ("admiral", "admiral /ædmərəl/\namiral\n"),
            ("admirable", "admirable /ædmərəbl/\nadmirable\n"),  # the English word itself
            ("adjust", "adjust /ədʒʌst/\nredresser un jugement\n"),  # not one word
        ],
    )
    assert fd.facts(spec, root) == [fd.Fact("adhesive", "adhésif"), fd.Fact("admiral", "amiral")]


def test_acronyms_whose_expansion_spells_them_and_only_one_meaning(tmp_path):
    spec = fd.SETS["vera"]
    root = _write_dictd(
        tmp_path,
        spec.name,
        [
            (
                "aaas",
                "AAAS\n       American Association for the Advancement of Science (org., USA)\n",
            ),
            ("aac", "AAC\n       Advanced Audio Coding (IIS, MPEG)\n"),
            ("aac", "AAC\n       Authorization and Access Control (IETF)\n"),  # two meanings
            ("gpu", 'GPU\n       Graphics Processing Unit [chip], "G.P.U."\n'),
            ("tla", "TLA\n       Three Letter Acronym (slang, humor,\nmore tags)\n"),
            ("xyz", "XYZ\n       Something Else Entirely\n"),  # initials do not spell it
            ("abc", "ABC\n       A. B. C.\n"),  # not plain words
        ],
    )
    assert fd.facts(spec, root) == [
        fd.Fact("GPU", "Graphics Processing Unit"),
        fd.Fact("TLA", "Three Letter Acronym"),
    ]


def _installed(name: str) -> bool:
    return (fd.DICTD_DIR / f"{name}.index").is_file()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                not _installed(name),
                reason=f"{fd.SETS[name].package} is not installed (make system-deps installs it)",
            ),
        )
        for name in fd.SETS
    ],
)
def test_built_set_hides_the_query_template_from_the_queried_facts(tmp_path, name):
    spec = fd.SETS[name]
    corpus, queries_path = fd.build(tmp_path, spec=spec, n_queried=30, n_support=60, seed=1)
    passages = {
        p["id"]: p["text"] for p in map(json.loads, corpus.read_text(encoding="utf-8").splitlines())
    }
    queries = load_queries(queries_path)
    assert len(passages) == (30 + 60) * fd.MENTIONS and len(queries) == 30
    prompt_head, prompt_tail = spec.query.split(" {answer}")[0].split("{key}")
    for q in queries:
        assert q.prompt.startswith(prompt_head) and q.prompt.endswith(prompt_tail)
        key = q.prompt[len(prompt_head) : len(q.prompt) - len(prompt_tail)]
        answer = q.completion.strip()
        assert len(q.relevant_ids) == fd.MENTIONS
        for pid in q.relevant_ids:
            assert key in passages[pid] and answer in passages[pid]
        # Neither the query nor its template with this key is in any training text.
        assert not any(q.prompt in text for text in passages.values())
    # The template itself is taught, through the support facts: each takes MENTIONS of the
    # 1 + len(paraphrases) templates, so 3/5 of the 60 include it (expected 36).
    template = re.compile(re.escape(prompt_head) + r"\S+" + re.escape(prompt_tail))
    assert sum(bool(template.search(t)) for t in passages.values()) >= 24
    # Deterministic given the seed.
    again, _ = fd.build(tmp_path / "again", spec=spec, n_queried=30, n_support=60, seed=1)
    assert again.read_text(encoding="utf-8") == corpus.read_text(encoding="utf-8")
