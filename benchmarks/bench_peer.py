"""Side by side with the peer: bergson (EleutherAI's open-source TrackStar), in one run (issue 17).

Both tools get the same model (the demo GPT-2 trained here, or ``--checkpoint``), the same
token ids (a pre-tokenized ``save_to_disk`` dataset: input_ids, labels with -100 off the
targets) and the same second moments (our bias-corrected v_hat rewritten as one
``exp_avg_sq`` per parameter, named, in one group: bergson's Trainer-checkpoint mapping
freezes all but the input embedding before it maps the groups). Exact mode on both sides:
no projection, no Hessian, G / (sqrt(v) + eps); the unit norm is applied here, the same way
to both, over the modules both track (bergson's lm_head is filtered out).

- Fidelity: Spearman of all query x training scores (mean over queries), identical top-10
  fraction, max |difference| of the unit-norm scores.
- Speed: gradient-collection tokens/s over the training sequences, interleaved A/B/C runs
  (ours in-process; bergson in its venv, with its token batch limited to the model's context
  as its CLI requires, and with that limit patched out), same torch threads; the median of
  each tool's runs and their ratio. bergson's time is its ``collect_gradients`` (timed inside
  its ``build()``; model and dataset loading are reported apart), ours the encode pass with
  the model loaded; both produce float32 gradients (bergson to disk, ours to memory).

bergson is a benchmark dependency only, in its own venv (``make peer-venv``: torch 2.13.0 CPU
wheel first, its other dependencies, then ``pip install --no-deps bergson==2.5.1``); without
it the benchmark says so and exits 0. Results: benchmarks/results/bench_peer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import RESULTS_DIR, machine, md_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".bench" / "bergson-venv" / "bin" / "python"
DRIVER = Path(__file__).resolve().parent / "peer_bergson_driver.py"
SPEED_GOAL = 1.5
PAPER = {"projection": "gaussian", "correction": True, "hessian": "mixed"}
"""Our TrackStar as the paper configures it (the peer implements the paper)."""
"""Issue 17: ours >= 1.5x the faster bergson variant's collection tokens/s."""


