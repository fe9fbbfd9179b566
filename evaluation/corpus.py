"""Seeded synthetic fact corpus in the spirit of T-REx, for fact-tracing evaluation.

A small invented world (people, cities, countries, companies, languages) yields facts
(subject, relation, object). Each queried fact is stated in 2-4 passages, each time with a
different paraphrase template; distractor passages talk about the same entities (other
relations, filler sentences) or use the same templates with other entities, but never state
a queried fact. Every fact has a cloze query (prompt, completion) whose template, the
canonical subject-first one, opens one of the passages that state it, so the query's tokens
are exactly a prefix of a training sequence (Chang et al. 2024, Section 4: T-REx closed-set
fact tracing with passage-level ground truth).

Pure Python and deterministic given the seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from api.errors import InputError
from evaluation.world import CODAS, FILLERS, FIRST_NAMES, ONSETS, RELATIONS, SUFFIX, VOWELS

FACT_SOURCE = "synthetic/facts"
DISTRACTOR_SOURCE = "synthetic/distractor"


@dataclass
class Passage:
    """One training sequence of the corpus.

    Attributes:
        id: Stable passage id ("p00000", dense, in corpus order).
        text: 2-4 sentences.
        source: FACT_SOURCE or DISTRACTOR_SOURCE.
        fact_ids: Ids of the queried facts the passage states (empty for distractors).
    """

    id: str
    text: str
    source: str
    fact_ids: list[str] = field(default_factory=list)


@dataclass
class FactQuery:
    """A cloze query for one fact and its ground truth.

    Attributes:
        fact_id: The fact's id ("f0000").
        prompt: Canonical template up to the object, e.g. "Ana Tesko was born in".
        completion: The object with a leading space, e.g. " Vanor".
        relevant_ids: Ids of the passages that state the fact.
    """

    fact_id: str
    prompt: str
    completion: str
    relevant_ids: list[str]


@dataclass(frozen=True)
class Fact:
    """A queried fact (subject, relation, object), e.g. ("Ana Tesko", "birthplace", "Vanor")."""

    id: str
    subject: str
    relation: str
    object: str

    def statement(self, template_idx: int) -> str:
        """The fact stated with template template_idx of its relation (0: canonical)."""
        return RELATIONS[self.relation][2][template_idx].format(s=self.subject, o=self.object)

    def statements(self) -> list[str]:
        """Every sentence that states the fact, one per template of its relation."""
        return [self.statement(i) for i in range(len(RELATIONS[self.relation][2]))]


@dataclass
class FactCorpus:
    """Passages plus queries with passage-level ground truth.

    Attributes:
        passages: All passages, fact and distractor, in training order.
        queries: One query per fact, in fact id order.
        seed: The seed the corpus was generated from.
        facts: The queried facts, aligned with queries (not written by write()).
    """

    passages: list[Passage]
    queries: list[FactQuery]
    seed: int
    facts: list[Fact] = field(default_factory=list)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write corpus.jsonl ({"id", "text", "source"}) and queries.jsonl.

        Args:
            out_dir: Directory to write into (created if missing).

        Returns:
            (corpus path, queries path).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        corpus_path, queries_path = out_dir / "corpus.jsonl", out_dir / "queries.jsonl"
        with corpus_path.open("w", encoding="utf-8") as f:
            for p in self.passages:
                f.write(json.dumps({"id": p.id, "text": p.text, "source": p.source}) + "\n")
        with queries_path.open("w", encoding="utf-8") as f:
            for q in self.queries:
                f.write(json.dumps(asdict(q)) + "\n")
        return corpus_path, queries_path


@dataclass(frozen=True)
class _SizeSpec:
    n_facts: int
    min_mentions: int  # passages stating each queried fact
    max_mentions: int
    distractor_ratio: float  # distractor passages per fact passage


SIZES: dict[str, _SizeSpec] = {
    "test": _SizeSpec(n_facts=40, min_mentions=2, max_mentions=4, distractor_ratio=0.8),
    "demo": _SizeSpec(n_facts=500, min_mentions=2, max_mentions=4, distractor_ratio=1.0),
}


class _Names:
    """Unique pronounceable words built from syllables."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set(FIRST_NAMES)

    def word(self, suffix: str = "") -> str:
        while True:
            n_syll = self.rng.choice((1, 2, 2))
            root = "".join(
                self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                for _ in range(n_syll)
            )
            name = (root + suffix).capitalize()
            if len(name) >= 4 and name not in self.used:
                self.used.add(name)
                return name


