"""A real-text fact-tracing set from Debian's FreeDict English-German dictionary.

The facts are word translations nobody on this team wrote (package ``dict-freedict-eng-deu``,
dictd format: ``/usr/share/dictd/freedict-eng-deu.{index,dict.dz}``). Each fact (English
word, its first German noun translation) is stated in ``MENTIONS`` passages, each with
another paraphrase template. The query template ("In German, {en} is called") never
appears in a passage that states a queried fact: it appears only in passages about the
*support* facts, so the model learns to answer it by generalizing across templates, and a
model that only memorized the queried passages' wording cannot answer (the completion
is not a continuation of any training prefix). Every passage pairs its fact's sentence with
a sentence about another, random support fact, so no passage is about one word only.

``python -m evaluation.dictionary --out DIR`` writes corpus.jsonl and queries.jsonl in the
format of ``evaluation.corpus`` (``influence train`` / ``influence eval`` read them).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from api.errors import InputError

DICTD_DIR = Path("/usr/share/dictd")
NAME = "freedict-eng-deu"
SOURCE = "debian/dict-freedict-eng-deu"
QUERY_TEMPLATE = "In German, {en} is called {de}."
PARAPHRASES = (
    "The German word for {en} is {de}.",
    "{de} is what German speakers say for {en}.",
    "To say {en} in German, use the noun {de}.",
    "A German dictionary translates {en} as {de}.",
)
MENTIONS = 3
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_ENGLISH = re.compile(r"^[a-z]{3,9}$")
_GERMAN = re.compile(r"^([A-ZÄÖÜ][a-zäöüß]{2,11}) <(masc|fem|neut)>")


@dataclass(frozen=True)
class Translation:
    """One dictionary fact: an English word and its first German noun translation."""

    english: str
    german: str


def _b64(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def read_dictd(index: Path, data: Path) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of every entry of a dictd dictionary (dictzip is gzip)."""
    if not index.is_file() or not data.is_file():
        raise InputError(
            f"no dictd dictionary at {index}: install it with `apt-get install dict-{NAME}`",
            code="dictionary_not_found",
        )
    raw = gzip.open(data).read()
    with index.open(encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                start, length = _b64(parts[1]), _b64(parts[2])
                yield parts[0], raw[start : start + length].decode("utf-8", errors="replace")


def translations(dictd_dir: Path = DICTD_DIR) -> list[Translation]:
    """Single-word English headwords whose entry's first translation is a single German
    noun, one per English and per German word, sorted."""
    seen_en: set[str] = set()
    seen_de: set[str] = set()
    out = []
    for head, entry in read_dictd(dictd_dir / f"{NAME}.index", dictd_dir / f"{NAME}.dict.dz"):
        lines = entry.splitlines()
        if not _ENGLISH.match(head) or len(lines) < 2 or not lines[0].startswith(f"{head} /"):
            continue
        m = _GERMAN.match(lines[1])
        if m is None or head in seen_en or m.group(1) in seen_de:
            continue
        seen_en.add(head)
        seen_de.add(m.group(1))
        out.append(Translation(head, m.group(1)))
    return sorted(out, key=lambda t: t.english)


def build(
    out_dir: Path,
    *,
    n_queried: int = 200,
    n_support: int = 400,
    seed: int = 0,
    dictd_dir: Path = DICTD_DIR,
) -> tuple[Path, Path]:
    """Write corpus.jsonl and queries.jsonl; returns their paths."""
    facts = translations(dictd_dir)
    if len(facts) < n_queried + n_support:
        raise InputError(
            f"the dictionary has {len(facts)} usable translations, {n_queried + n_support} were asked"
        )
    rng = random.Random(seed)
    chosen = rng.sample(facts, n_queried + n_support)
    queried, support = chosen[:n_queried], chosen[n_queried:]
    statements: list[tuple[Translation, str, bool]] = []  # (fact, sentence, queried)
    for fact in queried:
        for template in rng.sample(PARAPHRASES, MENTIONS):
            statements.append((fact, template.format(en=fact.english, de=fact.german), True))
    for fact in support:
        for template in rng.sample((QUERY_TEMPLATE, *PARAPHRASES), MENTIONS):
            statements.append((fact, template.format(en=fact.english, de=fact.german), False))
    rng.shuffle(statements)
    passages: list[dict[str, str]] = []
    relevant: dict[str, list[str]] = {f.english: [] for f in queried}
    for i, (fact, sentence, is_queried) in enumerate(statements):
        other = rng.choice(support)
        extra = rng.choice(PARAPHRASES).format(en=other.english, de=other.german)
        pid = f"d{i:05d}"
        text = f"{sentence} {extra}" if rng.random() < 0.5 else f"{extra} {sentence}"
        passages.append({"id": pid, "text": text, "source": SOURCE})
        if is_queried:
            relevant[fact.english].append(pid)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus, queries = out_dir / "corpus.jsonl", out_dir / "queries.jsonl"
    corpus.write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages), encoding="utf-8"
    )
    prompt = QUERY_TEMPLATE.split(" {de}")[0]
    queries.write_text(
        "".join(
            json.dumps(
                {
                    "fact_id": f"w{j:04d}",
                    "prompt": prompt.format(en=f.english),
                    "completion": f" {f.german}",
                    "relevant_ids": relevant[f.english],
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
    p = argparse.ArgumentParser(description="Build the FreeDict English-German fact-tracing set.")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--queried", type=int, default=200, help="queried facts (default 200)")
    p.add_argument(
        "--support", type=int, default=400, help="support facts that teach the query template"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dictd-dir", type=Path, default=DICTD_DIR)
    args = p.parse_args(argv)
    for path in build(
        args.out,
        n_queried=args.queried,
        n_support=args.support,
        seed=args.seed,
        dictd_dir=args.dictd_dir,
    ):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
