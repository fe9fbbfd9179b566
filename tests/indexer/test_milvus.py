"""An index on Milvus, against a real Milvus Lite gRPC server started here (no mocks):
push, resume after a crash mid-push without duplicates, search equal to local FAISS Flat
(in process and over HTTP), a mismatched collection refused, backend down -> 503."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.errors import ArtifactError, NotFoundError
from benchmarks.bench_milvus import LiteServer
from engine import milvus as em
from engine.index import InfluenceIndex, OpenOptions
from indexer import milvus as mv
from indexer.__main__ import main
from service.app import create_app
from service.settings import Settings
from tests.service.live import assert_same_results, live_server
from tests.tolerances import assert_within, gamma, recompute_bound

pytest.importorskip("pymilvus")
QUERIES = [
    ("The capital of Drosora is", " Mutu."),
    ("Cara Nalkun works for", " Buneco"),
    ("Drorex is headquartered in", " Dutrus"),
]


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    server = LiteServer(tmp_path_factory.mktemp("milvus") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pushed(lite, tiny_index):
    report = mv.push(tiny_index, mv.MilvusTarget(lite.uri), batch_size=32)
    return report


def _count(uri: str, name: str) -> tuple[int, int]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        rows = client.query(name, filter="id >= 0", output_fields=["id"], limit=16384)
        ids = [int(r["id"]) for r in rows]
        return len(ids), len(set(ids))
    finally:
        client.close()


def test_push_uploads_every_row_once_and_a_rerun_adds_nothing(pushed, lite, tiny_index, capsys):
    n = json.loads((tiny_index / "manifest.json").read_text())["counts"]["sequences"]
    assert pushed["inserted"] == n and pushed["present"] == 0
    assert pushed["vector_type"] == "FLOAT_VECTOR"  # Milvus Lite has no float16 vectors
    assert _count(lite.uri, pushed["collection"]) == (n, n)
    assert main(["index", "push", str(tiny_index), "--milvus", lite.uri, "--no-progress"]) == 0
    assert f"0 inserted, {n} already there" in capsys.readouterr().out
    assert _count(lite.uri, pushed["collection"]) == (n, n)


def test_push_resumes_after_a_crash_without_duplicates(lite, tiny_index, monkeypatch):
    from pymilvus import MilvusClient

    target = mv.MilvusTarget(lite.uri, "resume_test")
    real_upsert, calls = MilvusClient.upsert, []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies here: two batches are in
        return real_upsert(self, *args, **kwargs)

    monkeypatch.setattr(MilvusClient, "upsert", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        mv.push(tiny_index, target, batch_size=16)
    monkeypatch.setattr(MilvusClient, "upsert", real_upsert)
    assert _count(lite.uri, "resume_test") == (32, 32)
    with pytest.raises(ArtifactError, match="did not finish"):  # an unfinished push is never served
        InfluenceIndex.open(tiny_index, OpenOptions(milvus=target))
    report = mv.push(tiny_index, target, batch_size=16)
    n = report["inserted"] + report["present"]
    assert report["present"] == 32 and _count(lite.uri, "resume_test") == (n, n)


def test_search_through_milvus_equals_local_flat(pushed, lite, tiny_index):
    local = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    remote = InfluenceIndex.open(
        tiny_index, OpenOptions(device="cpu", milvus=mv.MilvusTarget(lite.uri))
    )
    try:
        assert isinstance(remote.vectors, em.MilvusSearch)  # no FAISS index loaded
        q = local.encode_queries(QUERIES)
        want_scores, want_ids = local.search(q, 10)
        got_scores, got_ids = remote.search(q, 10)
        assert np.array_equal(got_ids, want_ids)
        # Both score the same float16 values widened to float32, summed in another order.
        assert np.abs(got_scores - want_scores).max() <= recompute_bound(np.float32)
        over, over_ids = remote.search(q[:1], local.size + 3)
        assert (over_ids[0, -3:] == -1).all() and np.isneginf(over[0, -3:]).all()
        # Metadata comes from the collection too, equal to the local store's.
        assert isinstance(remote.store, em.MilvusMetadata)
        ids = [int(i) for i in want_ids[0]] + [0, local.size - 1]
        assert remote.examples(ids) == local.examples(ids)
        assert remote.token_ids(ids[0]) == local.token_ids(ids[0]) and remote.token_ids(ids[0])
        with pytest.raises(NotFoundError):
            remote.example(local.size)
    finally:
        local.close()
        remote.close()


def test_serving_through_milvus_answers_what_local_serving_answers(pushed, lite, tiny_index):
    body = {"prompt": QUERIES[0][0], "completion": QUERIES[0][1], "k": 8}
    with live_server(create_app(Settings(index_dir=tiny_index))) as base:
        want = httpx.post(base + "/v1/influence", json=body, timeout=60).json()
    with live_server(create_app(Settings(index_dir=tiny_index, milvus_uri=lite.uri))) as base:
        got = httpx.post(base + "/v1/influence", json=body, timeout=60).json()
        backend = httpx.get(base + "/v1/index", timeout=10).json()["backend"]
        metrics = httpx.get(base + "/metrics", timeout=10).text
    assert_same_results(got["results"], want["results"])
    assert backend.startswith(f"Milvus at {lite.uri}, collection influence_"), backend
    assert f'influence_vector_backend_info{{backend="{backend}"' in metrics


def test_a_collection_of_another_index_is_refused(pushed, lite, tiny_index, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_index, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["corpus"]["republished"] = "another version"  # another index version, same config
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    target = mv.MilvusTarget(lite.uri, pushed["collection"])
    with pytest.raises(ArtifactError) as info:
        InfluenceIndex.open(other, OpenOptions(milvus=target))
    assert info.value.code == "milvus_mismatch"
    with pytest.raises(ArtifactError) as info:
        mv.push(other, target)
    assert info.value.code == "milvus_mismatch"
    assert (
        main(
            [
                "index",
                "push",
                str(other),
                "--milvus",
                lite.uri,
                "--collection",
                pushed["collection"],
            ]
        )
        == 2
    )


def test_fingerprints_over_milvus_dims_are_folded_and_reranked(lite, tiny_index, monkeypatch):
    """A fingerprint wider than Milvus takes is pushed folded (``mv.fold``); the server folds its
    queries alike and re-ranks the candidates against the stored fingerprints: with every
    sequence a candidate, the answers are local Flat's, scores exact."""
    dim = int(json.loads((tiny_index / "manifest.json").read_text())["counts"]["dim"])
    monkeypatch.setattr(mv, "MAX_DIM", dim // 2)
    target = mv.MilvusTarget(lite.uri, "fold_test")
    mv.push(tiny_index, target, batch_size=64)
    local = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    remote = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu", milvus=target))
    try:
        assert isinstance(remote.vectors, em.MilvusSearch)
        width = remote.vectors.fold_width
        assert width == mv.fold_width(dim) and dim // 3 <= width <= dim // 2
        q = local.encode_queries(QUERIES)
        remote.vectors.candidates = local.size
        scores, ids = remote.search(q, 5)
        want_scores, want_ids = local.search(q, 5)
        assert np.array_equal(ids, want_ids)
        assert np.abs(scores - want_scores).max() <= recompute_bound(np.float32)
    finally:
        local.close()
        remote.close()


def test_the_fold_keeps_inner_products_in_expectation():
    """The fold is linear, an isometry on a vector within one part, and its signs are balanced
    +-1 (so the cross terms of <x', y'> cancel in expectation)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 1000)).astype(np.float32)
    fx, fy = mv.fold(np.stack([x, y]), 400)
    both = mv.fold((x + 2 * y)[None], 400)[0]
    # Float32 sums of 3 parts and 3 terms: gamma_8 of the summed magnitudes bounds both sides.
    mag = np.pad(np.abs(x) + 2 * np.abs(y), (0, 200)).reshape(3, 400).sum(0)
    assert_within(both, fx + 2 * fy, 2 * gamma(8) * mag, "fold of a sum")
    part = np.zeros(1000, dtype=np.float32)
    part[400:800] = x[400:800]
    assert np.linalg.norm(mv.fold(part[None], 400)) == pytest.approx(np.linalg.norm(part))
    signs = mv.fold_signs(10_000)
    assert set(np.unique(signs)) == {-1.0, 1.0} and abs(signs.sum()) < 5 * 100
    assert np.array_equal(mv.fold(x[None], 1000)[0], x)  # wide enough: unchanged


def test_backend_down_is_503_with_retry_after(tiny_index, tmp_path):
    server = LiteServer(tmp_path / "data")
    server.start()
    try:
        mv.push(tiny_index, mv.MilvusTarget(server.uri), batch_size=64)
        settings = Settings(index_dir=tiny_index, milvus_uri=server.uri, milvus_timeout_s=2.0)
        with live_server(create_app(settings)) as base:
            body = {"prompt": QUERIES[0][0], "completion": QUERIES[0][1], "k": 3}
            assert httpx.post(base + "/v1/influence", json=body, timeout=60).status_code == 200
            server.stop()
            started = time.monotonic()
            r = httpx.post(base + "/v1/influence", json=body, timeout=60)
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "search_backend_unavailable"
            assert time.monotonic() - started < 30  # bounded by the timeout, never a hang
            ready = httpx.get(base + "/readyz", timeout=30)
            assert (
                ready.status_code == 503
                and ready.json()["error"]["code"] == "search_backend_unavailable"
            )
    finally:
        server.stop()


def test_serve_flags_reach_the_settings():
    from service.cli import build_parser
    from service.commands import _settings_from

    args = build_parser().parse_args(
        ["serve", "--index", "x", "--milvus", "http://db:19530", "--collection", "c1"]
    )
    settings = _settings_from(args)
    assert (settings.milvus_uri, settings.milvus_collection) == ("http://db:19530", "c1")


def test_an_approximate_collection_is_reranked_exactly(lite, tiny_index):
    """IVF_FLAT in Milvus: its candidates are re-ranked against the stored fingerprints, so
    the scores are the exact inner products, as for a local approximate index."""
    target = mv.MilvusTarget(lite.uri, "ivf_test")
    mv.push(tiny_index, target, index_type="IVF_FLAT", index_params={"nlist": 4})
    local = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    remote = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu", milvus=target))
    try:
        assert (
            isinstance(remote.vectors, em.MilvusSearch) and remote.vectors.index_type == "IVF_FLAT"
        )
        q = local.encode_queries(QUERIES)
        scores, ids = remote.search(q, 5)
        fps = np.asarray(local.fingerprints, dtype=np.float32)
        exact = np.take_along_axis(q @ fps.T, ids, axis=1)
        assert (ids >= 0).all() and np.abs(scores - exact).max() <= recompute_bound(np.float32)
        assert (np.diff(scores, axis=1) <= 0).all()
        # Approximate recall (Milvus Lite's IVF returned at most nprobe = 16 hits per query
        # here): the clear best match of each query is found.
        assert np.array_equal(ids[:, 0], local.search(q, 1)[1][:, 0])
    finally:
        local.close()
        remote.close()


def test_push_killed_mid_way_resumes_without_duplicates(lite, tiny_index):
    """A real SIGKILL of `influence index push` mid-way, then a rerun: every id once."""
    exe = Path(sys.executable).with_name("influence")
    cmd = [
        str(exe),
        "index",
        "push",
        str(tiny_index),
        "--milvus",
        lite.uri,
        "--collection",
        "killed",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = json.loads((tiny_index / "manifest.json").read_text())["counts"]["sequences"]
    deadline = time.monotonic() + 120
    rows = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            rows = _count(lite.uri, "killed")[0]
        except Exception:  # noqa: BLE001 - the collection may not exist yet
            rows = 0
        if rows >= 5:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    partial = _count(lite.uri, "killed")
    assert 0 < partial[0] < n and partial[0] == partial[1], f"kill landed at {partial} of {n} rows"
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert _count(lite.uri, "killed") == (n, n)


def test_a_stale_presence_check_still_writes_no_duplicates(pushed, lite, tiny_index, monkeypatch):
    """Should the check not see rows already written (a lagging replica), upsert by id
    still leaves every id once."""
    from pymilvus import MilvusClient

    real_query = MilvusClient.query
    monkeypatch.setattr(
        MilvusClient,
        "query",
        lambda self, name, **kw: [] if "filter" in kw else real_query(self, name, **kw),
    )
    report = mv.push(tiny_index, mv.MilvusTarget(lite.uri), batch_size=64)
    monkeypatch.setattr(MilvusClient, "query", real_query)
    n = report["inserted"]
    assert report["present"] == 0 and _count(lite.uri, pushed["collection"]) == (n, n)


def test_a_milvus_lite_file_serves_in_process_and_says_so(tiny_index, tmp_path, caplog):
    """``--milvus ./file.db`` runs Milvus Lite inside this process: the push succeeds with no
    gRPC traceback on screen (Milvus Lite lacks AllocTimestamp, which pymilvus falls back
    from), and the opened index names its backend."""
    import logging

    db = tmp_path / "lite.db"
    with caplog.at_level(logging.INFO):
        assert main(["index", "push", str(tiny_index), "--milvus", str(db), "--no-progress"]) == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    index = InfluenceIndex.open(tiny_index, OpenOptions(milvus=mv.MilvusTarget(str(db))))
    try:
        backend = index.summary().backend
        assert (
            backend.startswith(f"Milvus Lite in this process ({db})")
            and "collection influence_" in backend
        )
    finally:
        index.close()
