"""Live server on the real ``tiny_index`` over HTTP on 127.0.0.1: the service answers what
``influence query`` answers, batches equal singles, concurrent clients never get mixed
results, overload is a prompt 503, and an index swap under load fails no request."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.app import create_app
from service.cli import main as influence_main
from service.settings import Settings
from tests.service.live import assert_same_results, live_server

KEY = "admin-key"
PROMPTS = [
    ("The capital of Drosora is", " Mutu."),
    ("Marta Lind was born in", " Osterby."),
    ("The river that runs through Kesh is the", " Amber."),
    ("", "Mutu"),
    ("Who wrote the ledger?", " The scribe of Drosora."),
    ("Favourite colour:", " blue"),
]


def republish(src, dst, note: str):
    """A copy of a published index whose manifest differs (so its version differs)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["corpus"]["republished"] = note
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dst


@pytest.fixture(scope="module")
def server(tiny_index, tmp_path_factory):
    settings = Settings(
        index_dir=tiny_index,
        api_keys=[KEY],
        admin_keys=[KEY],
        max_batch_size=8,
        max_wait_ms=10,
        reload_root=tmp_path_factory.getbasetemp(),
    )
    with live_server(create_app(settings)) as base:
        client = httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": KEY})
        yield client
        client.close()


def influence(client, prompt, completion, k=10, **extra):
    r = client.post(
        "/v1/influence", json={"prompt": prompt, "completion": completion, "k": k, **extra}
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_results_equal_influence_query(server, tiny_index, capsys):
    prompt, completion = PROMPTS[0]
    rc = influence_main(
        [
            "query",
            "--index",
            str(tiny_index),
            "--prompt",
            prompt,
            "--completion",
            completion,
            "-k",
            "10",
            "--json",
        ]
    )
    assert rc == 0
    cli_rows = json.loads(capsys.readouterr().out)["results"]
    body = influence(server, prompt, completion, k=10)
    assert len(cli_rows) == 10
    assert_same_results(body["results"], cli_rows)
    assert [r["document_id"] for r in body["results"]] == [r["document_id"] for r in cli_rows]
    summary = server.get("/v1/index").json()
    assert summary["backend"] == "faiss Flat on the CPU"
    info = f'influence_vector_backend_info{{backend="faiss Flat on the CPU",index_version="{summary["index_version"]}"}} 1.0'
    assert info in server.get("/metrics").text
    assert body["index_version"] == summary["index_version"]
    assert summary["size"] == summary["counts"]["sequences"] > 0
    assert summary["faiss"] == "Flat" and summary["fingerprint"]["config"]["projection"] == "sketch"


def test_batch_equals_singles(server):
    queries = [{"prompt": p, "completion": c, "k": 5} for p, c in PROMPTS]
    r = server.post("/v1/influence/batch", json={"queries": queries})
    assert r.status_code == 200, r.text
    for q, got in zip(queries, r.json()["responses"], strict=True):
        assert_same_results(got["results"], influence(server, **q)["results"])


def test_concurrent_clients_get_their_own_results(server):
    singles = {pc: influence(server, *pc, k=8)["results"] for pc in PROMPTS}
    before = server.get("/metrics").text
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(36)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        bodies = list(pool.map(lambda pc: influence(server, *pc, k=8), jobs))
    for pc, body in zip(jobs, bodies, strict=True):
        assert_same_results(body["results"], singles[pc])
    after = server.get("/metrics").text
    # Batching happened: fewer encode passes than queries.
    passes = _value(after, "influence_batch_size_count") - _value(
        before, "influence_batch_size_count"
    )
    queries = _value(after, "influence_batch_size_sum") - _value(before, "influence_batch_size_sum")
    assert queries == len(jobs) and passes < len(jobs)


def test_example_and_errors_on_real_model(server):
    first = influence(server, *PROMPTS[0], k=1)["results"][0]
    example = server.get(f"/v1/examples/{first['id']}").json()
    assert example["text"] == first["text"] and example["id"] == first["id"]
    size = server.get("/v1/index").json()["size"]
    r = server.get(f"/v1/examples/{size}")
    assert r.status_code == 404 and r.json()["error"]["code"] in ("not_found", "unknown_id")
    # Past the model's context (128 positions): 413, not a 500.
    r = server.post("/v1/influence", json={"prompt": "word " * 200, "completion": " x"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_long"


def test_reload_under_load_fails_no_request(server, tiny_index, tmp_path):
    v0 = server.get("/v1/index").json()["index_version"]
    new = republish(tiny_index, tmp_path / "v1", "v1")
    bad = shutil.copytree(tiny_index, tmp_path / "bad")
    (bad / "index.faiss").write_bytes(b"\0" * 64)
    expected = influence(server, *PROMPTS[1], k=5)["results"]

    stop = threading.Event()
    failures: list[str] = []
    versions: set[str] = set()
    served = [0]

    def client_loop():
        with httpx.Client(
            base_url=str(server.base_url), timeout=60, headers={"X-API-Key": KEY}
        ) as c:
            while not stop.is_set():
                r = c.post(
                    "/v1/influence",
                    json={"prompt": PROMPTS[1][0], "completion": PROMPTS[1][1], "k": 5},
                )
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                body = r.json()
                versions.add(body["index_version"])
                try:
                    assert_same_results(body["results"], expected)
                except AssertionError as exc:
                    failures.append(str(exc))
                served[0] += 1

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()

    def until(condition, seconds=120.0):  # an ordering point on what the clients saw
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline and not failures, failures
            time.sleep(0.01)

    def more_served(n=2):
        start = served[0]
        until(lambda: served[0] >= start + n)

    try:
        more_served()  # clients are flowing on the first index
        r = server.post("/v1/admin/reload", json={"index_dir": str(new)})
        assert r.status_code == 200, r.text
        assert r.json()["previous_version"] == v0 and r.json()["index_version"] != v0
        v1 = r.json()["index_version"]
        until(lambda: v1 in versions)
        r = server.post("/v1/admin/reload", json={"index_dir": str(bad)})
        assert r.status_code == 422 and r.json()["error"]["code"] in (
            "checksum_mismatch",
            "artifact_error",
        )
        assert server.get("/v1/index").json()["index_version"] == v1  # the old one serves on
        more_served()
        r = server.post("/v1/admin/reload", json={"index_dir": str(tiny_index)})
        assert r.status_code == 200 and r.json()["index_version"] == v0
        more_served()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    assert v0 in versions and v1 in versions
    metrics = server.get("/metrics").text
    assert _value(metrics, "influence_index_reloads_total", outcome="refused") >= 1


def test_overload_is_prompt_503_with_retry_after(tiny_index):
    settings = Settings(
        index_dir=tiny_index, max_batch_size=1, max_wait_ms=0, max_queue=2, retry_after_s=2
    )
    with live_server(create_app(settings)) as base:

        def one(i):
            with httpx.Client(timeout=60) as c:
                t0 = time.perf_counter()
                r = c.post(
                    f"{base}/v1/influence",
                    json={"prompt": f"Query {i} is", "completion": " long" * 20},
                )
                return r, time.perf_counter() - t0

        with ThreadPoolExecutor(max_workers=24) as pool:
            outcomes = list(pool.map(one, range(24)))
        statuses = [r.status_code for r, _ in outcomes]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0
        for r, seconds in outcomes:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "2"
                assert r.json()["error"]["code"] == "overloaded"
                assert seconds < 2.0  # refused at once, not after waiting in line
        metrics = httpx.get(f"{base}/metrics").text
        assert _value(metrics, "influence_rejected_total", code="overloaded") == statuses.count(503)


def _value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_serve_command_reloads_on_sighup(tiny_index, tmp_path):
    """`influence serve` in its own process; a new index published at the same path by
    rename is picked up on SIGHUP; a bad one is refused and the old one serves on."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from deploy.harness import free_port

    served = republish(tiny_index, tmp_path / "served", "a")
    port = free_port()
    exe = Path(sys.executable).parent / "influence"
    proc = subprocess.Popen(
        [str(exe), "serve", "--index", str(served), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"

    def wait_for(predicate, seconds=90):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                ok = predicate()
            except httpx.HTTPError:  # not listening yet
                ok = False
            if ok:
                return True
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        return False

    try:
        assert wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200)
        v_a = httpx.get(f"{base}/v1/index").json()["index_version"]
        republish(tiny_index, tmp_path / "staging", "b")
        os.rename(served, tmp_path / "old")
        os.rename(tmp_path / "staging", served)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: httpx.get(f"{base}/v1/index").json()["index_version"] != v_a)
        v_b = httpx.get(f"{base}/v1/index").json()["index_version"]
        assert (
            influence(httpx.Client(base_url=base, timeout=60), *PROMPTS[0], k=3)["index_version"]
            == v_b
        )

        (served / "index.faiss").write_bytes(b"corrupt")
        proc.send_signal(signal.SIGHUP)
        assert wait_for(
            lambda: (
                'influence_index_reloads_total{outcome="refused"} 1.0'
                in httpx.get(f"{base}/metrics").text
            )
        )
        assert httpx.get(f"{base}/v1/index").json()["index_version"] == v_b
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_serve_command_with_several_workers(server, tiny_index):
    """`influence serve --workers 2`: two processes, each with its own model and index,
    answer like the one-process server (any worker may take any fresh connection)."""
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    from deploy.harness import free_port, wait_http

    port = free_port()
    exe = Path(sys.executable).parent / "influence"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--index",
            str(tiny_index),
            "--port",
            str(port),
            "--workers",
            "2",
            "--torch-threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:  # 20 fresh connections in a row: every worker is ready
            wait_http(f"{base}/readyz", 120, proc, streak=20)
        except RuntimeError as exc:
            raise AssertionError(
                f"{exc}: {proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ''}"
            ) from exc
        workers = [
            c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "python" in c.name().lower() or "influence" in " ".join(c.cmdline())
        ]
        assert len(workers) >= 2
        want = influence(server, *PROMPTS[1], k=5)["results"]  # the one-process server
        for _ in range(6):
            with httpx.Client(base_url=base, timeout=60) as fresh:
                assert_same_results(influence(fresh, *PROMPTS[1], k=5)["results"], want)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lexical_index_is_held_across_replaced_paths_and_refused_reloads(
    server, tiny_index, tmp_path
):
    """BM25 is opened with the index, not read from its path on the first bm25 query: after
    the directory behind the path is replaced, and after a refused reload, bm25 and hybrid
    answer from the index being served (the module's server, on the same content, says what)."""
    from indexer.bm25 import BM25Index

    served = republish(tiny_index, tmp_path / "served", "bm25-held")
    prompt, completion = PROMPTS[0]
    with live_server(
        create_app(
            Settings(index_dir=served, api_keys=[KEY], admin_keys=[KEY], reload_root=tmp_path)
        )
    ) as base:
        client = httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": KEY})
        shutil.move(served, tmp_path / "moved-away")
        shutil.copytree(tiny_index, served)
        shutil.rmtree(served / "bm25")  # the path now holds another lexical index
        texts = [f"{prompt}{completion} other corpus {i}" for i in range(3)]
        BM25Index.build(texts, [10**6 + i for i in range(3)]).save(served)
        bad = republish(tiny_index, tmp_path / "bad", "bad")
        (bad / "fingerprints.f16.npy").write_bytes(b"garbage")
        assert client.post("/v1/admin/reload", json={"index_dir": str(bad)}).status_code == 422
        for mode in ("bm25", "hybrid"):
            got = influence(client, prompt, completion, k=5, mode=mode)
            want = influence(server, prompt, completion, k=5, mode=mode)
            assert_same_results(got["results"], want["results"])
        client.close()


@pytest.mark.parametrize("victim", ["fingerprints.f16.npy", "metadata.sqlite"])
def test_in_place_edits_are_503_and_readyz_says_so(tiny_index, tmp_path, victim):
    """Overwriting a served file in place is unsupported: it is noticed (503 index_changed,
    /readyz 503) instead of a SIGBUS on the truncated memory map or 500s; a reload of a
    published copy recovers."""
    served = republish(tiny_index, tmp_path / "served", "in-place")
    fresh = republish(tiny_index, tmp_path / "fresh", "fresh")
    prompt, completion = PROMPTS[0]
    with live_server(
        create_app(
            Settings(index_dir=served, api_keys=[KEY], admin_keys=[KEY], reload_root=tmp_path)
        )
    ) as base:
        client = httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": KEY})
        influence(client, prompt, completion)
        path = served / victim
        size = path.stat().st_size
        with path.open("r+b") as fh:  # same inode, half the bytes
            fh.truncate(size // 2)
        r = client.post("/v1/influence", json={"prompt": prompt, "completion": completion})
        assert r.status_code == 503 and r.json()["error"]["code"] == "index_changed", r.text
        assert "Retry-After" in r.headers
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "index_changed"
        assert client.post("/v1/admin/reload", json={"index_dir": str(fresh)}).status_code == 200
        assert client.get("/readyz").status_code == 200
        influence(client, prompt, completion)
        client.close()
