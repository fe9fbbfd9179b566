"""``make load``: locust through the nginx gateway to local replicas, at several concurrencies.

Starts ``--replicas`` service replicas of the demo index and the gateway (deploy/nginx.conf,
rate limit lifted since every simulated user shares 127.0.0.1), then runs
benchmarks/locustfile.py headless for ``--run-time`` seconds per concurrency level, then a
failover run in which one replica is SIGKILLed halfway. Writes RPS, latency percentiles
and failures to benchmarks/results/load_gateway.{json,md}.

    python -m deploy.load [--quick] [--users 1 8 32] [--run-time 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy.harness import REPO_ROOT, Gateway, find_nginx, start_replicas

log = logging.getLogger("deploy.load")

LOCUSTFILE = REPO_ROOT / "benchmarks" / "locustfile.py"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def run_locust(
    url: str, users: int, run_time_s: int, queries: Path, csv_prefix: Path, on_midpoint=None
) -> dict:
    """One headless locust run against ``url`` (127.0.0.1 only).

    Args:
        url: gateway base URL.
        users: concurrent closed-loop users (spawned all at once).
        run_time_s: duration of the run in seconds.
        queries: queries.jsonl the users cycle through.
        csv_prefix: where locust writes its CSV stats.
        on_midpoint: called once, halfway through the run (the failover run kills a
            replica here).
    Returns:
        dict: requests, failures, rps, p50_ms, p95_ms, p99_ms, mean_ms, max_ms.
    """
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError("load runs only against 127.0.0.1")
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{run_time_s}s",
        "--host",
        url,
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--stop-timeout",
        "10",
        "--loglevel",
        "WARNING",
    ]
    env = dict(os.environ, INFLUENCE_QUERIES=str(queries))
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if on_midpoint is not None:
        time.sleep(run_time_s / 2)
        on_midpoint()
    out, _ = proc.communicate(timeout=run_time_s + 60)
    if proc.returncode not in (0, 1):  # 1: locust saw failures, which we report
        raise RuntimeError(f"locust exited {proc.returncode}:\n{out[-3000:]}")
    return parse_stats(Path(f"{csv_prefix}_stats.csv"))


def parse_stats(path: Path) -> dict:
    """The ``Aggregated`` row of a locust ``*_stats.csv``.

    Returns:
        dict: requests, failures, rps, p50_ms, p95_ms, p99_ms, mean_ms, max_ms.
    """
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if not rows:
        raise RuntimeError(f"no Aggregated row in {path}")
    row = rows[0]

    def num(key: str) -> float:
        value = row.get(key, "")
        return float(value) if value not in ("", "N/A") else float("nan")

    return {
        "requests": int(num("Request Count")),
        "failures": int(num("Failure Count")),
        "rps": round(num("Requests/s"), 2),
        "p50_ms": num("50%"),
        "p95_ms": num("95%"),
        "p99_ms": num("99%"),
        "mean_ms": round(num("Average Response Time"), 1),
        "max_ms": num("Max Response Time"),
    }


def prepare_index(args: argparse.Namespace) -> tuple[Path, Path]:
    """(index dir, queries.jsonl): given, or the demo's (built and cached in .demo)."""
    if args.index:
        return Path(args.index), Path(args.queries)
    from evaluation.demo import SIZES, prepare

    info = prepare(Path(args.workdir), SIZES["quick" if args.quick else "full"])
    return Path(info["index"]), Path(info["queries"])


def write_results(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write load_gateway.json and load_gateway.md; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "load_gateway.json", out_dir / "load_gateway.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    env = report["environment"]
    lines = [
        "# Load test through the nginx gateway",
        "",
        f"`{report['command']}` (deploy/load.py, benchmarks/locustfile.py), {report['date']}. "
        f"{env['replicas']} replicas (`influence serve`, {env['threads_per_replica']} torch "
        f"thread each) behind nginx {env['nginx']} on 127.0.0.1, index of {env['index_size']} "
        f"sequences (d={env['dim']}, FAISS {env['index']}), {env['cpus']} CPU cores shared by "
        f"replicas, nginx and locust (load average {env['load_avg_at_start']:.1f} at start: "
        f"other work ran on the host), no GPU. Closed loop: each user sends POST /v1/influence (k=10) back to back; "
        f"{report['run_time_s']} s per level. RPS as locust reports it (requests over the "
        f"active span).",
        "",
        "| users | requests | failures | RPS | p50 ms | p95 ms | p99 ms | mean ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for users, s in report["levels"].items():
        lines.append(
            f"| {users} | {s['requests']} | {s['failures']} | {s['rps']} | "
            f"{s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['p99_ms']:.0f} | "
            f"{s['mean_ms']:.0f} |"
        )
    fo = report.get("failover")
    if fo:
        lines += [
            "",
            f"Failover: {fo['users']} users for {fo['run_time_s']} s, replica "
            f"{fo['killed']} SIGKILLed at {fo['run_time_s'] / 2:.0f} s: "
            f"**{fo['requests']} requests sent, {fo['failures']} failed** "
            f"(RPS {fo['rps']}, p99 {fo['p99_ms']:.0f} ms).",
        ]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--index", help="index directory (default: the demo's)")
    parser.add_argument("--queries", help="queries.jsonl (with --index)")
    parser.add_argument("--workdir", default=".demo", help="demo workdir (default .demo)")
    parser.add_argument("--quick", action="store_true", help="test-size demo index")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--run-time", type=int, default=20, help="seconds per level")
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.index and not args.queries:
        parser.error("--index needs --queries")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    nginx = find_nginx()
    if nginx is None:
        log.error("nginx is not installed: run `make system-deps`")
        return 2

    index_dir, queries = prepare_index(args)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="influence-load-"))
    replicas = start_replicas(index_dir, args.replicas, work / "replicas", threads=args.threads)
    # Every locust user comes from 127.0.0.1, one "client" to the per-client limit.
    gateway = Gateway(
        work / "gateway", [r.address for r in replicas], rate_limit="100000r/s", rate_burst=100000
    )
    nginx_version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "run_time_s": args.run_time,
        "levels": {},
        "command": " ".join(
            ["python -m deploy.load", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": {
            "replicas": args.replicas,
            "threads_per_replica": args.threads,
            "nginx": nginx_version.split("/")[-1],
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "load_avg_at_start": os.getloadavg()[0],
            "index": manifest["faiss"]["factory"],
            "index_size": manifest["counts"]["sequences"],
            "dim": manifest["counts"]["dim"],
            "index_dir": str(index_dir),
        },
    }
    try:
        gateway.start()
        run_locust(gateway.url, 2, 3, queries, work / "warmup")
        for users in args.users:
            log.info("locust: %d users for %d s", users, args.run_time)
            stats = run_locust(gateway.url, users, args.run_time, queries, work / f"u{users}")
            report["levels"][str(users)] = stats
            log.info("%d users: %s", users, stats)
        if not args.no_failover and len(replicas) > 1:
            users = 8
            log.info("failover: %d users, killing %s halfway", users, replicas[0].address)
            stats = run_locust(
                gateway.url,
                users,
                args.run_time,
                queries,
                work / "failover",
                on_midpoint=replicas[0].kill,
            )
            report["failover"] = {
                "users": users,
                "run_time_s": args.run_time,
                "killed": replicas[0].address,
                **stats,
            }
            log.info("failover: %s", stats)
    finally:
        gateway.stop()
        for replica in replicas:
            replica.stop()
    for path in write_results(report, args.out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
