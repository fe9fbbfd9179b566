"""The web UI in headless chromium against the live API on a real index: query, ranked
cards, detail, per-token heat map, API errors in plain words, phone width, keyboard."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.index import InfluenceIndex
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
    """The ranking the engine gives at the index's defaults (the exact second stage included),
    computed in this process, not by the service the page talks to."""
    from engine.batch import run_batch
    from engine.query import Limits, Query

    index = InfluenceIndex.open(ui_index_dir)
    try:
        limits = Limits(max_prompt_tokens=512, max_completion_tokens=MAX_COMPLETION_TOKENS)
        query = Query(fact_query.prompt, fact_query.completion, 5)
        (outcome,) = run_batch(index, [query], limits)
        n_long = len(index.tokenizer(" x" * 40, add_special_tokens=False)["input_ids"])
        return {
            "ids": [h.id for h in outcome.hits],
            "scores": [h.score for h in outcome.hits],
            "n_long": n_long,
            "model": index.manifest.to_dict()["model"],
        }
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
    ids = [
        int(x)
        for x in page.eval_on_selector_all("#results .card", "els => els.map(e => e.dataset.id)")
    ]
    assert ids == expected["ids"]
    shown = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert np.allclose(
        shown, expected["scores"], rtol=0, atol=5e-4 + 1e-12
    )  # toFixed(3) rounds by <= 5e-4
    # Bars are relative to the best result: the top one is full, the others its share.
    widths = page.eval_on_selector_all(
        "#results .fill", "els => els.map(e => parseFloat(e.style.width))"
    )
    top = max(abs(x) for x in expected["scores"])
    assert widths[0] == 100.0
    assert np.allclose(
        widths, [abs(x) / top * 100 for x in expected["scores"]], rtol=0, atol=0.05 + 0.1
    )  # toFixed(1), float16
    assert [r.strip() for r in page.locator("#results .rank").all_inner_texts()] == [
        f"#{i}" for i in range(1, 6)
    ]
    # The serving panel shows /v1/index; the status line the query's timing.
    info = httpx.get(ui_server + "/v1/index").json()
    assert page.locator("#serving-model").inner_text() == info["model"]
    # A display name (run/checkpoint-N), not the checkpoint folder's bare base name.
    ckpt = Path(expected["model"]["path"])
    assert info["model"] == expected["model"]["name"] == f"{ckpt.parent.name}/{ckpt.name}"
    assert info["index_version"].startswith(page.locator("#serving-index").inner_text()[:12])
    assert page.locator("#serving-size").inner_text() == str(info["size"])
    # The mode menu offers exactly the modes the server's schema accepts.
    mode = httpx.get(ui_server + "/openapi.json").json()["components"]["schemas"]["InfluenceQuery"][
        "properties"
    ]["mode"]
    options = page.eval_on_selector_all("#mode option", "els => els.map(e => e.value)")
    assert options == [*(mode.get("enum") or [mode["const"]]), "compare"]
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
        "t => document.getElementById('detail-text').textContent === t", arg=example["text"]
    )
    assert f"Training example {top_id}" in page.locator("#detail-title").inner_text()

    page.get_by_role("button", name="Explain tokens").click()
    page.wait_for_selector("#heatmap .tok")
    contributions = [
        float(x)
        for x in page.eval_on_selector_all(
            "#heatmap .tok", "els => els.map(e => e.dataset.contribution)"
        )
    ]
    # The heat map's contributions sum to the result's score.
    # The recomputed score vs the float16-stored one the search ranked by.
    assert sum(contributions) == pytest.approx(
        expected["scores"][0], abs=FLOAT16_SCORE + recompute_bound()
    )
    assert contributions[0] == 0.0 and any(c != 0.0 for c in contributions)
    tops = page.locator("#top-tokens li").all_inner_texts()
    assert len(tops) == min(8, len(contributions))
    # Each top token names its position; the largest |contribution| is listed first.
    positions = [int(t.split()[1]) for t in tops]
    assert len(set(positions)) == len(positions)
    assert positions[0] == int(np.argmax(np.abs(contributions)))
    # The example ends with the end-of-sequence token it was indexed with: a marker, not "</s>".
    heat = page.locator("#heatmap").inner_text()
    assert "</s>" not in heat and "<|endoftext|>" not in heat
    special = page.eval_on_selector_all(
        "#heatmap .tok.special", "els => els.map(e => e.dataset.position)"
    )
    assert special == [str(len(contributions) - 1)], special
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert page.evaluate("document.activeElement.closest('.card').dataset.id") == str(top_id)


def test_api_errors_in_plain_words(page, ui_server, expected):
    _search(page, ui_server, "The capital of Drosora is", " x" * 40)
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == (
        f"completion too long: {expected['n_long']} tokens, limit {MAX_COMPLETION_TOKENS}"
    )
    assert page.locator("#results .card").count() == 0

    page.get_by_label("Completion").fill("")
    page.get_by_role("button", name="Search").click()
    page.wait_for_function(
        "() => document.getElementById('error').textContent.includes('completion')"
    )
    assert error.inner_text().startswith("Invalid input: completion")


def test_phone_width_and_screenshot(browser, ui_server, fact_query):
    """No horizontal scrolling at 390 px, in the result and the compare view.
    ``UI_SCREENSHOT=docs/ui.png`` saves the result page there, the per-token view as
    ``docs/ui_tokens.png``, the compare view as ``docs/ui_compare.png`` and a generated
    trace as ``docs/ui_generate.png``."""
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    try:
        _search(page, ui_server, fact_query.prompt, fact_query.completion)
        page.wait_for_selector("#results .card")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        _compare(page, ui_server, fact_query.prompt, fact_query.completion, 5)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        labels = page.eval_on_selector_all(
            "input, textarea, select", "els => els.map(e => e.labels.length)"
        )
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
        page.keyboard.press("Escape")
        _compare(page, ui_server, fact_query.prompt, fact_query.completion, 5)
        page.screenshot(path=target.replace(".png", "_compare.png"), full_page=False)
        page.get_by_label("Question", exact=True).select_option("influence")
        page.get_by_label("Completion").fill("")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector("#generated:not([hidden])")
        page.wait_for_selector("#results .card")
        page.screenshot(path=target.replace(".png", "_generate.png"), full_page=False)
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
                "() => document.getElementById('error').textContent.includes('not accepted')"
            )
            page.get_by_label("API key").fill("ui-test-key")
            page.get_by_role("button", name="Search").click()
            page.wait_for_selector("#results .card")
            assert error.is_hidden() and page.locator("#results .card").count() == 2
        finally:
            context.close()


def test_highlighting_marks_whole_words_only(page, ui_server):
    """A completion " Version 2.0" marks "Version" and "2.0" as whole words; never a bare
    "2", "0" or ".0", punctuation or a stop word."""
    page.goto(ui_server + "/")
    page.wait_for_function("() => typeof highlighted === 'function'")
    marks = page.evaluate("""() => {
        const p = document.createElement('p');
        p.append(highlighted('Version 2.0 ships. Then 2 or 0 or 0.5 and version 2.0, the end.',
                             highlightTerms('', ' Version 2.0 of the')));
        return [...p.querySelectorAll('mark')].map(m => m.textContent);
    }""")
    assert marks == ["Version", "2.0", "version", "2.0"]


def test_no_failed_requests_and_a_favicon(page, ui_server, fact_query):
    failed = []
    page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)
    _search(page, ui_server, fact_query.prompt, fact_query.completion)
    page.wait_for_selector("#results .card")
    assert failed == []
    icon = page.eval_on_selector("link[rel=icon]", "e => e.href")
    r = httpx.get(icon)
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")


def _api(base, **body):
    r = httpx.post(base + "/v1/influence", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _compare(page, base, prompt, completion, k):
    page.goto(base + "/")
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Completion").fill(completion)
    page.get_by_label("Number of results").fill(str(k))
    page.wait_for_selector("#mode option[value=compare]", state="attached")
    page.get_by_label("Question", exact=True).select_option("compare")
    page.get_by_role("button", name="Search").click()
    page.wait_for_selector("#compare-attribution .card")


def test_compare_view_marks_the_passages_both_rankings_share(page, ui_server, fact_query):
    k = 10
    _compare(page, ui_server, fact_query.prompt, fact_query.completion, k)
    influence = _api(ui_server, prompt=fact_query.prompt, completion=fact_query.completion, k=k)
    lexical = _api(
        ui_server,
        prompt=fact_query.prompt,
        completion=fact_query.completion,
        k=k,
        mode="attribution",
    )

    def ids(sel: str) -> list[int]:
        return [int(x) for x in page.eval_on_selector_all(sel, "els => els.map(e => e.dataset.id)")]

    assert ids("#compare-influence .card") == [r["id"] for r in influence["results"]]
    assert ids("#compare-attribution .card") == [r["id"] for r in lexical["results"]]
    shared = {r["id"] for r in influence["results"]} & {r["id"] for r in lexical["results"]}
    assert shared, "the fact query's own passage should rank in both top-10s"
    assert (
        set(ids("#compare-influence .card.shared"))
        == shared
        == set(ids("#compare-attribution .card.shared"))
    )
    assert f"share {len(shared)} of their top {k}" in page.locator("#compare-summary").inner_text()
    # Each column names the method that answered its question.
    assert page.locator("#compare-influence-method").inner_text() == influence["method"]
    assert page.locator("#compare-attribution-method").inner_text() == lexical["method"]
    assert page.locator("#results .card").count() == 0
    # Back to one ranking: the compare view goes away.
    page.get_by_label("Question", exact=True).select_option("influence")
    page.get_by_role("button", name="Search").click()
    page.wait_for_selector("#results .card")
    assert page.locator("#compare").is_hidden()


def test_generate_button_traces_the_models_completion(page, ui_server, fact_query):
    page.goto(ui_server + "/")
    page.get_by_label("Prompt").fill(fact_query.prompt)
    page.get_by_label("Completion").fill("")
    page.get_by_label("Number of results").fill("5")
    page.get_by_label("Tokens to generate").fill("8")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#results .card")
    want = _api(ui_server, prompt=fact_query.prompt, generate={"max_new_tokens": 8}, k=5)
    assert page.locator("#generated").is_visible()
    assert page.eval_on_selector("#generated-text", "e => e.textContent") == want["completion"]
    assert page.get_by_label("Completion").input_value() == want["completion"]
    ids = [
        int(x)
        for x in page.eval_on_selector_all("#results .card", "els => els.map(e => e.dataset.id)")
    ]
    assert ids == [r["id"] for r in want["results"]]
    n = want["generation"]["n_tokens"]
    assert f"({n} tokens" in page.locator("#generated-info").inner_text()
    # A plain search afterwards hides the generated line.
    page.get_by_role("button", name="Search").click()
    page.wait_for_function("() => document.getElementById('generated').hidden")


def test_the_api_docs_render_without_internet(page, ui_server):
    """Before, /docs loaded Swagger UI from a CDN and was a blank page offline. Every request
    off this machine is refused here; the page must still render the API's title and its
    operations from the server's own assets."""
    off_machine: list[str] = []

    def only_loopback(route):
        host = route.request.url.split("/")[2].split(":")[0]
        if host == "127.0.0.1":
            route.continue_()
        else:
            off_machine.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.goto(ui_server + "/docs")
    title = page.locator(".swagger-ui .info .title").first
    title.wait_for(state="visible")
    assert "Influence search" in title.inner_text()
    page.get_by_text("/v1/influence/batch").first.wait_for(state="visible")
    assert off_machine == []
    assert (
        httpx.get(ui_server + "/redoc").status_code == 404
    )  # not served: Redoc fetches from a CDN


