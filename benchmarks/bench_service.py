"""Service benchmark (issue 7, "Service"): latency split, QPS and p50/p99 under load.

Serves an index with ``influence serve`` (uvicorn, a subprocess on 127.0.0.1, free port)
twice, one server at a time: batching on (the default settings) and batching off
(``INFLUENCE_MAX_BATCH_SIZE=1``, ``INFLUENCE_MAX_WAIT_MS=0``). For each:

- single-query latency split: sequential ``POST /v1/influence`` calls; ``timings_ms`` gives
  the server's encode (tokenize + gradient fingerprint), search (FAISS + SQLite) and total;
  tokenize and serialize are timed in-process with the code the service runs
  (``engine.query.validate`` + ``encoder.batching.tokenize_query``, and pydantic's JSON
  serializer on the returned ``InfluenceResponse``); the rest of the client round trip is
  HTTP + framework.
- closed-loop load (a thread and a keep-alive ``http.client`` connection per client): C
  clients each send the next query as soon as the previous one returns, for a bounded
  duration, at C = 1, 4, 8, 16: QPS, p50, p99, failures.

Goals: p99 at concurrency 16 <= 3x single-query p50, QPS at 16 >= 3x QPS at 1; the price
of the shipped default (second stage included): single-query p50 <= 250 ms, QPS at 8 >= 8. The p99
goal is also measured in ``--pairs`` paired windows (concurrency 1, then 16 right after),
judged on their median: one 10 s level is at the mercy of this VM's minute-to-minute drift.
Without ``--index`` a test-size index is built first (fact corpus "test", trained test
model, ``influence index build``), which takes a few CPU minutes.

    python -m benchmarks.bench_service [--quick] [--index DIR] [--duration 10]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bench_common import machine, md_table, percentiles_ms, write_results
from deploy.harness import free_port, wait_http

log = logging.getLogger("bench_service")
CONCURRENCY = (1, 4, 8, 16)
GOAL_P99_RATIO = 3.0
GOAL_QPS_RATIO = 3.0
GOAL_P50_MS = 250.0
GOAL_QPS_AT_8 = 8.0
K = 10
MODES = {
    "batching_on": {},
    "batching_off": {"INFLUENCE_MAX_BATCH_SIZE": "1", "INFLUENCE_MAX_WAIT_MS": "0"},
}


def build_test_index(workdir: Path, proj_dim: int | None = None) -> Path:
    """Corpus "test" -> trained test model -> published index; returns the index dir."""
    from evaluation.corpus import generate_fact_corpus
    from evaluation.train import train_fact_model
    from service.cli import main as influence

    corpus = generate_fact_corpus("test", seed=0)
    corpus_path, queries_path = corpus.write(workdir / "data")
    trained = train_fact_model(corpus, workdir / "train", size="test", seed=0)
    out = workdir / "index"
    argv = [
        "index",
        "build",
        "--model",
        str(trained.checkpoint_dir),
        "--corpus",
        str(corpus_path),
        "--queries",
        str(queries_path),
        "--out",
        str(out),
        "--no-progress",
        *(["-k", str(proj_dim)] if proj_dim is not None else []),
    ]
    if influence(argv) != 0:
        raise RuntimeError(f"influence {' '.join(argv)} failed")
    return out


def load_queries(index_dir: Path, fallback: Path | None) -> list[dict[str, str]]:
    """Query (prompt, completion) pairs: ``fallback`` JSONL, else the fact corpus "test"."""
    if fallback is not None:
        rows = [json.loads(line) for line in fallback.read_text().splitlines() if line.strip()]
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    from evaluation.corpus import generate_fact_corpus

    return [
        {"prompt": q.prompt, "completion": q.completion}
        for q in generate_fact_corpus("test").queries
    ]


class Server:
    """``influence serve`` as a subprocess on 127.0.0.1; a context manager that stops it."""

    def __init__(self, index_dir: Path, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--index",
            str(index_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._log = log_path.open("w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUENCE_")}
        self.proc = subprocess.Popen(
            cmd, env={**full_env, **env}, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        try:
            # With several workers each loads its own index: 20 fresh connections in a row.
            wait_http(self.url + "/readyz", timeout_s, self.proc, streak=20)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; see {self._log.name}") from exc

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def in_process_split(
    index_dir: Path, queries: list[dict[str, str]], response: dict, repeats: int
) -> dict[str, float]:
    """Median ms of the service's tokenize (once per query: validation keeps the tokens for
    the encoder) and of serializing one real response with pydantic, as the route does."""
    from api.models import InfluenceResponse
    from encoder.batching import tokenize_query
    from encoder.model_loading import load_tokenizer
    from engine.index import InfluenceIndex, OpenOptions

    model_dir = Path(json.loads((index_dir / "manifest.json").read_text())["model"]["path"])
    if not model_dir.is_absolute():
        model_dir = index_dir / model_dir
    try:
        tokenizer = load_tokenizer(model_dir)
    except Exception:  # a relative/moved model path: open the index as the server does
        index = InfluenceIndex.open(index_dir, OpenOptions(verify=False))
        tokenizer = index.tokenizer
    tok, ser = [], []
    obj = InfluenceResponse.model_validate(response)
    for i in range(repeats):
        q = queries[i % len(queries)]
        t0 = time.perf_counter()
        tokenize_query(tokenizer, q["prompt"], q["completion"])
        t1 = time.perf_counter()
        obj.model_dump_json()
        t2 = time.perf_counter()
        tok.append(t1 - t0)
        ser.append(t2 - t1)
    return {"tokenize_ms": float(np.median(tok) * 1e3), "serialize_ms": float(np.median(ser) * 1e3)}


def single_query(url: str, queries: list[dict[str, str]], n: int) -> tuple[dict[str, float], dict]:
    """Sequential queries (after a warm-up): median server timings and client round trip."""
    rows: list[tuple[float, float, float, float]] = []
    last: dict = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n + 3):
            body = {**queries[i % len(queries)], "k": K}
            t0 = time.perf_counter()
            r = client.post("/v1/influence", json=body)
            rtt = (time.perf_counter() - t0) * 1e3
            r.raise_for_status()
            last = r.json()
            t = last["timings_ms"]
            if i >= 3:
                rows.append((t["encode"], t["search"], t["total"], rtt))
    arr = np.asarray(rows)
    med = np.median(arr, axis=0)
    out = {
        "encode_ms": med[0],
        "search_ms": med[1],
        "server_total_ms": med[2],
        "client_p50_ms": med[3],
        "client_p99_ms": float(np.percentile(arr[:, 3], 99)),
        "n": n,
    }
    return {k: float(v) for k, v in out.items()}, last


def _load(
    url: str,
    queries: list[dict[str, str]],
    concurrency: int,
    duration_s: float,
    path: str = "/v1/influence",
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` threads, each with its own keep-alive connection, sends
    its next request when one returns (POST a query to ``/v1/influence``, or GET ``path``).

    Plain ``http.client`` in threads: the socket work runs without the GIL and costs the
    client ~0.2 ms per request. (An asyncio httpx client measured itself: on /healthz at 16
    it topped out near 220 req/s on one core with a 400 ms p99 of its own scheduling, where
    this loop measured 1,378 req/s and a 16 ms p99 against the same server.)
    """
    parsed = urllib.parse.urlsplit(url)
    latencies: list[float] = []
    failures: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(w: int) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        mine: list[float] = []
        bad: dict[str, int] = {}
        i = w
        start.wait()
        while time.perf_counter() < deadline[0]:
            body = json.dumps({**queries[i % len(queries)], "k": K})
            i += concurrency
            t0 = time.perf_counter()
            try:
                if path == "/v1/influence":
                    conn.request("POST", path, body, {"content-type": "application/json"})
                else:
                    conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                ok, key = r.status == 200, str(r.status)
            except (OSError, http.client.HTTPException) as exc:
                ok, key = False, type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
            if ok:
                mine.append(time.perf_counter() - t0)
            else:
                bad[key] = bad.get(key, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for key, n in bad.items():
                failures[key] = failures.get(key, 0) + n

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + duration_s
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    stats = (
        percentiles_ms(latencies) if latencies else {"p50_ms": float("nan"), "p99_ms": float("nan")}
    )
    return {
        "path": path,
        "concurrency": concurrency,
        "duration_s": elapsed,
        "requests": len(latencies),
        "qps": len(latencies) / elapsed,
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "failures": sum(failures.values()),
        "failure_kinds": failures,
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the server has used so far: the process and its live
    children (``--workers N`` runs the app in N child processes)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def batch_sizes(url: str) -> dict[str, float]:
    """Encode passes and queries from /metrics, to report the mean micro-batch size."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "batch_size" not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith("_sum") or name.endswith("_count"):
            out[name.split("{")[0].rsplit("_", 1)[1]] = float(value)
    return out


def bench_mode(
    index_dir: Path, mode: str, queries: list[dict[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    log.info("mode %s: starting server", mode)
    env = {**args.env, **MODES[mode]}
    with Server(index_dir, env, args.workdir / f"server_{mode}.log") as server:
        single, response = single_query(server.url, queries, args.single)
        single.update(in_process_split(index_dir, queries, response, 50))
        single["http_and_framework_ms"] = (
            single["client_p50_ms"] - single["server_total_ms"] - single["serialize_ms"]
        )
        loads = [
            {"mode": mode, **measured_load(server, queries, c, args.duration)} for c in CONCURRENCY
        ]
        # The p99 goal again in paired windows: concurrency 1 then 16, back to back, so the
        # two sides of each ratio see the same machine (this 2-core VM drifts by +-15% in
        # QPS from minute to minute); the goal is judged on the median window.
        pairs = [
            paired_window(server.url, queries, i, args.pair_duration, mode)
            for i in range(args.pairs)
        ]
        # The HTTP + framework floor: the same client on a route that does no work.
        floor = {
            "mode": mode,
            **measured_load(server, queries, 16, min(args.duration, 3.0), "/healthz"),
        }
    if int(env.get("INFLUENCE_WORKERS", "1")) > 1:
        # /metrics answers from whichever worker takes the connection: its batch counters
        # are that worker's alone, so a difference of two scrapes means nothing.
        for row in [*loads, floor]:
            row.pop("mean_batch", None)
    return {
        "mode": mode,
        "env": env,
        "single": {"mode": mode, **single},
        "load": loads,
        "pairs": pairs,
        "healthz_floor": floor,
    }


def paired_window(
    url: str, queries: list[dict[str, str]], i: int, duration_s: float, mode: str
) -> dict[str, Any]:
    """p50 at concurrency 1, then p99 at 16 right after, and their ratio."""
    one = _load(url, queries, 1, duration_s)
    sixteen = _load(url, queries, 16, duration_s)
    row = {
        "mode": mode,
        "window": i,
        "p50_ms_at_1": one["p50_ms"],
        "qps_at_1": one["qps"],
        "p99_ms_at_16": sixteen["p99_ms"],
        "qps_at_16": sixteen["qps"],
        "p99_16_over_p50_1": sixteen["p99_ms"] / one["p50_ms"],
    }
    log.info("%s", row)
    return row


def measured_load(
    server: Server,
    queries: list[dict[str, str]],
    concurrency: int,
    duration_s: float,
    path: str = "/v1/influence",
) -> dict[str, Any]:
    """One closed-loop level plus the server's and this client's CPU per request, the
    cores they kept busy, and the mean micro-batch size (from /metrics)."""
    before = batch_sizes(server.url)
    cpu0 = (_cpu_s(server.proc.pid), _self_cpu_s())
    row = _load(server.url, queries, concurrency, duration_s, path)
    cpu1 = (_cpu_s(server.proc.pid), _self_cpu_s())
    after = batch_sizes(server.url)
    n = max(1, row["requests"] + row["failures"])
    row["server_cpu_ms_per_req"] = (cpu1[0] - cpu0[0]) * 1e3 / n
    row["client_cpu_ms_per_req"] = (cpu1[1] - cpu0[1]) * 1e3 / n
    row["busy_cores"] = (cpu1[0] - cpu0[0] + cpu1[1] - cpu0[1]) / row["duration_s"]
    if after.get("count", 0) > before.get("count", 0):
        row["mean_batch"] = (after["sum"] - before.get("sum", 0)) / (
            after["count"] - before.get("count", 0)
        )
    log.info("%s", row)
    return row


def goals_for(res: dict[str, Any]) -> list[dict[str, Any]]:
    by_c = {r["concurrency"]: r for r in res["load"]}
    p99_ratio = by_c[16]["p99_ms"] / res["single"]["client_p50_ms"]
    qps_ratio = by_c[16]["qps"] / by_c[1]["qps"]
    rows = [
        {
            "mode": res["mode"],
            "goal": "p99@16 / single-query p50 <= 3 (load levels above)",
            "measured": p99_ratio,
            "met": p99_ratio <= GOAL_P99_RATIO,
        },
        {
            "mode": res["mode"],
            "goal": "QPS@16 / QPS@1 >= 3",
            "measured": qps_ratio,
            "met": qps_ratio >= GOAL_QPS_RATIO,
        },
        {
            "mode": res["mode"],
            "goal": f"single-query p50 <= {GOAL_P50_MS:.0f} ms",
            "measured": res["single"]["client_p50_ms"],
            "met": res["single"]["client_p50_ms"] <= GOAL_P50_MS,
        },
        {
            "mode": res["mode"],
            "goal": f"QPS@8 >= {GOAL_QPS_AT_8:.0f}",
            "measured": by_c[8]["qps"],
            "met": by_c[8]["qps"] >= GOAL_QPS_AT_8,
        },
    ]
    ratios = [w["p99_16_over_p50_1"] for w in res.get("pairs", [])]
    if ratios:
        median = float(np.median(ratios))
        rows.insert(
            1,
            {
                "mode": res["mode"],
                "goal": f"p99@16 / p50@1 <= 3 (median of {len(ratios)} paired windows, "
                f"range {min(ratios):.2f}-{max(ratios):.2f})",
                "measured": median,
                "met": median <= GOAL_P99_RATIO,
            },
        )
    return rows


def cpu_bound(res: dict[str, Any], cores: int) -> dict[str, Any]:
    """Why the p99 goal is (not) reachable here, from measured numbers (closed loop, Little's
    law: mean latency at concurrency C is C / QPS, so p99@16 <= 3 x p50_1 needs at least
    QPS@16 >= 16 / (3 x p50_1)); the CPU ceiling is cores / (server + client CPU per request)."""
    c16 = next(r for r in res["load"] if r["concurrency"] == 16)
    cpu_ms = c16["server_cpu_ms_per_req"] + c16["client_cpu_ms_per_req"]
    return {
        "mode": res["mode"],
        "qps_needed_for_p99_goal": 16e3 / (GOAL_P99_RATIO * res["single"]["client_p50_ms"]),
        "qps_at_16": c16["qps"],
        "cpu_ms_per_req_server_plus_client": cpu_ms,
        "cpu_ceiling_qps": cores * 1e3 / cpu_ms,
        "client_ceiling_qps_healthz": 1e3 / res["healthz_floor"]["client_cpu_ms_per_req"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--index", type=Path, help="published index to serve (default: build the test one)"
    )
    p.add_argument(
        "--queries", type=Path, help="JSONL of {prompt, completion} (default: fact corpus test)"
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per concurrency level"
    )
    p.add_argument(
        "--single", type=int, default=30, help="sequential queries for the latency split"
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server environment for both modes (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s per level, 10 single queries"
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="paired windows (concurrency 1 then 16, back to back) for the p99 goal",
    )
    p.add_argument("--pair-duration", type=float, default=5.0, help="seconds per paired window")
    p.add_argument("--workdir", type=Path, default=None, help="where the test index and logs go")
    p.add_argument(
        "--proj-dim",
        type=int,
        default=None,
        help="the built test index's fixed k (default: the index default, a 2^16 budget)",
    )
    p.add_argument("--tag", default=None, help="result file suffix, e.g. workers2")
    p.add_argument(
        "--out", type=Path, default=None, help="results dir (default benchmarks/results)"
    )
    args = p.parse_args(argv)
    args.env = dict(item.split("=", 1) for item in args.env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.duration, args.single, args.pairs, args.pair_duration = 2.0, 10, 1, 1.0
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_service_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    index_dir = args.index or build_test_index(args.workdir, args.proj_dim)
    build_s = None if args.index else time.perf_counter() - t0
    queries = load_queries(index_dir, args.queries)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    # This process imported torch & co. too: keep its full GC scans (~0.2-0.35 s each) out
    # of the latencies it measures, as the server does for itself (service.state.freeze_heap).
    gc.collect()
    gc.freeze()
    results = [bench_mode(index_dir, mode, queries, args) for mode in MODES]
    goals = [g for res in results for g in goals_for(res)]
    bounds = [cpu_bound(res, len(os.sched_getaffinity(0))) for res in results]
    singles = [r["single"] for r in results]
    loads = [row for r in results for row in r["load"]] + [r["healthz_floor"] for r in results]
    pairs = [row for r in results for row in r["pairs"]]
    index_info = {
        "dir": str(index_dir),
        "built_here_s": build_s,
        "size": manifest.get("counts"),
        "fingerprint": manifest.get("fingerprint"),
        "faiss": manifest.get("faiss"),
    }
    payload = {
        "benchmark": "service",
        "quick": args.quick,
        "machine": machine(),
        "index": index_info,
        "duration_s": args.duration,
        "k": K,
        "modes": results,
        "goals": goals,
        "bounds": bounds,
    }
    cores = len(os.sched_getaffinity(0))
    payload["machine"]["note"] = (
        f"load client (threads) and server share this machine's {cores} cores"
    )
    md = (
        "# Service benchmark\n"
        f"`influence serve` (uvicorn, {args.env.get('INFLUENCE_WORKERS', '1')} worker process(es)) on 127.0.0.1; index {index_dir.name} "
        f"({json.dumps(manifest.get('counts'))}, faiss {json.dumps(manifest.get('faiss', {}).get('factory'))}); "
        f"k={K}; closed loop (a thread and a keep-alive connection per concurrent client) for {args.duration:g} s per concurrency level; the client "
        f"runs on the same machine. Extra server environment: {args.env or 'none'}. Batching off: INFLUENCE_MAX_BATCH_SIZE=1, INFLUENCE_MAX_WAIT_MS=0.\n\n"
        "## Single-query latency split (medians, ms)\n\n"
        "encode = tokenize + gradient fingerprint (server); tokenize, serialize measured in-process; "
        "http_and_framework = client round trip - server total - serialize.\n\n"
        + md_table(
            singles,
            [
                "mode",
                "tokenize_ms",
                "encode_ms",
                "search_ms",
                "serialize_ms",
                "server_total_ms",
                "http_and_framework_ms",
                "client_p50_ms",
                "client_p99_ms",
            ],
        )
        + "\n## Closed-loop load\n\n"
        + md_table(
            loads,
            [
                "mode",
                "path",
                "concurrency",
                "requests",
                "qps",
                "p50_ms",
                "p99_ms",
                "mean_batch",
                "failures",
                "server_cpu_ms_per_req",
                "client_cpu_ms_per_req",
                "busy_cores",
            ],
        )
        + (
            (
                "\n## Paired windows (p99 goal; concurrency 1 then 16, back to back)\n\n"
                + md_table(pairs, list(pairs[0]))
            )
            if pairs
            else ""
        )
        + "\n## Goals\n\n"
        + md_table(goals, ["mode", "goal", "measured", "met"])
        + "\n## Bounds (closed loop, Little's law; CPU ceiling = cores / CPU per request)\n\n"
        + md_table(bounds, list(bounds[0]))
    )
    name = "service" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    write_results(name, payload, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
