"""Start-up time of the CLI: ``influence --help``, ``influence index build --help`` and
``influence index info`` (issue goal: <= 0.3 s each), next to the import of the model stack
they no longer pay for (torch + transformers + faiss), all as fresh processes, interleaved.

    python -m benchmarks.bench_cli [--index DIR] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_common import machine, md_table, write_results

GOAL_S = 0.3
INFLUENCE = [sys.executable, "-m", "service.cli"]


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--index",
        type=Path,
        default=Path(".demo/index"),
        help="a published index (default: make demo's)",
    )
    p.add_argument("--repeats", type=int, default=7, help="runs of each command (median reported)")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="results folder (default benchmarks/results)"
    )
    args = p.parse_args(argv)
    commands = {
        "influence --help": [*INFLUENCE, "--help"],
        "influence index build --help": [*INFLUENCE, "index", "build", "--help"],
        "import torch, transformers, faiss (reference)": [
            sys.executable,
            "-c",
            "import torch, transformers, faiss",
        ],
    }
    if (args.index / "manifest.json").is_file():
        commands["influence index info"] = [*INFLUENCE, "index", "info", str(args.index)]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):  # interleaved: drift on a noisy machine hits all alike
        for name, cmd in commands.items():
            times[name].append(_wall(cmd))
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        reference = "reference" in name
        rows.append(
            {
                "command": name,
                "median_s": med,
                "min_s": min(ts),
                "max_s": max(ts),
                "goal_s": "" if reference else GOAL_S,
                "met": "" if reference else ("yes" if med <= GOAL_S else "no"),
            }
        )
    md = (
        "# CLI start-up\n\n"
        + md_table(rows, ["command", "median_s", "min_s", "max_s", "goal_s", "met"])
        + f"\n{args.repeats} fresh processes per command, interleaved; median.\n"
    )
    write_results(
        "cli", {"machine": machine(), "repeats": args.repeats, "rows": rows}, md, args.out_dir
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
