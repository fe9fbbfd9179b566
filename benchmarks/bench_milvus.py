"""Search through Milvus vs local FAISS (issue 19): recall@10 against exact search over the
same float16 vectors, and p50/p99 latency at batch 1 and 32, on a published index and on
synthetic fingerprint-like vectors (``bench_search.Synthetic``).

Milvus here is a real Milvus Lite gRPC server on 127.0.0.1 (``milvus-lite server``), started
by this script; a Milvus cluster answers the same API (README, "When one machine is not
enough") with its own, much faster, engine: these numbers measure our client path and the
equality of answers, not Milvus's speed at scale.

    python -m benchmarks.bench_milvus [--quick] [--index DIR] [--n 100000] [--d 256]
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.bench_common import machine, md_table, percentiles_ms, write_results
from benchmarks.bench_search import Synthetic, recall_at
from deploy.harness import free_port

log = logging.getLogger("bench_milvus")


class LiteServer:
    """``milvus-lite server`` on 127.0.0.1 in its own process (tests and this benchmark)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> LiteServer:
        exe = Path(sys.executable).with_name("milvus-lite")
        self.proc = subprocess.Popen(
            [
                str(exe),
                "server",
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("milvus-lite server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


def _latency(fn, queries: np.ndarray, batch: int, calls: int) -> dict[str, float]:
    times = []
    for i in range(calls):
        q = queries[(i * batch) % len(queries) :][:batch]
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return percentiles_ms(times)


def _compare(
    name: str, store: np.ndarray, queries: np.ndarray, milvus_search, k: int, calls: int
) -> list[dict[str, Any]]:
    """Rows for local FAISS Flat and Milvus on the same float16 store."""
    flat = faiss.IndexFlatIP(store.shape[1])
    flat.add(np.asarray(store, dtype=np.float32))
    truth_scores, truth = flat.search(queries, k)
    exact = queries.astype(np.float64) @ np.asarray(store, dtype=np.float64).T  # [Q, N]
    # Two float32 computations of the same dot differ by at most 2 d u |q| |x| (unit rows):
    # an answer within that of the k-th score is a tie, not a miss.
    slack = 2 * store.shape[1] * 2.0**-24

    def tie_recall(found: np.ndarray) -> float:
        kth = truth_scores[:, -1:].astype(np.float64) - slack
        hits = np.take_along_axis(exact, np.maximum(found[:, :k], 0), axis=1) >= kth
        return float(np.mean(hits & (found[:, :k] >= 0)))

    rows = []
    for backend, fn in (
        ("FAISS Flat (local)", lambda q: flat.search(q, k)),
        ("Milvus (Lite, FLAT)", milvus_search),
    ):
        found = fn(queries)[1]
        row: dict[str, Any] = {
            "data": name,
            "backend": backend,
            "recall@10": recall_at(found, truth),
            "recall@10, ties counted": tie_recall(found),
            "same top-10 order": float(
                np.mean([np.array_equal(f, t) for f, t in zip(found, truth, strict=True)])
            ),
        }
        for b in (1, 32):
            lat = _latency(fn, queries, b, calls if b == 1 else max(2, calls // 8))
            row[f"b{b} p50 ms"], row[f"b{b} p99 ms"] = lat["p50_ms"], lat["p99_ms"]
        rows.append(row)
    return rows


def bench_index(index_dir: Path, server: LiteServer, calls: int) -> list[dict[str, Any]]:
    from engine.index import InfluenceIndex, OpenOptions
    from indexer import milvus as mv

    t0 = time.perf_counter()
    mv.push(index_dir, mv.MilvusTarget(server.uri, "bench_index"))
    log.info("pushed %s in %.1f s", index_dir, time.perf_counter() - t0)
    idx = InfluenceIndex.open(
        index_dir, OpenOptions(device="cpu", milvus=mv.MilvusTarget(server.uri, "bench_index"))
    )
    try:
        store = np.asarray(idx.fingerprints)
        rng = np.random.default_rng(0)
        # Real queries: fingerprints of training sequences' own text as completions.
        records = idx.examples(rng.choice(idx.size, size=min(64, idx.size), replace=False).tolist())
        pairs = [
            (r.text[: len(r.text) // 2], r.text[len(r.text) // 2 :])
            for r in records
            if len(r.text) > 8
        ]
        queries = idx.encode_queries(pairs)

        return _compare(
            f"index of {idx.manifest.model.name} ({idx.size} x {store.shape[1]})",
            store,
            queries,
            lambda q: idx.search(q, 10),
            10,
            calls,
        )
    finally:
        idx.close()


def bench_synthetic(
    n: int, d: int, server: LiteServer, calls: int, work: Path
) -> list[dict[str, Any]]:
    from pymilvus import DataType, MilvusClient

    from engine import milvus as em
    from indexer import milvus as mv

    gen = Synthetic(n, d)
    store = gen.write_store(work / "store.npy")
    queries = gen.queries(64, signal=0.25).astype(np.float32)
    client = MilvusClient(uri=server.uri, timeout=60)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("fingerprint", DataType.FLOAT_VECTOR, dim=d)
    params = client.prepare_index_params()
    params.add_index("fingerprint", index_type="FLAT", metric_type="IP")
    client.create_collection("synthetic", schema=schema, index_params=params)
    t0 = time.perf_counter()
    for s in range(0, n, 5000):
        block = np.asarray(store[s : s + 5000], dtype=np.float32)
        client.insert(
            "synthetic", [{"id": s + i, "fingerprint": v.tolist()} for i, v in enumerate(block)]
        )
    client.flush("synthetic")
    client.load_collection("synthetic")
    log.info("inserted %d x %d in %.1f s", n, d, time.perf_counter() - t0)
    client.close()
    search = em.MilvusSearch.attach(
        mv.MilvusTarget(server.uri, timeout_s=120), "synthetic", n
    )  # the served path
    try:
        return _compare(
            f"synthetic {n} x {d}", store, queries, lambda q: search.search(q, 10), 10, calls
        )
    finally:
        search.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--index", type=Path, default=None, help="a published index to push and search"
    )
    parser.add_argument("--n", type=int, default=100_000, help="synthetic vectors (default 100000)")
    parser.add_argument("--d", type=int, default=256, help="synthetic dims (default 256)")
    parser.add_argument(
        "--quick", action="store_true", help="5k synthetic vectors, few calls (smoke run)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        import pymilvus  # noqa: F401
    except ImportError:
        print(
            "bench_milvus: pymilvus / milvus-lite are not installed (pip install '.[dev]'): skipped"
        )
        return 0
    n, calls = (5000, 10) if args.quick else (args.n, 50)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = LiteServer(Path(tmp) / "milvus").start()
        try:
            if args.index is not None:
                rows += bench_index(args.index, server, calls)
            rows += bench_synthetic(n, args.d, server, calls, Path(tmp))
        finally:
            server.stop()
    columns = [
        "data",
        "backend",
        "recall@10",
        "same top-10 order",
        "b1 p50 ms",
        "b1 p99 ms",
        "b32 p50 ms",
        "b32 p99 ms",
    ]
    md = (
        "# Search through Milvus vs local FAISS\n\n"
        "Recall@10 against exact search over the same float16 vectors; latency per call "
        "(batch 1: one query, batch 32: 32 queries), Milvus Lite's gRPC server on 127.0.0.1.\n\n"
        + md_table(rows, columns)
        + "\n"
    )
    write_results("milvus", {"machine": machine(), "rows": rows, "quick": args.quick}, md, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