def peer_version(python: Path) -> str | None:
    """bergson's version in the peer venv, or None when it is not installed."""
    if not python.is_file():
        return None
    proc = subprocess.run(
        [str(python), "-c", "import bergson; print(bergson.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def write_dataset(examples, path: Path) -> int:
    """A pre-tokenized dataset bergson reads with ``load_from_disk``; returns its tokens."""
    from datasets import Dataset

    ids = [list(e.input_ids) for e in examples]
    labels = [
        [t if m else -100 for t, m in zip(e.input_ids, e.target_mask, strict=True)]
        for e in examples
    ]
    Dataset.from_dict({"input_ids": ids, "labels": labels}).save_to_disk(str(path))
    return sum(len(x) for x in ids)


def write_optimizer_state(sm, model, path: Path) -> None:
    """Our second moments as an optimizer.pt bergson maps by name: one group, each state
    ``{exp_avg_sq: v_hat, param_name}`` (v_hat is already bias-corrected, so both tools
    divide by the same sqrt(v) + eps)."""
    names = [n for n, _ in model.named_parameters() if n in sm.v_hat]
    state = {i: {"exp_avg_sq": sm.v_hat[n].float(), "param_name": n} for i, n in enumerate(names)}
    torch.save(
        {"state": state, "param_groups": [{"params": list(range(len(names))), "eps": sm.eps}]}, path
    )


def peer_command(
    python: Path,
    model: Path,
    dataset: Path,
    opt: Path,
    out: Path,
    token_batch: int,
    lift: bool,
    threads: int,
) -> list[str]:
    """The driver's command line in the peer venv."""
    cmd = [
        str(python),
        str(DRIVER),
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--optimizer-state",
        str(opt),
        "--out",
        str(out),
        "--token-batch-size",
        str(token_batch),
        "--threads",
        str(threads),
    ]
    return [*cmd, "--lift-context-limit"] if lift else cmd


def peer_result(stdout: str) -> dict[str, Any]:
    """The JSON line the driver printed last."""
    return json.loads([x for x in stdout.splitlines() if x.startswith("{")][-1])


def run_peer(cmd: list[str]) -> tuple[float, float, float]:
    """Run ``peer_command``'s ``cmd``: (bergson's collection seconds, its build() seconds,
    whole-process wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bergson failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = peer_result(proc.stdout)
    return float(res["collect_seconds"]), float(res["build_seconds"]), wall


def peer_gradients(run: Path, modules) -> np.ndarray:
    """bergson's gradients [N, D] float64, columns in our module order ([out, in] blocks)."""
    info = json.loads((run / "info.json").read_text())
    sizes: dict[str, int] = info["grad_sizes"]
    dtype = np.dtype(info["base_dtype"]) if "base_dtype" in info else np.float32
    flat = np.memmap(
        run / "gradients.bin", dtype=dtype, mode="r", shape=(info["num_grads"], sum(sizes.values()))
    )
    offsets, start = {}, 0
    for name, size in sizes.items():
        offsets[name] = (start, start + size)
        start += size
    parts = []
    for m in modules:
        key = m.name.removeprefix("transformer.")
        if key not in offsets:
            raise RuntimeError(
                f"bergson has no gradient for {m.name} (it has {sorted(sizes)[:4]} ...)"
            )
        a, b = offsets[key]
        parts.append(np.asarray(flat[:, a:b], dtype=np.float64))
    return np.concatenate(parts, axis=1)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)


def fidelity(ours_q, ours_t, peer_q, peer_t) -> dict[str, float]:
    from scipy.stats import spearmanr

    s_ours = unit(ours_q) @ unit(ours_t).T
    s_peer = unit(peer_q) @ unit(peer_t).T
    rho = [spearmanr(a, b).statistic for a, b in zip(s_ours, s_peer, strict=True)]
    top = min(10, s_ours.shape[1])
    t_ours = np.argsort(-s_ours, axis=1)[:, :top]
    t_peer = np.argsort(-s_peer, axis=1)[:, :top]
    same = [set(a) == set(b) for a, b in zip(t_ours, t_peer, strict=True)]
    return {
        "spearman_mean": float(np.mean(rho)),
        "spearman_min": float(np.min(rho)),
        "identical_top10": float(np.mean(same)),
        "max_abs_score_diff": float(np.abs(s_ours - s_peer).max()),
    }


def run_peer_trackstar(
    python: Path, model: Path, work: Path, token_batch: int, unit_norm: bool, threads: int
) -> tuple[np.ndarray, float]:
    """bergson's whole TrackStar pipeline: (scores [Q, N], its pipeline seconds)."""
    out = work / f"trackstar_unit{int(unit_norm)}"
    cmd = [
        str(python),
        str(DRIVER),
        "--model",
        str(model),
        "--dataset",
        str(work / "train.ds"),
        "--optimizer-state",
        str(work / "optimizer.pt"),
        "--out",
        str(out),
        "--token-batch-size",
        str(token_batch),
        "--lift-context-limit",
        "--threads",
        str(threads),
        "--trackstar-queries",
        str(work / "queries.ds"),
        *(["--unit-normalize"] if unit_norm else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bergson trackstar failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    return np.load(out / "scores.npy").T, float(json.loads(line)["pipeline_seconds"])


def ours_trackstar(h, config, batch_size: int) -> tuple[np.ndarray, float]:
    """Our TrackStar as a build computes it (R_train over every sequence, R_eval over every
    query, lambda by the paper's rule, unit norm): (scores [Q, N], seconds)."""
    from encoder.fingerprint import TrackStarEncoder
    from encoder.whitening import Whitener
    from evaluation.methods import project_all

    t0 = time.perf_counter()
    enc = TrackStarEncoder(h.model, config, second_moments=h.second_moments)
    phi_t = project_all(enc, h.train, pad_id=h.pad, batch_size=batch_size)
    phi_q = project_all(enc, h.queries, pad_id=h.pad, batch_size=batch_size)
    train, evals = enc.new_statistics(), enc.new_statistics()
    train.update(phi_t)
    evals.update(phi_q)
    enc.set_whitener(
        Whitener.from_statistics(
            train,
            evals,
            lambda_=config.lambda_,
            lambda_component=config.lambda_component,
            delta=config.delta,
        )
    )
    scores = (enc.finalize(phi_q) @ enc.finalize(phi_t).T).double().numpy()
    return scores, time.perf_counter() - t0


def attribution(scores: np.ndarray, relevant: list[set[int]]) -> dict[str, float]:
    """MRR@10 and recall@10 of the passages that state each query's fact."""
    top = np.argsort(-scores, axis=1)[:, :10]
    rr = [
        next((1.0 / (r + 1) for r, i in enumerate(row) if i in rel), 0.0)
        for row, rel in zip(top, relevant, strict=True)
    ]
    hit = [float(any(i in rel for i in row)) for row, rel in zip(top, relevant, strict=True)]
    return {"mrr_at_10": float(np.mean(rr)), "recall_at_10": float(np.mean(hit))}


def top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb, strict=True)]))


