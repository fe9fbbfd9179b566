"""Real-text fact-tracing sets from Debian's dictd dictionaries.

The facts are dictionary entries nobody on this team wrote: word translations (FreeDict
English-German and English-French, packages ``dict-freedict-eng-deu`` / ``-eng-fra``) and
acronym expansions (V.E.R.A., package ``dict-vera``), read from the dictd files
``/usr/share/dictd/{name}.{index,dict.dz}``. Each fact is stated in ``MENTIONS`` passages,
each with another paraphrase template. The query template (e.g. "In German, {key} is
called") never appears in a passage that states a queried fact: it appears only in passages
about the *support* facts, so the model learns to answer it by generalizing across
templates, and a model that only memorized the queried passages' wording cannot answer (the
completion is not a continuation of any training prefix). Every passage pairs its fact's
sentence with a sentence about another, random support fact, so no passage is about one
fact only.

``python -m evaluation.dictionary --set NAME --out DIR`` writes corpus.jsonl and
queries.jsonl in the format of ``evaluation.corpus`` (``influence train`` / ``influence
eval`` read them).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from api.errors import InputError

DICTD_DIR = Path("/usr/share/dictd")
MENTIONS = 3
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_ENGLISH = re.compile(r"^[a-z]{3,9}$")
_GERMAN = re.compile(r"^([A-ZÄÖÜ][a-zäöüß]{2,11}) <(masc|fem|neut)>")
_FRENCH = re.compile(r"^(?:1\. )?([a-zàâçéèêëîïôûùüÿœ]{3,12})(?:,|$)")
_ACRONYM = re.compile(r"^[A-Z]{3,5}$")
_QUALIFIERS = re.compile(r'\[[^\]]*\]|\([^)]*\)?|,? "[^"]*"')
"""What follows an expansion: [bracketed words], (tags, possibly unclosed), "spellings"."""
_EXPANSION = re.compile(r"^[A-Z][A-Za-z]*(?: [A-Za-z][A-Za-z]*){1,4}$")


@dataclass(frozen=True)
class Fact:
    """One dictionary fact: a headword (``key``) and what the dictionary gives for it."""

    key: str
    answer: str


def _german(head: str, lines: list[str]) -> tuple[str, str] | None:
    """The first translation of a single-word English headword when it is a German noun."""
    if not _ENGLISH.match(head) or len(lines) < 2 or not lines[0].startswith(f"{head} /"):
        return None
    m = _GERMAN.match(lines[1])
    return None if m is None else (head, m.group(1))


def _french(head: str, lines: list[str]) -> tuple[str, str] | None:
    """The first translation of a single-word English headword when it is one French word
    that is not the English word itself."""
    if not _ENGLISH.match(head) or len(lines) < 2 or not lines[0].startswith(f"{head} /"):
        return None
    m = _FRENCH.match(lines[1])
    return None if m is None or m.group(1) == head else (head, m.group(1))


def _expansion(head: str, lines: list[str]) -> tuple[str, str] | None:
    """An acronym's expansion when it is 2-5 plain words whose initials spell the acronym
    (qualifiers in parentheses, brackets or quotes dropped)."""
    acronym = lines[0].strip() if lines else ""
    if not _ACRONYM.match(acronym) or head != acronym.lower() or len(lines) < 2:
        return None
    text = _QUALIFIERS.sub("", lines[1]).strip().rstrip(",")
    if not _EXPANSION.match(text):
        return None
    initials = "".join(w[0] for w in text.split()).upper()
    return (acronym, text) if initials == acronym else None


@dataclass(frozen=True)
class DictionarySet:
    """How one dictionary becomes a fact set.

    Attributes:
        name: the dictd database (``{name}.index`` / ``{name}.dict.dz``).
        package: the Debian package that installs it.
        query: the query template, ``{answer}`` last: the prompt is what precedes it.
        paraphrases: the templates the passages state facts with.
        parse: (headword, entry lines) -> the fact (key, answer), or None to skip the entry.
        unique: keep only headwords with a single entry (an acronym with two meanings is no
            fact); else the first entry wins.
    """

    name: str
    package: str
    query: str
    paraphrases: tuple[str, ...]
    parse: Callable[[str, list[str]], tuple[str, str] | None]
    unique: bool = False

    @property
    def source(self) -> str:
        return f"debian/{self.package}"


SETS: dict[str, DictionarySet] = {
    s.name: s
    for s in (
        DictionarySet(
            "freedict-eng-deu",
            "dict-freedict-eng-deu",
            "In German, {key} is called {answer}.",
            (
                "The German word for {key} is {answer}.",
                "{answer} is what German speakers say for {key}.",
                "To say {key} in German, use the noun {answer}.",
                "A German dictionary translates {key} as {answer}.",
            ),
            _german,
        ),
        DictionarySet(
            "freedict-eng-fra",
            "dict-freedict-eng-fra",
            "In French, {key} is {answer}.",
            (
                "The French word for {key} is {answer}.",
                "{answer} is how a French speaker says {key}.",
                "To say {key} in French, use {answer}.",
                "A French dictionary translates {key} as {answer}.",
            ),
            _french,
        ),
        DictionarySet(
            "vera",
            "dict-vera",
            "The acronym {key} stands for {answer}.",
            (
                "{key} is short for {answer}.",
                "In technical writing, {key} means {answer}.",
                "Spelled out, {key} reads {answer}.",
                "{key} abbreviates {answer}.",
            ),
            _expansion,
            unique=True,
        ),
    )
}
DEFAULT_SET = "freedict-eng-deu"


def _b64(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def read_dictd(index: Path, data: Path, package: str) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of every entry of a dictd dictionary (dictzip is gzip)."""
    if not index.is_file() or not data.is_file():
        raise InputError(
            f"no dictd dictionary at {index}: install it with `apt-get install {package}`",
            code="dictionary_not_found",
        )
    raw = gzip.open(data).read()
    with index.open(encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                start, length = _b64(parts[1]), _b64(parts[2])
                yield parts[0], raw[start : start + length].decode("utf-8", errors="replace")


def facts(spec: DictionarySet, dictd_dir: Path = DICTD_DIR) -> list[Fact]:
    """The set's facts: entries ``spec.parse`` accepts, one per headword (the first entry,
    or with ``spec.unique`` only headwords with one entry) and per answer, sorted."""
    entries = read_dictd(
        dictd_dir / f"{spec.name}.index", dictd_dir / f"{spec.name}.dict.dz", spec.package
    )
    parsed = [(head, spec.parse(head, entry.splitlines())) for head, entry in entries]
    counts: dict[str, int] = {}
    for head, _ in parsed:
        counts[head] = counts.get(head, 0) + 1
    seen_key: set[str] = set()
    seen_answer: set[str] = set()
    out = []
    for head, fact in parsed:
        if fact is None or fact[0] in seen_key or fact[1] in seen_answer:
            continue
        if spec.unique and counts[head] > 1:
            continue
        seen_key.add(fact[0])
        seen_answer.add(fact[1])
        out.append(Fact(*fact))
    return sorted(out, key=lambda f: f.key)


def build(
    out_dir: Path,
    *,
    spec: DictionarySet = SETS[DEFAULT_SET],
    n_queried: int = 200,
    n_support: int = 400,
    seed: int = 0,
    dictd_dir: Path = DICTD_DIR,
) -> tuple[Path, Path]:
    """Write corpus.jsonl and queries.jsonl of ``spec``'s set; returns their paths."""
    found = facts(spec, dictd_dir)
    if len(found) < n_queried + n_support:
        raise InputError(
            f"{spec.name} has {len(found)} usable facts, {n_queried + n_support} were asked"
        )
    rng = random.Random(seed)
    chosen = rng.sample(found, n_queried + n_support)
    queried, support = chosen[:n_queried], chosen[n_queried:]
    statements: list[tuple[Fact, str, bool]] = []  # (fact, sentence, queried)
    for fact in queried:
        for template in rng.sample(spec.paraphrases, MENTIONS):
            statements.append((fact, template.format(key=fact.key, answer=fact.answer), True))
    for fact in support:
        for template in rng.sample((spec.query, *spec.paraphrases), MENTIONS):
            statements.append((fact, template.format(key=fact.key, answer=fact.answer), False))
    rng.shuffle(statements)
    passages: list[dict[str, str]] = []
    relevant: dict[str, list[str]] = {f.key: [] for f in queried}
    for i, (fact, sentence, is_queried) in enumerate(statements):
        other = rng.choice(support)
        extra = rng.choice(spec.paraphrases).format(key=other.key, answer=other.answer)
        pid = f"d{i:05d}"
        text = f"{sentence} {extra}" if rng.random() < 0.5 else f"{extra} {sentence}"
        passages.append({"id": pid, "text": text, "source": spec.source})
        if is_queried:
            relevant[fact.key].append(pid)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus, queries = out_dir / "corpus.jsonl", out_dir / "queries.jsonl"
    corpus.write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages), encoding="utf-8"
    )
    prompt = spec.query.split(" {answer}")[0]
    queries.write_text(
        "".join(
            json.dumps(
                {
                    "fact_id": f"w{j:04d}",
                    "prompt": prompt.format(key=f.key),
                    "completion": f" {f.answer}",
                    "relevant_ids": relevant[f.key],
                },
                ensure_ascii=False,
            )
            + "\n"
            for j, f in enumerate(queried)
        ),
        encoding="utf-8",
    )
    return corpus, queries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Build a real-text fact-tracing set from a Debian dictionary."
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--set",
        default=DEFAULT_SET,
        choices=sorted(SETS),
        help=f"the dictionary (default {DEFAULT_SET})",
    )
    p.add_argument("--queried", type=int, default=200, help="queried facts (default 200)")
    p.add_argument(
        "--support", type=int, default=400, help="support facts that teach the query template"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dictd-dir", type=Path, default=DICTD_DIR)
    args = p.parse_args(argv)
    try:
        paths = build(
            args.out,
            spec=SETS[args.set],
            n_queried=args.queried,
            n_support=args.support,
            seed=args.seed,
            dictd_dir=args.dictd_dir,
        )
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
