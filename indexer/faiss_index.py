"""FAISS index over fingerprints: build from a factory string, search, exact re-rank.

Influence is the inner product of unit fingerprints, so every index uses
``METRIC_INNER_PRODUCT``. ``Flat`` is exact. Approximate indexes (``IVF{n},PQ{m}``,
``HNSW32``, ...) are trained on a sample and return candidates that are re-ranked exactly
against the float16 fingerprints, so returned scores are always exact inner products.
The vectors added to FAISS are the float16-rounded fingerprints (upcast), so the Flat
scores, the re-ranked scores and a brute-force product over ``fingerprints.f16.npy`` agree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import faiss
import numpy as np

from encoder.errors import ConfigError

log = logging.getLogger(__name__)

RERANK_FACTOR = 10
"""Candidates fetched per requested result from an approximate index before re-ranking."""
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 128


def is_exact(factory: str) -> bool:
    """True when the factory string is a brute-force inner-product index."""
    return factory.replace(" ", "") in ("Flat", "IDMap,Flat")


def create_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string.

    Raises:
        ConfigError: FAISS cannot parse the string (code ``invalid_faiss_factory``).
    """
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise ConfigError(f"bad FAISS factory string {factory!r}: {msg}", code="invalid_faiss_factory") from exc


def _to_gpu(index: faiss.Index, use_gpu: bool) -> tuple[faiss.Index, bool]:
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        try:
            return faiss.index_cpu_to_all_gpus(index), True
        except RuntimeError as exc:  # not every index type has a GPU version (e.g. HNSW)
            log.info("FAISS index stays on the CPU: %s", exc)
    return index, False


def build_index(
    factory: str,
    dim: int,
    chunks: Iterator[np.ndarray],
    train_sample: np.ndarray | None,
    *,
    use_gpu: bool = False,
) -> faiss.Index:
    """Build and fill an index.

    Args:
        factory: FAISS factory string, e.g. ``Flat``, ``IVF256,PQ32``, ``HNSW32``.
        dim: fingerprint dimension d.
        chunks: float32 [n_i, d] arrays in id order; their concatenation is the index.
        train_sample: float32 [m, d] vectors to train an approximate index on (ignored when
            the index needs no training).
        use_gpu: train and add on the GPU when FAISS has GPU support and one is present.
    Returns:
        a CPU index holding every vector, with search parameters set (nprobe, efSearch).
    """
    index = create_index(factory, dim)
    index, on_gpu = _to_gpu(index, use_gpu)
    if not index.is_trained:
        if train_sample is None or len(train_sample) == 0:
            raise ConfigError(f"the {factory} index needs training vectors")
        log.info("training the %s index on %d vectors", factory, len(train_sample))
        try:
            index.train(np.ascontiguousarray(train_sample, dtype=np.float32))
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot train the {factory} index on {len(train_sample)} vectors: "
                f"{str(exc).strip().splitlines()[-1]}",
                code="invalid_faiss_factory",
            ) from exc
    for chunk in chunks:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    set_search_params(index)
    return index


def set_search_params(index: faiss.Index) -> None:
    """Default accuracy knobs of approximate indexes (nprobe, efSearch)."""
    ivf = _find_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(DEFAULT_NPROBE, ivf.nlist)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = DEFAULT_EF_SEARCH


def _find_ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def search(
    index: faiss.Index,
    fingerprints: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    exact: bool,
    rerank: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search, exactly re-ranked for approximate indexes.

    Args:
        index: the FAISS index.
        fingerprints: float16 [N, d] stored fingerprints (may be memory-mapped).
        queries: float32 [Q, d] unit query fingerprints.
        k: results per query.
        exact: the index is Flat (its scores are already exact).
        rerank: re-rank an approximate index's candidates against ``fingerprints``.
    Returns:
        scores [Q, k] float32 (descending) and ids [Q, k] int64; ids -1 (score -inf) pad
        when the index holds fewer than k vectors.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != fingerprints.shape[1]:
        raise ConfigError(f"queries must be [Q, {fingerprints.shape[1]}], got {list(queries.shape)}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    n_q, n = queries.shape[0], index.ntotal
    scores = np.full((n_q, k), -np.inf, dtype=np.float32)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    if n == 0 or n_q == 0:
        return scores, ids
    if exact or not rerank:
        d, i = index.search(queries, min(k, n))
        d = np.where(i >= 0, d, -np.inf).astype(np.float32)
        scores[:, : d.shape[1]], ids[:, : i.shape[1]] = d, i
        return scores, ids
    n_cand = min(max(k * RERANK_FACTOR, k), n)
    _, cand = index.search(queries, n_cand)
    for q in range(n_q):
        c = cand[q][cand[q] >= 0]
        c = np.unique(c)
        if c.size == 0:
            continue
        exact_scores = fingerprints[c].astype(np.float32) @ queries[q]
        order = np.argsort(-exact_scores, kind="stable")[:k]
        scores[q, : order.size] = exact_scores[order]
        ids[q, : order.size] = c[order]
    return scores, ids


def recall_at_k(
    index: faiss.Index, fingerprints: np.ndarray, queries: np.ndarray, k: int = 10
) -> dict[str, float]:
    """Recall@k of an approximate index against exact search, with and without re-ranking.

    Args:
        index: the approximate index.
        fingerprints: float16 [N, d] (exact search is brute force over these).
        queries: float32 [Q, d] probe vectors.
    Returns:
        {"recall_at_k": ..., "recall_at_k_reranked": ..., "k": k, "n_queries": Q}.
    """
    k = min(k, index.ntotal)
    exact_ids = exact_top_k(fingerprints, queries, k)
    out: dict[str, float] = {"k": float(k), "n_queries": float(len(queries))}
    for key, rr in (("recall_at_k", False), ("recall_at_k_reranked", True)):
        _, ids = search(index, fingerprints, queries, k, exact=False, rerank=rr)
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact_ids, strict=True))
        out[key] = hits / float(k * len(queries))
    return out


def exact_top_k(fingerprints: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Brute-force top-k ids [Q, k] over float16 fingerprints [N, d], in row chunks."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for s in range(0, fingerprints.shape[0], chunk):
        sc = queries @ np.asarray(fingerprints[s : s + chunk], dtype=np.float32).T
        all_s = np.concatenate([best_s, sc], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + sc.shape[1]), sc.shape)], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(all_s, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    return best_i


def read_index(path, *, use_gpu: bool = False) -> faiss.Index:
    """Load a saved index (moved to the GPU for search when asked and possible)."""
    index = faiss.read_index(str(path))
    set_search_params(index)
    index, _ = _to_gpu(index, use_gpu)
    return index