def full_trackstar(
    args: argparse.Namespace, python: Path, h, checkpoint: Path, corpus_dir: Path, work: Path
) -> dict[str, Any]:
    """Each tool's whole TrackStar, with its defaults and with aligned settings (16 x 16 per
    module, unit norm, mixed R), scored against the passages that state each fact."""
    from encoder.config import FingerprintConfig
    from evaluation.corpus import load_queries
    from evaluation.inputs import read_corpus

    ids, _ = read_corpus(corpus_dir / "corpus.jsonl")
    pos = {pid: i for i, pid in enumerate(ids)}
    relevant = [
        {pos[r] for r in q.relevant_ids}
        for q in load_queries(corpus_dir / "queries.jsonl")[: len(h.queries)]
    ]
    batch = int(h.model.config.n_positions) * args.batch_size
    runs = {
        "ours, paper config (2^16 budget, block 1024, mixed R, unit norm)": ours_trackstar(
            h, FingerprintConfig(**PAPER), args.batch_size
        ),
        "ours, aligned (k = 16, mixed R, unit norm)": ours_trackstar(
            h, FingerprintConfig(k=16, **PAPER), args.batch_size
        ),
        "ours, aligned, seed 1": ours_trackstar(
            h, FingerprintConfig(k=16, seed=1, **PAPER), args.batch_size
        ),
        "bergson, defaults (projection_dim 16, mixed, no unit norm)": run_peer_trackstar(
            python, checkpoint, work, batch, False, args.threads
        ),
        "bergson, aligned (projection_dim 16, mixed, unit norm)": run_peer_trackstar(
            python, checkpoint, work, batch, True, args.threads
        ),
    }
    rows = [
        {"pipeline": k, "seconds": round(sec, 2), **attribution(s, relevant)}
        for k, (s, sec) in runs.items()
    ]
    keys = list(runs)
    overlaps = {
        "ours aligned vs bergson aligned": top10_overlap(runs[keys[1]][0], runs[keys[4]][0]),
        "ours aligned, seed 0 vs seed 1": top10_overlap(runs[keys[1]][0], runs[keys[2]][0]),
        "ours defaults vs bergson defaults": top10_overlap(runs[keys[0]][0], runs[keys[3]][0]),
    }
    return {"rows": rows, "top10_overlap": overlaps}


