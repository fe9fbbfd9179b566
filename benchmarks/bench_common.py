"""Shared by the benchmarks: machine description, timing statistics, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "gpu": gpu or "none (no accelerator in this environment; CPU numbers only)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": os.environ.get(
            "BENCH_NOTE", "shared machine: other processes ran concurrently, timings are noisy"
        ),
    }


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() over repeats calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of latencies given in seconds, in milliseconds."""
    arr = np.asarray(latencies_s) * 1e3
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
    }


def write_results(
    name: str, payload: dict[str, Any], markdown: str, out_dir: Path | None = None
) -> Path:
    """Write <out_dir>/bench_<name>.json and .md, print the Markdown and where it went;
    returns the JSON path."""
    out_dir = RESULTS_DIR if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    m = payload.get("machine", {})
    header = (
        f"Machine: {m.get('cpu_cores')} CPU cores ({m.get('cpu')}), {m.get('memory_gib')} GiB RAM, "
        f"GPU: {m.get('gpu')}; torch {m.get('torch')}. {m.get('note', '')}\n\n"
    )
    (out_dir / f"bench_{name}.md").write_text(
        markdown.split("\n", 1)[0] + "\n\n" + header + markdown.split("\n", 1)[1]
    )
    print(markdown)
    print(f"wrote {path}")
    return path


def md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of rows (dicts) over the given columns."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
