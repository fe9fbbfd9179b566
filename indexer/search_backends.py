"""Approximate FAISS search with exact re-ranking (DESIGN.md, "Index artifacts").

An approximate index (IVF-PQ, or HNSW over PQ codes) proposes a candidate set per query;
the candidates are re-scored exactly as e_q . e_t against the float16 fingerprints, which
stay on disk (memory-mapped ``.npy``), so RAM holds only the compressed codes. Placement:
``cpu`` (default), ``gpu`` (one GPU, needs faiss-gpu) or ``shards`` (the index split over
all visible GPUs); the re-rank always reads the memory-mapped store.

Factory strings are FAISS's own (``faiss.index_factory``), inner-product metric, e.g.
``PCA256,IVF1024,PQ32`` (32-byte codes after a 256-dim PCA) or ``PCA256,HNSW16_PQ32``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from encoder.errors import ConfigError

log = logging.getLogger(__name__)

PLACEMENTS = ("cpu", "gpu", "shards")


@dataclass
class SearchParams:
    """Query-time knobs.

    Attributes:
        nprobe: IVF lists visited per query.
        ef_search: HNSW beam width.
        candidates: approximate hits re-ranked exactly (>= k); 0 disables re-ranking.
    """

    nprobe: int = 32
    ef_search: int = 128
    candidates: int = 256


def build_index(
    factory: str, train: np.ndarray, vectors_chunks, *, placement: str = "cpu"
) -> faiss.Index:
    """Train an inner-product index on a sample and add all vectors chunk by chunk.

    Args:
        factory: FAISS factory string.
        train: [n_train, d] float32 training sample (unit vectors).
        vectors_chunks: iterable of [n_i, d] float32 chunks, added in order (ids 0..N-1).
        placement: ``cpu``, ``gpu`` or ``shards``.
    Returns:
        the trained, filled index (on the chosen placement).
    """
    index = faiss.index_factory(train.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index = place(index, placement)
    t0 = time.perf_counter()
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    log.info("trained %s on %d vectors in %.1fs", factory, len(train), time.perf_counter() - t0)
    for chunk in vectors_chunks:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    return index


def place(index: faiss.Index, placement: str) -> faiss.Index:
    """Move an index to its placement (a no-op for ``cpu``)."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "cpu":
        return index
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus == 0:
        raise ConfigError(f"placement {placement!r} needs faiss-gpu and a visible GPU")
    if placement == "gpu":
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    opts = faiss.GpuMultipleClonerOptions()
    opts.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=opts)


def set_params(index: faiss.Index, params: SearchParams) -> None:
    """Apply nprobe / efSearch wherever the index (or a wrapped sub-index) has them."""
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", params.nprobe), ("efSearch", params.ef_search)):
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # this index type has no such parameter


def open_rerank_store(path: Path) -> np.ndarray:
    """The float16 fingerprints [N, d], memory-mapped read-only."""
    return np.load(path, mmap_mode="r")


def rerank(
    queries: np.ndarray, candidate_ids: np.ndarray, store: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact e_q . e_t over each query's candidates; returns the top k.

    Args:
        queries: [Q, d] float32 unit vectors.
        candidate_ids: [Q, C] int64 ids from the approximate index (-1 = none).
        store: [N, d] float16 fingerprints (memory-mapped).
        k: results per query.
    Returns:
        scores [Q, k] float32 (descending), ids [Q, k] int64 (-1 padded).
    """
    n_q = len(queries)
    scores = np.full((n_q, k), -np.inf, dtype=np.float32)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    for qi in range(n_q):
        cand = candidate_ids[qi][candidate_ids[qi] >= 0]
        if cand.size == 0:
            continue
        order = np.sort(cand)  # sequential reads from the memory map
        exact = store[order].astype(np.float32) @ queries[qi]
        top = np.argsort(-exact)[:k]
        scores[qi, : top.size] = exact[top]
        ids[qi, : top.size] = order[top]
    return scores, ids


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    store: np.ndarray | None = None,
    params: SearchParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate search, re-ranked exactly against ``store`` when given.

    Args:
        index: a filled index from ``build_index``.
        queries: [Q, d] float32 unit vectors.
        k: results per query.
        store: [N, d] float16 fingerprints for the exact re-rank (None: no re-rank).
        params: query-time knobs.
    Returns:
        scores [Q, k] float32, ids [Q, k] int64 (-1 padded).
    """
    params = params or SearchParams()
    set_params(index, params)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if store is None or params.candidates == 0:
        scores, ids = index.search(queries, k)
        return scores, ids
    _, cand = index.search(queries, max(k, params.candidates))
    return rerank(queries, cand, store, k)