def measure(args: argparse.Namespace, python: Path, version: str) -> dict[str, Any]:
    from benchmarks.bench_fidelity import MODELS, Harness, prepare
    from encoder.config import FingerprintConfig
    from encoder.fingerprint import TrackStarEncoder
    from evaluation.methods import project_all

    torch.set_num_threads(args.threads)
    spec = MODELS["quick" if args.quick else "demo"]
    checkpoint, corpus_dir = (
        (args.checkpoint, args.corpus_dir) if args.checkpoint else prepare(spec, args.workdir)
    )
    h = Harness(Path(checkpoint), Path(corpus_dir), args.queries)
    work = args.workdir / "peer"
    work.mkdir(parents=True, exist_ok=True)
    tokens = write_dataset(h.train, work / "train.ds")
    write_dataset(h.queries, work / "queries.ds")
    write_optimizer_state(h.second_moments, h.model, work / "optimizer.pt")
    context = int(h.model.config.n_positions)
    lifted_batch = context * args.batch_size
    exact = FingerprintConfig(
        k=0, hessian="none", unit_norm=False, projection="gaussian", correction=True
    )
    enc = TrackStarEncoder(h.model, exact, second_moments=h.second_moments)

    project_all(
        enc, h.train[: args.batch_size], pad_id=h.pad, batch_size=args.batch_size
    )  # warm-up

    def ours() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        phi = project_all(enc, h.train, pad_id=h.pad, batch_size=args.batch_size)
        return time.perf_counter() - t0, phi.double().numpy()

    runs: dict[str, list[float]] = {
        "ours": [],
        "bergson (context-limited batch)": [],
        "bergson (limit lifted)": [],
    }
    builds: dict[str, list[float]] = {k: [] for k in runs}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    ours_t = None
    for r in range(args.rounds):  # interleaved: A, B, C, A, B, C, ...
        print(f"round {r + 1}/{args.rounds}", flush=True)
        seconds, ours_t = ours()
        runs["ours"].append(seconds)
        for label, batch, lift in (
            ("bergson (context-limited batch)", context, False),
            ("bergson (limit lifted)", lifted_batch, True),
        ):
            cmd = peer_command(
                python,
                Path(checkpoint),
                work / "train.ds",
                work / "optimizer.pt",
                work / f"run_{lift}",
                batch,
                lift,
                args.threads,
            )
            sec, build_s, wall = run_peer(cmd)
            runs[label].append(sec)
            builds[label].append(build_s)
            walls[label].append(wall)
    peer_t = peer_gradients(work / "run_True", enc.modules)
    run_peer(
        peer_command(
            python,
            Path(checkpoint),
            work / "queries.ds",
            work / "optimizer.pt",
            work / "run_q",
            context,
            False,
            args.threads,
        )
    )
    peer_q = peer_gradients(work / "run_q", enc.modules)
    ours_q = project_all(enc, h.queries, pad_id=h.pad, batch_size=args.batch_size).double().numpy()
    assert ours_t is not None
    fid = fidelity(ours_q, ours_t, peer_q, peer_t)
    del ours_t, ours_q, peer_t, peer_q
    full = full_trackstar(args, python, h, Path(checkpoint), Path(corpus_dir), work)
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [
        {
            "tool": k,
            "collection_s_median": med[k],
            "tokens_per_s": tokens / med[k],
            "runs_s": [round(x, 2) for x in v],
            "build_s_median": statistics.median(builds[k]) if builds[k] else None,
            "process_wall_s_median": statistics.median(walls[k]) if walls[k] else None,
        }
        for k, v in runs.items()
    ]
    faster_peer = min(med[k] for k in runs if k != "ours")
    ratio = faster_peer / med["ours"]
    return {
        "bergson_version": version,
        "model": str(checkpoint),
        "layers": int(h.model.config.n_layer),
        "width": int(h.model.config.n_embd),
        "sequences": len(h.train),
        "tokens": tokens,
        "queries": len(h.queries),
        "modules": len(enc.modules),
        "dim": enc.dim,
        "threads": args.threads,
        "batch_sequences": args.batch_size,
        "bergson_token_batch": {"limited": context, "lifted": lifted_batch},
        "rounds": args.rounds,
        "speed": rows,
        "speedup_vs_faster_bergson": ratio,
        "speed_goal": {
            "goal": f">= {SPEED_GOAL}x the faster bergson variant",
            "measured": round(ratio, 3),
            "met": ratio >= SPEED_GOAL,
        },
        "fidelity": fid,
        "full_trackstar": full,
        "fidelity_goal": {
            "goal": "Spearman >= 0.9999 and identical top-10",
            "met": fid["spearman_mean"] >= 0.9999 and fid["identical_top10"] == 1.0,
        },
    }