def test_the_second_stage_control_and_its_report(page, ui_server, fact_query):
    """The UI can turn the exact second stage off (rescore 0) and says how it ended: the
    candidates re-scored and whether the top results are certain."""
    bodies: list[dict] = []

    def record(request):
        if request.method == "POST" and request.url.endswith("/v1/influence"):
            bodies.append(request.post_data_json)

    page.on("request", record)
    _search(page, ui_server, fact_query.prompt, fact_query.completion)
    page.wait_for_selector("#results .card")
    assert "rescore" not in bodies[-1]  # on: the server's default (the exact stage, here)
    assert "candidates re-scored exactly" in page.locator("#status").inner_text()
    page.get_by_label("Exact second stage").select_option("off")
    page.get_by_role("button", name="Search").click()
    page.wait_for_function(
        "() => document.querySelector('#status').textContent.includes('first stage only')"
    )
    assert bodies[-1]["rescore"] == 0
    # A certified answer's report, as the server words it for a sketch index.
    real = _api(ui_server, prompt=fact_query.prompt, completion=fact_query.completion, k=5)
    report = {"candidates": 17, "certified": True, "confidence": 0.95, "miss_probability": 0.01}
    fake = {**real, "rescore": report, "timings_ms": {**real["timings_ms"], "rescore": 42.0}}
    page.route("**/v1/influence", lambda route: route.fulfill(json=fake))
    page.get_by_label("Exact second stage").select_option("certified")
    page.get_by_role("button", name="Search").click()
    page.wait_for_function(
        "() => document.querySelector('#status').textContent.includes('certain')"
    )
    status = page.locator("#status").inner_text()
    assert "re-score 42 ms; 17 candidates re-scored exactly, top results certain at 0.95" in status
