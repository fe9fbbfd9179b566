"""One query's failure never touches another's answer, whatever the exception.

Before: a sampling temperature of 1e-44 made ``torch.multinomial`` raise a plain
``RuntimeError`` inside the batch; every query batched with it got 500, a ``/batch`` call
with it failed whole, and the keep-alive connection was dropped. Here a fake index raises
plain exceptions the same way (in generation, in the shared encode pass, in a lookup), and
each must stay with the query that caused it, over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from encoder.batching import Example
from encoder.generation import Generated, Generation
from engine.certify import RESCORE_CHUNK
from service.app import create_app
from service.settings import Settings
from tests.service.fakes import FakeIndex, Record
from tests.service.live import assert_same_results, live_server

POISON_PROMPT = "encode bug"


class BrokenIndex(FakeIndex):
    """Raises what a bug would: not a project error, so nothing upstream expects it."""

    poison_ids: tuple[int, ...] = ()

    def generate(self, prompt_ids: list[int], options: Generation) -> Generated:
        if 0 < options.temperature < 1e-30:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return super().generate(prompt_ids, options)

    def encode_examples(self, examples: list[Example]) -> np.ndarray:
        n = len(self.poison_ids)
        if any(
            tuple(e.input_ids[i : i + n]) == self.poison_ids
            for e in examples
            for i in range(len(e.input_ids))
        ):
            raise RuntimeError("shape mismatch in a kernel")
        return super().encode_examples(examples)

    def example(self, id: int) -> Record:  # noqa: A002 - the contract's name
        if id == 13:
            raise KeyError("a metadata bug")
        return super().example(id)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("broken")

    def opener(path):
        index = BrokenIndex(path, encode_delay_s=0.05)
        index.poison_ids = tuple(index.tokenizer(POISON_PROMPT)["input_ids"])
        return index

    settings = Settings(index_dir=index_dir, max_batch_size=16, max_wait_ms=200)
    with live_server(create_app(settings, opener=opener)) as url:
        yield url


VALID = {"prompt": "what is", "completion": " this", "k": 3}
HOT = {
    "prompt": "sample",
    "generate": {"max_new_tokens": 4, "temperature": 1e-44, "seed": 1},
    "k": 3,
}


def _post(base: str, body: dict) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30) as client:
        return client.post("/v1/influence", json=body)


@pytest.mark.parametrize(
    "poison",
    [HOT, {"prompt": POISON_PROMPT, "completion": " x", "k": 3}],
    ids=["generation", "shared-encode"],
)
def test_a_failing_query_fails_alone_among_concurrent_clients(base, poison):
    valid = [{**VALID, "prompt": f"what is {i}"} for i in range(12)]
    with ThreadPoolExecutor(len(valid) + 1) as pool:
        bad = pool.submit(_post, base, poison)
        good = [pool.submit(_post, base, body) for body in valid]
        responses = [f.result() for f in good]
        failed = bad.result()
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error", (
        failed.text
    )
    assert "probability" not in failed.text and "kernel" not in failed.text  # never echoed
    assert [r.status_code for r in responses] == [200] * len(valid), [r.text for r in responses]
    for body, response in zip(valid, responses, strict=True):
        assert_same_results(response.json()["results"], _post(base, body).json()["results"])


def test_a_batch_call_answers_its_valid_queries_beside_a_failing_one(base):
    queries = [{**VALID, "prompt": f"q{i}"} for i in range(7)]
    queries.insert(3, HOT)
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/v1/influence/batch", json={"queries": queries})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [resp is None for resp in body["responses"]] == [i == 3 for i in range(8)]
    (error,) = body["errors"]
    assert (error["query_index"], error["status"], error["error"]["code"]) == (
        3,
        500,
        "internal_error",
    )


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None):
    payload = None if body is None else json.dumps(body)
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.getheader("connection"), json.loads(response.read())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/influence", HOT), ("GET", "/v1/examples/13", None)],
    ids=["query", "unexpected-exception-in-a-route"],
)
def test_a_500_keeps_the_connection_for_the_next_request(base, method, path, body):
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        status, connection, error = _exchange(conn, method, path, body)
        assert status == 500 and error["error"]["code"] == "internal_error"
        assert connection != "close"
        status, _, answer = _exchange(conn, "POST", "/v1/influence", VALID)  # same socket
        assert status == 200 and len(answer["results"]) == 3
    finally:
        conn.close()


class GatedIndex(FakeIndex):
    """Records each chunk the exact stage scores, and holds the second one until released:
    the test decides when the work happens, no sleep does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunks: list[int] = []
        self.release = threading.Event()
        self.waiting = threading.Event()

    def exact_scorer(self, example):
        score = super().exact_scorer(example)

        def gated(ids):
            self.chunks.append(len(ids))
            if len(self.chunks) == 2:
                self.waiting.set()
                self.release.wait(60)
            return score(ids)

        return gated


def test_a_timed_out_query_stops_consuming_the_model(tmp_path):
    """Before: a query whose request timed out (503) ran all its candidates anyway. Now its
    second stage stops at the next chunk: here after the one in flight when it gave up."""
    opened: list[GatedIndex] = []

    def opener(path):
        opened.append(GatedIndex(path))
        return opened[-1]

    settings = Settings(index_dir=tmp_path, request_timeout_s=1.0, max_wait_ms=0)
    with live_server(create_app(settings, opener=opener)) as url:
        index = opened[0]
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/v1/influence", json={**VALID, "k": 5, "rescore": 100})
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout", r.text
            assert index.waiting.is_set()  # it timed out while the second chunk was held
            index.release.set()
            after = client.post(
                "/v1/influence", json={**VALID, "k": 5, "rescore": 0}
            )  # queued behind it
            assert after.status_code == 200
    # The first k, the chunk in flight; not the other 63 candidates.
    assert index.chunks == [5, RESCORE_CHUNK], index.chunks