def _build_world(n_facts: int, rng: random.Random) -> list[Fact]:
    """Generate a consistent world with about 2 * n_facts candidate facts."""
    names = _Names(rng)
    n = max(n_facts, 8)
    n_countries, n_languages = max(3, n // 16), max(4, n // 16)
    n_cities, n_people, n_companies = max(6, n // 6), max(6, n // 3), max(3, n // 8)
    countries = [names.word(rng.choice(SUFFIX["country"])) for _ in range(n_countries)]
    languages = [names.word(rng.choice(SUFFIX["language"])) for _ in range(n_languages)]
    cities = [names.word() for _ in range(n_cities)]
    companies = [names.word(rng.choice(SUFFIX["company"])) for _ in range(n_companies)]
    people = [f"{rng.choice(FIRST_NAMES)} {names.word()}" for _ in range(n_people)]

    # Every country gets at least one city, so it can have a capital inside itself.
    city_country = {
        c: countries[i] if i < n_countries else rng.choice(countries) for i, c in enumerate(cities)
    }
    country_language = {k: rng.choice(languages) for k in countries}
    facts: list[Fact] = []
    for k in countries:
        facts.append(
            Fact("", k, "capital", rng.choice([c for c in cities if city_country[c] == k]))
        )
        facts.append(Fact("", k, "official_language", country_language[k]))
    for c in cities:
        facts.append(Fact("", c, "located_in", city_country[c]))
    for p in people:
        born = rng.choice(cities)
        facts.append(Fact("", p, "birthplace", born))
        facts.append(Fact("", p, "employer", rng.choice(companies)))
        facts.append(Fact("", p, "native_language", country_language[city_country[born]]))
    for m in companies:
        facts.append(Fact("", m, "founded_by", rng.choice(people)))
        facts.append(Fact("", m, "headquarters", rng.choice(cities)))
    return facts


def _entity_types(facts: list[Fact]) -> dict[str, str]:
    types: dict[str, str] = {}
    for f in facts:
        s_type, o_type, _ = RELATIONS[f.relation]
        types[f.subject], types[f.object] = s_type, o_type
    return types


class _Layout:
    """Arranges statements into passages; all randomness comes from one rng, in order."""

    def __init__(self, rng: random.Random, world: list[Fact], background: list[Fact]) -> None:
        self.rng = rng
        self.types = _entity_types(world)
        self.background = background

    def filler(self, entity: str) -> str:
        return self.rng.choice(FILLERS[self.types[entity]]).format(e=entity)

    def pad(self, sentences: list[str], keep_first: bool, anchor: Fact) -> list[str]:
        """Add filler or background sentences (never a queried fact) up to 2-4 in total."""
        rng = self.rng
        target = max(len(sentences), rng.randint(2, 4))
        for _ in range(20 * target):
            if len(sentences) >= target:
                break
            if self.background and rng.random() < 0.3:
                extra = rng.choice(self.background).statement(rng.randrange(3))
            else:
                extra = self.filler(rng.choice((anchor.subject, anchor.object)))
            if extra not in sentences:
                sentences.insert(rng.randint(1 if keep_first else 0, len(sentences)), extra)
        return sentences

    def fact_passages(
        self, queried: list[Fact], spec: _SizeSpec
    ) -> list[tuple[list[str], list[Fact]]]:
        """Passages stating queried facts: (sentences, facts stated).

        Each fact is stated min..max_mentions times: once with the canonical template at the
        start of a passage (so the query's tokens prefix a training sequence), otherwise with
        the two paraphrases, so at least two templates are used.
        """
        rng = self.rng
        others: list[tuple[Fact, int]] = []
        for f in queried:
            n_mentions = rng.randint(spec.min_mentions, spec.max_mentions)
            alt = [1, 2]
            rng.shuffle(alt)
            others += [(f, alt[i % 2]) for i in range(n_mentions - 1)]
        rng.shuffle(others)

        out: list[tuple[list[str], list[Fact]]] = []
        for f in queried:
            stated, sentences = [f], [f.statement(0)]
            if others and rng.random() < 0.5 and others[-1][0] != f:
                g, t = others.pop()
                stated.append(g)
                sentences.append(g.statement(t))
            out.append((self.pad(sentences, True, f), stated))
        while others:
            g, t = others.pop()
            stated, sentences = [g], [g.statement(t)]
            if others and rng.random() < 0.5 and others[-1][0] != g:
                h, u = others.pop()
                stated.append(h)
                sentences.append(h.statement(u))
            rng.shuffle(sentences)
            out.append((self.pad(sentences, False, g), stated))
        return out

    def distractors(self, queried: list[Fact], n: int) -> list[list[str]]:
        """Hard negatives around a queried fact: its entities, its relation's templates with
        other entities, its subject with another relation; never a queried fact."""
        rng = self.rng
        by_subject: dict[str, list[Fact]] = {}
        by_relation: dict[str, list[Fact]] = {}
        for b in self.background:
            by_subject.setdefault(b.subject, []).append(b)
            by_relation.setdefault(b.relation, []).append(b)
        out: list[list[str]] = []
        for _ in range(n):
            f = rng.choice(queried)
            sentences = [self.filler(f.subject)]
            same_subject = by_subject.get(f.subject, [])
            same_relation = by_relation.get(f.relation, [])
            if same_subject and rng.random() < 0.7:
                sentences.append(rng.choice(same_subject).statement(rng.randrange(3)))
            if same_relation and rng.random() < 0.7:
                sentences.append(rng.choice(same_relation).statement(rng.randrange(3)))
            sentences = list(dict.fromkeys(sentences))
            rng.shuffle(sentences)
            out.append(self.pad(sentences, False, f))
        return out


def generate_fact_corpus(
    size: str = "test", seed: int = 0, *, n_facts: int | None = None
) -> FactCorpus:
    """Generate the corpus deterministically from (size, seed, n_facts).

    Args:
        size: "test" (~40 facts, ~140 passages) or "demo" (~500 facts, ~2000 passages).
        seed: Seed of the world, the fact sample, templates and passage layout.
        n_facts: Overrides the number of queried facts of the size.

    Returns:
        A FactCorpus whose passages are shuffled and numbered densely.
    """
    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; expected one of {sorted(SIZES)}")
    spec = SIZES[size]
    n = spec.n_facts if n_facts is None else n_facts
    if n < 1:
        raise ValueError(f"n_facts must be positive, got {n}")
    rng = random.Random(f"fact-corpus/{seed}")
    world = _build_world(n, rng)
    layout = _Layout(rng, world, [])
    rng.shuffle(world)
    # Background facts are true in the world but never queried; distractors state them.
    queried = [replace(f, id=f"f{i:04d}") for i, f in enumerate(world[:n])]
    layout.background = world[n:]

    fact_passages = layout.fact_passages(queried, spec)
    distractors = layout.distractors(queried, round(spec.distractor_ratio * len(fact_passages)))
    order = [(s, FACT_SOURCE, stated) for s, stated in fact_passages]
    order += [(s, DISTRACTOR_SOURCE, []) for s in distractors]
    rng.shuffle(order)
    passages: list[Passage] = []
    relevant: dict[str, list[str]] = {f.id: [] for f in queried}
    for i, (sentences, source, stated) in enumerate(order):
        pid = f"p{i:05d}"
        passages.append(Passage(pid, " ".join(sentences), source, [g.id for g in stated]))
        for g in stated:
            relevant[g.id].append(pid)

    queries = []
    for f in queried:
        prompt = RELATIONS[f.relation][2][0].split("{o}")[0].format(s=f.subject).rstrip()
        queries.append(FactQuery(f.id, prompt, " " + f.object, relevant[f.id]))
    return FactCorpus(passages=passages, queries=queries, seed=seed, facts=queried)


QUERIES_SCHEMA = (
    'one JSON object per line: {"prompt": str, "completion": str (non-empty), '
    '"relevant_ids": [corpus ids of the passages that state the fact, at least one], '
    '"fact_id": str (optional; default: the line number)}'
)
"""What ``influence eval --queries`` reads (also in its --help and the README)."""


def load_queries(path: Path) -> list[FactQuery]:
    """Read a queries.jsonl (``QUERIES_SCHEMA``; FactCorpus.write writes one).

    Raises:
        InputError: code ``invalid_queries`` naming the file, line and field, and the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"queries file {path} does not exist", code="queries_not_found")
    queries = []
    with path.open(encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                queries.append(_query_from(line, f"{path}, line {lineno}", lineno))
    return queries


def _query_from(line: str, where: str, lineno: int) -> FactQuery:
    def bad(what: str) -> InputError:
        return InputError(f"{where}: {what}; expected {QUERIES_SCHEMA}", code="invalid_queries")

    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    unknown = sorted(set(obj) - {"fact_id", "prompt", "completion", "relevant_ids"})
    if unknown:
        raise bad(f"unknown field(s) {', '.join(map(repr, unknown))}")
    for name in ("prompt", "completion"):
        if not isinstance(obj.get(name), str):
            raise bad(f"{name!r} is missing or not a string")
    if not obj["completion"]:
        raise bad("'completion' is empty")
    relevant = obj.get("relevant_ids")
    if (
        not isinstance(relevant, list)
        or not relevant
        or not all(isinstance(r, str | int) for r in relevant)
    ):
        raise bad("'relevant_ids' is missing, empty, or not a list of ids")
    return FactQuery(
        str(obj.get("fact_id", lineno - 1)),
        obj["prompt"],
        obj["completion"],
        [str(r) for r in relevant],
    )
