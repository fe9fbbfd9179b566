"""The summary a build ends with and ``influence index info`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encoder.config import FingerprintConfig
from encoder.families import describe
from indexer import manifest as mf


def summary(index_dir: Path) -> dict[str, Any]:
    """What ``index info`` shows of an index: its manifest's main entries and its size."""
    m = mf.Manifest.read(index_dir)
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    n, b, fp, tokens = m.sequences, m.build, m.fingerprint, m.counts["tokens"]
    seconds = (b.get("statistics_seconds") or 0) + (b.get("encode_seconds") or 0)
    return {
        "index": str(index_dir),
        "version": m.version,
        "name": m.model.name,
        "model": m.model.path,
        "sequences": n,
        "documents": m.counts["documents"],
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds and tokens else None,
        "modules": fp["modules"],
        "dim": m.counts["dim"],
        "faiss": m.factory,
        "recall": m.faiss["recall"],
        "k": fp["config"]["k"],
        "budget": fp["config"]["budget"],
        "projection": _projection_text(fp),
        "hessian": fp["config"]["hessian"],
        "lambda": fp["lambda"],
        "second_moments": fp["second_moments"],
        "seq_len": m.corpus["seq_len"],
        "stride": m.corpus["stride"],
        "packing": m.corpus["packing"],
        "bytes": size,
        "bytes_per_sequence": round(size / max(n, 1), 1),
        "build": b,
        "created_at": m.created_at,
    }


def _size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The summary a build ends with and ``index info`` prints: what was indexed, how
    fast, with what fingerprint, and how large the index is."""
    b = s["build"]
    modules = s["modules"]
    shown = ", ".join(modules[:6]) + (
        f", ... ({len(modules) - 6} more)" if len(modules) > 6 else ""
    )
    rows = [
        ("index", s["index"]),
        ("version", s["version"]),
        ("name", s["name"]),
        ("model", s["model"]),
        ("sequences", s["sequences"]),
        ("documents", s["documents"]),
        ("tokens", s["tokens"]),
        ("tokens/s", f"{s['tokens_per_s']} (both passes)" if s["tokens_per_s"] else None),
        ("modules", f"{len(modules)}: {shown}"),
        ("dim", s["dim"]),
        ("faiss", s["faiss"]),
        ("projection", s["projection"]),
        ("hessian", s["hessian"]),
        ("lambda", s["lambda"]),
        ("second_moments", s["second_moments"]),
        ("seq_len", s["seq_len"]),
        ("stride", s["stride"]),
        ("packing", s["packing"]),
        ("pass 1 (statistics)", _pass_text(b, "statistics")),
        ("pass 2 (encode)", _pass_text(b, "encode")),
        (
            "size",
            f"{_size_text(s['bytes'])} ({s['bytes']} bytes, {s['bytes_per_sequence']} per sequence)",
        ),
        ("created_at", s["created_at"]),
    ]
    lines = [f"{key:>20}: {value}" for key, value in rows if value is not None]
    if s["recall"]:
        r = s["recall"]
        lines.append(
            f"{'recall@10':>20}: {r['recall_at_k']:.4f} (re-ranked {r['recall_at_k_reranked']:.4f}, "
            f"{int(r['n_queries'])} probes)"
        )
    return lines


def _pass_text(build: dict[str, Any], name: str) -> str | None:
    """A build pass's time and rate; None (no line) for a pass that did no work."""
    seconds, rate = build.get(f"{name}_seconds"), build.get(f"{name}_seq_per_s")
    return None if not rate else f"{seconds} s, {rate} seq/s"


def print_summary(s: dict[str, Any]) -> None:
    print("\n".join(summary_lines(s)))


def _projection_text(fp: dict[str, Any]) -> str:
    """How the fingerprint is sized, in one line: fixed k, or the budget's plan. A module
    whose plan keeps it whole has no projection noise and no seed, so neither is named
    when every module is whole."""
    cfg = FingerprintConfig.from_dict(fp["config"])
    plan, shapes = fp["plan"], fp["shapes"]
    projected = sum(
        sizes is not None and list(sizes) != shapes[name] for name, sizes in plan.items()
    )
    whole = len(plan) - projected
    if projected == 0:
        return f"none: all {whole} modules kept whole" + (
            "; K-FAC whitened" if cfg.projection == "sketch" else ""
        )
    family = describe(cfg.projection, cfg.to_dict())
    if cfg.k is not None:
        return f"k = {cfg.k} per side, {cfg.k * cfg.k} dims per module; {family}"
    sizing = f"budget {cfg.budget}, blocks <= {cfg.block_cap} dims"
    return f"{sizing}: {projected} modules projected, {whole} kept whole; {family}"
