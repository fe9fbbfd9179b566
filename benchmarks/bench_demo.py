"""A newcomer's first run: ``make demo`` in a fresh clone of this repository, timed from the
command to ``/readyz`` answering 200 (install, corpus, training, index build included).

Also records what was printed (every line that reads like a warning, an error or a
traceback, which a newcomer would have to ignore), the example query's top result as the
server answers it, and the published index's size on disk next to the size the build's
preflight announced before it started. Writes ``benchmarks/results/bench_demo.{md,json}``.

    python -m benchmarks.bench_demo [--port 8123] [--timeout 900]

Run it on an otherwise idle machine: the goal is ready in under 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from api.models import EXAMPLE_QUERY
from benchmarks.bench_common import machine, md_table, write_results

REPO = Path(__file__).resolve().parent.parent
NOISE = re.compile(r"Traceback|\bWARNING\b|\bDEBUG\b|Warning|\bERROR\b|!!|\bNone\b")
"""What a newcomer would read as a problem in the demo's output."""


def _clean(text: str) -> list[str]:
    """The printed lines, progress bars' carriage-return frames reduced to their last."""
    return [line.split("\r")[-1] for line in text.splitlines() if line.split("\r")[-1].strip()]


def run(port: int, timeout_s: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    out = (work / "demo.out").open("w")
    start = time.monotonic()
    command = ["make", "demo", f"PORT={port}"]
    proc = subprocess.Popen(
        command, cwd=clone, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    ready_s = None
    try:
        while time.monotonic() - start < timeout_s and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    ready_s = time.monotonic() - start
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/influence", json={**EXAMPLE_QUERY, "k": 3}, timeout=120
        )
        top = answer.json()["results"][0] if answer.status_code == 200 else None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        out.close()
    lines = _clean((work / "demo.out").read_text(errors="replace"))
    index = clone / ".demo" / "index"
    index_bytes = sum(p.stat().st_size for p in index.rglob("*") if p.is_file())
    announced = next(
        (m.group(1) for line in lines if (m := re.search(r"~([\d.]+) GiB of disk", line))), None
    )
    result = {
        "ready_s": None if ready_s is None else round(ready_s, 1),
        "goal_s": 300,
        "noise_lines": [line for line in lines if NOISE.search(line)],
        "example": {
            **EXAMPLE_QUERY,
            "top_id": None if top is None else top["id"],
            "top_score": None if top is None else round(top["score"], 4),
            "top_text": None if top is None else top["text"][:80],
        },
        "index_mib": round(index_bytes / 2**20, 1),
        "preflight_disk_gib": None if announced is None else float(announced),
        "printed_lines": len(lines),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8123, help="the demo's port (default 8123)")
    parser.add_argument(
        "--timeout", type=float, default=900, help="give up after this many seconds (default 900)"
    )
    args = parser.parse_args()
    r = run(args.port, args.timeout)
    row = {
        k: r[k] for k in ("ready_s", "goal_s", "index_mib", "preflight_disk_gib", "printed_lines")
    }
    row["noise_lines"] = len(r["noise_lines"])
    example = r["example"]
    noise = "none" if not r["noise_lines"] else "\n\n```\n" + "\n".join(r["noise_lines"]) + "\n```"
    md = "\n".join(
        [
            "# A fresh clone's `make demo`",
            "",
            md_table([row], list(row)),
            "",
            f"Example query {example['prompt']!r} -> {example['completion']!r}: top result id "
            f"{example['top_id']} (score {example['top_score']}): {example['top_text']!r}",
            "",
            f"Printed lines that read like a warning or an error: {noise}",
            "",
        ]
    )
    write_results("demo", {"machine": machine(), "result": r}, md)


if __name__ == "__main__":
    main()