def markdown(res: dict[str, Any]) -> str:
    fid, sg, fg = res["fidelity"], res["speed_goal"], res["fidelity_goal"]
    return "".join(
        [
            "# Side by side with bergson (exact mode)\n\n",
            f"bergson {res['bergson_version']} vs this project on GPT-2 {res['layers']} x {res['width']} "
            f"({res['modules']} modules, d = {res['dim']:,} unprojected): {res['sequences']} training sequences "
            f"({res['tokens']:,} tokens), {res['queries']} queries; the same token ids and second moments; "
            f"{res['threads']} torch threads; {res['rounds']} interleaved rounds.\n\n",
            "## Fidelity (no projection, no Hessian, unit norm applied alike)\n\n",
            md_table([fid], list(fid)),
            f"\nGoal: {fg['goal']}: **{'met' if fg['met'] else 'not met'}**.\n\n",
            "## Whole TrackStar, each tool's pipeline\n\n",
            "MRR@10 / recall@10 of the passages that state each query's fact; seconds of each pipeline in-process "
            "(bergson: its `trackstar` from the gradient passes to the scores, model loads included; ours: the "
            "passes, R, lambda and R^-1/2 with the model loaded).\n\n",
            md_table(
                res["full_trackstar"]["rows"], ["pipeline", "mrr_at_10", "recall_at_10", "seconds"]
            ),
            "\nTop-10 overlap: "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["full_trackstar"]["top10_overlap"].items())
            + ".\n\n",
            "## Gradient collection speed\n\n",
            md_table(
                res["speed"],
                [
                    "tool",
                    "collection_s_median",
                    "tokens_per_s",
                    "runs_s",
                    "build_s_median",
                    "process_wall_s_median",
                ],
            ),
            f"\nOurs vs the faster bergson variant: **{sg['measured']}x** (goal {sg['goal']}: "
            f"**{'met' if sg['met'] else 'not met'}**). Collection = the gradient pass alone (ours: the encode pass "
            "with the model loaded; bergson: its `collect_gradients`, timed inside its `build()`); `build_s` adds "
            "bergson's model and dataset loading, `process_wall_s` its whole process (interpreter, imports). "
            f"Ours batches {res['batch_sequences']} sequences sorted by length; bergson packs sequences up to its "
            "token batch.\n",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--peer-python",
        type=Path,
        default=PEER_PYTHON,
        help="python of the venv bergson is installed in",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a trained checkpoint (default: train the demo model)",
    )
    p.add_argument(
        "--corpus-dir", type=Path, default=None, help="its corpus dir (corpus.jsonl, queries.jsonl)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(".bench/fidelity"),
        help="models and peer files go here",
    )
    p.add_argument(
        "--queries", type=int, default=50, help="queries for the fidelity comparison (default 50)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads for both tools (default 2)"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="sequences per backward pass (default 16)"
    )
    p.add_argument("--quick", action="store_true", help="the test-size model, one round")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    version = peer_version(args.peer_python)
    if version is None:
        print(f"bench_peer: skipped: no bergson at {args.peer_python} (make peer-venv installs it)")
        return 0
    res = measure(args, args.peer_python, version)
    payload = {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": res,
    }
    write_results("peer_quick" if args.quick else "peer", payload, markdown(res), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
