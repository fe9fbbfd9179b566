"""The example a newcomer copies first (README's curl, httpx and client snippets, the API's
example query, the UI's placeholder) is a fact the demo corpus states and asks, so the first
query returns the passages that state it. Before, "The capital of Veloria is" -> " Quenton."
appeared nowhere in the demo corpus and its top score was 0.022."""

from __future__ import annotations

import re
from pathlib import Path

from api.models import EXAMPLE_QUERY
from evaluation.corpus import generate_fact_corpus
from evaluation.demo import SIZES

REPO = Path(__file__).resolve().parents[2]


def test_the_example_query_is_a_demo_fact():
    corpus = generate_fact_corpus(SIZES["full"].corpus, seed=0)
    prompt, completion = EXAMPLE_QUERY["prompt"], EXAMPLE_QUERY["completion"]
    assert isinstance(prompt, str) and isinstance(completion, str)
    (query,) = [q for q in corpus.queries if q.prompt == prompt]
    assert completion.rstrip(".") == query.completion
    stating = [p for p in corpus.passages if p.id in query.relevant_ids]
    assert stating and all(query.completion.strip() in p.text for p in stating)
    assert any(f"{prompt}{completion}" in p.text for p in stating)


def test_every_newcomer_snippet_uses_the_example():
    prompt = EXAMPLE_QUERY["prompt"]
    readme = (REPO / "README.md").read_text()
    ui = (REPO / "service" / "static" / "index.html").read_text()
    assert f'placeholder="{prompt}"' in ui
    prompts = set(re.findall(r'"prompt": "([^"]+)"', readme)) | set(
        re.findall(r'prompt="([^"]+)"', readme)
    )
    assert prompts == {prompt}, prompts
