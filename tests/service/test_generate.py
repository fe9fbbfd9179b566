"""Generate and trace, over real HTTP on the real ``tiny_index``: the response carries the
model's own greedy completion (checked against ``model.generate`` run here, outside the
service) and the training examples ranked for exactly those tokens; spans trace part of a
completion; sampling is reproducible by seed; the batch endpoint and the CLI do the same."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from encoder.batching import Example, tokenize_prompt
from encoder.generation import Generation, generate, token_spans, traced_example
from encoder.model_loading import load_model, load_tokenizer
from engine.index import InfluenceIndex
from service.app import create_app
from service.cli import main as influence_main
from service.settings import Settings
from tests.service.live import live_server
from tests.tolerances import FLOAT16_SCORE, recompute_bound

PROMPT = "The capital of Drosora is"
MAX_NEW = 12


@pytest.fixture(scope="module")
def server(tiny_index):
    # Generation and span tracing are checked against the first stage's brute force; the
    # second stage over such queries is test_certified's and test_rescore's.
    settings = Settings(
        index_dir=tiny_index, max_new_tokens=MAX_NEW, max_batch_size=8, max_wait_ms=10, rescore=0
    )
    with live_server(create_app(settings)) as base:
        with httpx.Client(base_url=base, timeout=120) as client:
            yield client


@pytest.fixture(scope="module")
def opened(tiny_index):
    index = InfluenceIndex.open(tiny_index)
    yield index
    index.close()


@pytest.fixture(scope="module")
def reference(tiny_index, opened):
    """Greedy decoding by transformers itself, on a fresh copy of the model."""
    model_dir = opened.manifest.model.path
    model, tokenizer = load_model(model_dir, device="cpu"), load_tokenizer(model_dir)
    ids = torch.tensor([tokenize_prompt(tokenizer, PROMPT)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return {"prompt_ids": ids[0].tolist(), "ids": new, "text": tokenizer.decode(new)}


def brute_force(index, example: Example, k: int) -> tuple[list[int], np.ndarray]:
    q = index.encode_examples([example])[0]
    scores = np.asarray(index.fingerprints, dtype=np.float32) @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order]


def ask(client, **body) -> httpx.Response:
    return client.post("/v1/influence", json={"prompt": PROMPT, "k": 5, **body})


def test_greedy_generation_is_the_models_and_its_examples_are_ranked(server, opened, reference):
    r = ask(server, generate={"max_new_tokens": MAX_NEW})
    assert r.status_code == 200, r.text
    body = r.json()
    assert reference["ids"], "the test model generates at least one token"
    assert body["completion"] == reference["text"]
    gen = body["generation"]
    assert gen["n_tokens"] == len(reference["ids"]) and gen["seed"] is None
    assert gen["finish_reason"] == ("eos" if len(reference["ids"]) < MAX_NEW else "length")
    assert body["span"] == {"start": 0, "end": len(reference["text"])}
    # The generated token ids themselves are traced.
    ids = tuple(reference["prompt_ids"] + reference["ids"])
    n_prompt = len(reference["prompt_ids"])
    want, scores = brute_force(
        opened, Example(ids, (False,) * n_prompt + (True,) * len(reference["ids"])), 5
    )
    assert [x["id"] for x in body["results"]] == want
    gaps = np.abs(np.array([x["score"] for x in body["results"]]) - scores)
    assert gaps.max() <= FLOAT16_SCORE + recompute_bound(), gaps


def test_a_one_token_generation_stops_for_length(server, reference):
    body = ask(server, generate={"max_new_tokens": 1}).json()
    assert body["generation"]["finish_reason"] == "length" and body["generation"]["n_tokens"] == 1
    assert reference["text"].startswith(body["completion"])


def test_sampling_is_reproducible_by_seed(server):
    def sample(seed=None):
        g = {"max_new_tokens": 6, "temperature": 1.5} | ({} if seed is None else {"seed": seed})
        r = ask(server, generate=g, return_text=False)
        assert r.status_code == 200, r.text
        return r.json()

    first = sample()
    seed = first["generation"]["seed"]
    assert isinstance(seed, int)
    again = sample(seed)
    assert again["completion"] == first["completion"] and again["results"] == first["results"]
    completions = {sample(s)["completion"] for s in range(6)}
    assert len(completions) > 1, "sampling at temperature 1.5 never varied over 6 seeds"


@pytest.mark.parametrize("temperature", [1e-39, 1e-44, 7.1e-93, 5e-324])
def test_a_vanishing_temperature_samples_the_greedy_limit(server, reference, temperature):
    # These overflowed logits / T to inf and made torch.multinomial raise (a 500).
    r = ask(server, generate={"max_new_tokens": MAX_NEW, "temperature": temperature, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["completion"] == reference["text"]


def test_stable_temperature_is_softmax_of_logits_over_t():
    from transformers import TemperatureLogitsWarper

    from encoder.generation import StableTemperature

    scores = torch.randn(3, 50, dtype=torch.float32) * 8
    for t in (0.05, 0.7, 1.0, 4.0):
        want = torch.softmax(TemperatureLogitsWarper(t)(None, scores.clone()), dim=-1)
        got = torch.softmax(StableTemperature(t)(None, scores.clone()), dim=-1)
        # softmax is shift-invariant; both are float32 over logits of magnitude |s|/t
        bound = 8 * torch.finfo(torch.float32).eps * float(scores.abs().max()) / t
        assert torch.allclose(got, want, rtol=0, atol=bound)
    tiny = StableTemperature(1e-300)(None, scores.clone())
    assert torch.isfinite(torch.softmax(tiny, dim=-1)).all()
    assert torch.equal(torch.softmax(tiny, dim=-1).argmax(-1), scores.argmax(-1))


def test_a_span_traces_only_its_tokens(server, opened):
    completion = " Mutu. It is old"
    tokenizer = opened.tokenizer
    cids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    spans = token_spans(tokenizer, completion, cids)
    assert len(cids) >= 4 and spans[-1][1] == len(completion)
    # Characters 2..4 lie in the first token or two; the rest of the completion is dropped.
    body = ask(server, completion=completion, span={"start": 2, "end": 4}).json()
    hit = [i for i, (s, e) in enumerate(spans) if s < 4 and e > 2]
    assert body["span"] == {"start": spans[hit[0]][0], "end": spans[hit[-1]][1]}
    pids = tokenize_prompt(tokenizer, PROMPT)
    ids = tuple(pids + cids[: hit[-1] + 1])
    mask = (False,) * (len(pids) + hit[0]) + (True,) * len(hit)
    want, _ = brute_force(opened, Example(ids, mask), 5)
    assert [x["id"] for x in body["results"]] == want
    whole = ask(server, completion=completion).json()
    assert [x["id"] for x in whole["results"]] != want, (
        "the span changed nothing: this test could not fail"
    )
    # An end past the completion's end: to its end. A start past it; an empty span.
    tail = ask(server, completion=completion, span={"start": 3, "end": 10**5}).json()
    assert tail["span"]["end"] == len(completion)
    r = ask(server, completion=completion, span={"start": len(completion), "end": 10**5})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_span"
    r = ask(server, completion=completion, span={"start": 3, "end": 3})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_generate_with_a_span(server, reference):
    body = ask(server, generate={"max_new_tokens": MAX_NEW}, span={"start": 0, "end": 1}).json()
    assert body["completion"] == reference["text"]
    assert body["span"]["start"] == 0 and body["span"]["end"] <= len(reference["text"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"generate": {"max_new_tokens": MAX_NEW + 1}}, 413, "input_too_long"),
        ({"generate": {"max_new_tokens": 0}}, 422, "validation_error"),
        ({"generate": {"max_new_tokens": 4, "temperature": -1}}, 422, "validation_error"),
        ({"generate": {"max_new_tokens": 4}, "completion": " x"}, 422, "validation_error"),
        ({}, 422, "validation_error"),
    ],
)
def test_bad_generate_requests(server, body, status, code):
    r = ask(server, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_batch_generates_and_validates_per_query(server):
    queries = [
        {"prompt": PROMPT, "generate": {"max_new_tokens": MAX_NEW}, "k": 3},
        {"prompt": PROMPT, "completion": ""},  # fails its own validation only
        {"prompt": PROMPT, "completion": " Mutu.", "k": 3},
        {"prompt": PROMPT, "generate": {"max_new_tokens": MAX_NEW + 5}},
        {"prompt": PROMPT, "completion": " Mutu.", "unknown": 1},
    ]
    r = server.post("/v1/influence/batch", json={"queries": queries})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [e["query_index"] for e in out["errors"]] == [1, 3, 4]
    assert [e["status"] for e in out["errors"]] == [422, 413, 422]
    assert out["errors"][0]["error"]["details"]["field"] == "completion"
    assert out["errors"][2]["error"]["details"]["field"] == "unknown"
    assert (
        out["responses"][1] is None and out["responses"][3] is None and out["responses"][4] is None
    )
    single = ask(server, generate={"max_new_tokens": MAX_NEW}, k=3).json()
    assert out["responses"][0]["completion"] == single["completion"]
    assert [x["id"] for x in out["responses"][0]["results"]] == [x["id"] for x in single["results"]]
    assert out["responses"][2]["completion"] == " Mutu."
    # A call that is not a list of objects still fails as a whole.
    assert server.post("/v1/influence/batch", json={"queries": [3]}).status_code == 422


def test_cli_generate_answers_what_the_service_answers(server, tiny_index, capsys):
    rc = influence_main(
        [
            "query",
            "--index",
            str(tiny_index),
            "--prompt",
            PROMPT,
            "--generate",
            str(MAX_NEW),
            "-k",
            "5",
            "--json",
            "--rescore",
            "0",  # as this module's server is configured
        ]
    )
    assert rc == 0
    cli = json.loads(capsys.readouterr().out)
    body = ask(server, generate={"max_new_tokens": MAX_NEW}).json()
    assert cli["completion"] == body["completion"] and cli["generation"] == body["generation"]
    assert [x["id"] for x in cli["results"]] == [x["id"] for x in body["results"]]
    assert influence_main(["query", "--index", str(tiny_index), "--prompt", PROMPT]) == 2
    assert "--completion" in capsys.readouterr().err


def test_generate_leaves_the_global_rng_alone(opened):
    state = torch.get_rng_state()
    generate(
        opened.encoder.model,
        tokenize_prompt(opened.tokenizer, PROMPT),
        Generation(4, temperature=1.0, seed=3),
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(state, torch.get_rng_state())


def test_token_spans_without_a_fast_tokenizer_follow_the_decoded_prefixes(opened):
    class Slow:  # the decode fallback, on the same vocabulary
        is_fast = False
        decode = staticmethod(opened.tokenizer.decode)

    for text in (" Mutu, hello 2.0", " héllo wörld ≥ 2"):
        ids = opened.tokenizer(text, add_special_tokens=False)["input_ids"]
        slow = token_spans(Slow(), text, ids)
        assert len(slow) == len(ids) and slow[0][0] == 0 and slow[-1][1] == len(text)
        assert all(
            a[1] == b[0] for a, b in zip(slow, slow[1:], strict=False)
        )  # contiguous, monotone
        if (
            text.isascii()
        ):  # every token is whole characters: the fast offsets, up to trimmed spaces
            fast = token_spans(opened.tokenizer, text, ids)
            assert all(
                fs <= fe and s <= fs and fe <= e
                for (s, e), (fs, fe) in zip(slow, fast, strict=True)
            )


def test_traced_example_marks_the_span():
    spans = [(0, 3), (3, 5), (5, 9)]
    example, snapped = traced_example([7, 8], [1, 2, 3], spans, (4, 6))
    assert example.input_ids == (7, 8, 1, 2, 3) and example.target_mask == (
        False,
        False,
        False,
        True,
        True,
    )
    assert snapped == (3, 9)
    example, snapped = traced_example([7], [1, 2, 3], spans, (0, 1))
    assert (
        example.input_ids == (7, 1) and example.target_mask == (False, True) and snapped == (0, 3)
    )
    example, snapped = traced_example([7], [1, 2, 3], spans, None)
    assert example.target_mask == (False, True, True, True)


def test_explain_with_the_querys_span_splits_the_spans_score(server):
    completion = " Mutu. It is old"
    span = {"start": 0, "end": 8}
    body = ask(server, completion=completion, span=span).json()
    top = body["results"][0]
    r = server.post(
        "/v1/influence/explain",
        json={"prompt": PROMPT, "completion": completion, "id": top["id"], "span": span},
    )
    assert r.status_code == 200, r.text
    explained = r.json()
    assert abs(explained["index_score"] - top["score"]) <= FLOAT16_SCORE + recompute_bound()
    whole = server.post(
        "/v1/influence/explain", json={"prompt": PROMPT, "completion": completion, "id": top["id"]}
    ).json()
    assert abs(whole["index_score"] - explained["index_score"]) > FLOAT16_SCORE + recompute_bound()
