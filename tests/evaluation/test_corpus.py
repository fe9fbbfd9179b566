"""The synthetic fact corpus: determinism, ground truth, distractors, serialization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.corpus import (
    DISTRACTOR_SOURCE,
    FACT_SOURCE,
    FactCorpus,
    generate_fact_corpus,
    load_queries,
)


@pytest.fixture(scope="module")
def corpus() -> FactCorpus:
    return generate_fact_corpus("test", seed=0)


def _statements(corpus: FactCorpus) -> dict[str, list[str]]:
    """Every sentence that states each fact, by fact id."""
    return {f.id: f.statements() for f in corpus.facts}


def test_deterministic_by_seed() -> None:
    a, b = generate_fact_corpus("test", seed=3), generate_fact_corpus("test", seed=3)
    assert a == b
    assert generate_fact_corpus("test", seed=4).passages != a.passages


def test_test_size_shape(corpus: FactCorpus) -> None:
    assert 30 <= len(corpus.queries) <= 50
    assert 100 <= len(corpus.passages) <= 200
    assert [p.id for p in corpus.passages] == [f"p{i:05d}" for i in range(len(corpus.passages))]
    assert {p.source for p in corpus.passages} == {FACT_SOURCE, DISTRACTOR_SOURCE}
    assert all(2 <= p.text.count(".") <= 4 for p in corpus.passages)
    assert len(generate_fact_corpus("test", seed=0, n_facts=10).queries) == 10


def test_queries_are_cloze_of_canonical_template(corpus: FactCorpus) -> None:
    by_id = {p.id: p for p in corpus.passages}
    for q in corpus.queries:
        assert q.completion.startswith(" ") and not q.prompt.endswith(" ")
        # The query's exact text opens one of its relevant passages.
        assert any(
            by_id[pid].text.startswith(q.prompt + q.completion + ".") for pid in q.relevant_ids
        )


def test_relevant_passages_state_the_fact(corpus: FactCorpus) -> None:
    by_id = {p.id: p for p in corpus.passages}
    statements = _statements(corpus)
    facts = {f.id: f for f in corpus.facts}
    for q in corpus.queries:
        fact = facts[q.fact_id]
        assert q.relevant_ids
        for pid in q.relevant_ids:
            passage = by_id[pid]
            assert passage.source == FACT_SOURCE and q.fact_id in passage.fact_ids
            assert fact.subject in passage.text and fact.object in passage.text
            assert any(s in passage.text for s in statements[q.fact_id])


def test_each_fact_stated_in_two_passages_with_two_templates(corpus: FactCorpus) -> None:
    by_id = {p.id: p for p in corpus.passages}
    for fact_id, sentences in _statements(corpus).items():
        q = next(q for q in corpus.queries if q.fact_id == fact_id)
        assert len(q.relevant_ids) >= 2
        used = {s for s in sentences for pid in q.relevant_ids if s in by_id[pid].text}
        assert len(used) >= 2


def test_no_other_passage_states_the_fact(corpus: FactCorpus) -> None:
    statements = _statements(corpus)
    for q in corpus.queries:
        others = [p for p in corpus.passages if p.id not in q.relevant_ids]
        assert not any(s in p.text for s in statements[q.fact_id] for p in others)
    distractors = [p for p in corpus.passages if p.source == DISTRACTOR_SOURCE]
    assert distractors and all(not p.fact_ids for p in distractors)


def test_distractors_share_entities_with_facts(corpus: FactCorpus) -> None:
    distractor_text = " ".join(p.text for p in corpus.passages if p.source == DISTRACTOR_SOURCE)
    shared = [q for q in corpus.queries if q.completion.strip() in distractor_text]
    assert len(shared) >= len(corpus.queries) // 2


def test_write_and_load_round_trip(corpus: FactCorpus, tmp_path: Path) -> None:
    corpus_path, queries_path = corpus.write(tmp_path / "out")
    rows = [json.loads(line) for line in corpus_path.read_text().splitlines()]
    assert rows == [{"id": p.id, "text": p.text, "source": p.source} for p in corpus.passages]
    assert load_queries(queries_path) == corpus.queries


def test_unknown_size_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        generate_fact_corpus("huge")


def test_facts_align_with_queries(corpus: FactCorpus) -> None:
    assert [f.id for f in corpus.facts] == [q.fact_id for q in corpus.queries]
    for f, q in zip(corpus.facts, corpus.queries, strict=True):
        assert q.completion == " " + f.object
        assert q.prompt + q.completion + "." == f.statements()[0]
    assert len({(f.subject, f.relation) for f in corpus.facts}) == len(corpus.facts)


def test_demo_size_shape() -> None:
    demo = generate_fact_corpus("demo", seed=0)
    assert 400 <= len(demo.queries) <= 600
    assert 2000 <= len(demo.passages) <= 4000
    assert len({q.prompt for q in demo.queries}) == len(demo.queries)
