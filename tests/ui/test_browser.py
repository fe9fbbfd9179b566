"""The web UI in headless chromium against the live API on a real index: query, ranked
cards, detail, per-token heat map, API errors in plain words, phone width, keyboard."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest

from indexer.artifacts import InfluenceIndex
from service.app import create_app
from service.settings import Settings
from tests.service.live import live_server
from tests.tolerances import FLOAT16_SCORE, recompute_bound
from tests.ui.conftest import MAX_COMPLETION_TOKENS


@pytest.fixture(scope="module")
def fact_query(fact_corpus):
    """A query of the fact corpus whose answer is a single word."""
    return next(q for q in fact_corpus.queries if len(q.completion.split()) == 1)


@pytest.fixture(scope="module")
def expected(ui_index_dir, fact_query):
    """The exact ranking, brute force over the stored fingerprints (not the service)."""
    index = InfluenceIndex.open(ui_index_dir)
    try:
        q = index.encode_queries([(fact_query.prompt, fact_query.completion)])[0]
        scores = np.asarray(index.fingerprints, dtype=np.float32) @ q
        order = np.argsort(-scores, kind="stable")[:5]
        n_long = len(index.tokenizer(" x" * 40, add_special_tokens=False)["input_ids"])
        return {"ids": [int(i) for i in order], "scores": scores[order].tolist(), "n_long": n_long,
                "model": index.manifest["model"]}
    finally:
        index.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def _search(page, base, prompt, completion, k=5):
    page.goto(base + "/")
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Completion").fill(completion)
    page.get_by_label("Number of results").fill(str(k))
    page.get_by_role("button", name="Search").click()


def test_query_renders_ranked_cards(page, ui_server, fact_query, expected):
    _search(page, ui_server, fact_query.prompt, fact_query.completion)
    page.wait_for_selector("#results .card")
    ids = [int(x) for x in page.eval_on_selector_all("#results .card", "els => els.map(e => e.dataset.id)")]
    assert ids == expected["ids"]
    shown = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert np.allclose(shown, expected["scores"], rtol=0, atol=5e-4 + 1e-12)  # toFixed(3) rounds by <= 5e-4
    widths = page.eval_on_selector_all("#results .fill", "els => els.map(e => parseFloat(e.style.width))")
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    # The serving panel shows /v1/index; the status line the query's timing.
    info = httpx.get(ui_server + "/v1/index").json()
    assert page.locator("#serving-model").inner_text() == info["model"]
    assert info["index_version"].startswith(page.locator("#serving-index").inner_text()[:12])
    assert page.locator("#serving-size").inner_text() == str(info["size"])
    # The mode menu offers exactly the modes the server's schema accepts.
    mode = httpx.get(ui_server + "/openapi.json").json()["components"]["schemas"]["InfluenceQuery"]["properties"]["mode"]
    options = page.eval_on_selector_all("#mode option", "els => els.map(e => e.value)")
    assert options == (mode.get("enum") or [mode["const"]])
    status = page.locator("#status").inner_text()
    assert status.startswith("5 results in ") and "encode" in status and "search" in status
    # The answer word is highlighted in the top card when the card contains it.
    word = fact_query.completion.strip()
    top = page.locator("#results .card").first
    if word in top.inner_text():
        assert word in top.locator("mark.hl-completion").all_inner_texts()
    assert page.locator("#error").is_hidden()


def test_detail_and_token_heatmap_by_keyboard(page, ui_server, fact_query, expected):
    _search(page, ui_server, fact_query.prompt, fact_query.completion, k=3)
    page.wait_for_selector("#results .card")
    first = page.locator("#results .card button").first
    first.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#detail")
    dialog.wait_for(state="visible")
    top_id = expected["ids"][0]
    example = httpx.get(f"{ui_server}/v1/examples/{top_id}").json()
    page.wait_for_function(
        "t => document.getElementById('detail-text').textContent === t", arg=example["text"])
    assert f"Training example {top_id}" in page.locator("#detail-title").inner_text()

    page.get_by_role("button", name="Explain tokens").click()
    page.wait_for_selector("#heatmap .tok")
    contributions = [float(x) for x in page.eval_on_selector_all(
        "#heatmap .tok", "els => els.map(e => e.dataset.contribution)")]
    # The heat map's contributions sum to the result's score.
    # The recomputed score vs the float16-stored one the search ranked by.
    assert sum(contributions) == pytest.approx(expected["scores"][0], abs=FLOAT16_SCORE + recompute_bound())
    assert contributions[0] == 0.0 and any(c != 0.0 for c in contributions)
    assert len(page.locator("#top-tokens li").all()) == min(8, len(contributions))
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert page.evaluate("document.activeElement.closest('.card').dataset.id") == str(top_id)


def test_api_errors_in_plain_words(page, ui_server, expected):
    _search(page, ui_server, "The capital of Veloria is", " x" * 40)
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == (
        f"completion too long: {expected['n_long']} tokens, limit {MAX_COMPLETION_TOKENS}")
    assert page.locator("#results .card").count() == 0

    page.get_by_label("Completion").fill("")
    page.get_by_role("button", name="Search").click()
    page.wait_for_function("() => document.getElementById('error').textContent.includes('completion')")
    assert error.inner_text().startswith("Invalid input: completion")


def test_phone_width_and_screenshot(browser, ui_server, fact_query):
    """No horizontal scrolling at 390 px. ``UI_SCREENSHOT=docs/ui.png`` saves the result
    page there, and the per-token view as ``docs/ui_tokens.png``."""
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    try:
        _search(page, ui_server, fact_query.prompt, fact_query.completion)
        page.wait_for_selector("#results .card")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        labels = page.eval_on_selector_all(
            "input, textarea, select", "els => els.map(e => e.labels.length)")
        assert labels and all(n == 1 for n in labels)
    finally:
        context.close()
    target = os.environ.get("UI_SCREENSHOT")
    if target:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        _search(page, ui_server, fact_query.prompt, fact_query.completion)
        page.wait_for_selector("#results .card")
        page.screenshot(path=target, full_page=False)
        page.locator("#results .card button").first.click()
        page.get_by_role("button", name="Explain tokens").click()
        page.wait_for_selector("#heatmap .tok")
        page.screenshot(path=target.replace(".png", "_tokens.png"), full_page=False)
        context.close()


def test_api_key_prompt_and_use(browser, ui_index_dir, fact_query):
    """With auth on, the UI says a key is needed, then sends the typed key."""
    settings = Settings(index_dir=ui_index_dir, api_keys=["ui-test-key"])
    with live_server(create_app(settings)) as base:
        context = browser.new_context()
        page = context.new_page()
        try:
            _search(page, base, fact_query.prompt, fact_query.completion, k=2)
            error = page.locator("#error")
            error.wait_for(state="visible")
            assert error.inner_text() == "This service needs an API key: enter it above."
            page.get_by_label("API key").fill("wrong-key")
            page.get_by_role("button", name="Search").click()
            page.wait_for_function(
                "() => document.getElementById('error').textContent.includes('not accepted')")
            page.get_by_label("API key").fill("ui-test-key")
            page.get_by_role("button", name="Search").click()
            page.wait_for_selector("#results .card")
            assert error.is_hidden() and page.locator("#results .card").count() == 2
        finally:
            context.close()
