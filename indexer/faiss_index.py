"""FAISS index over fingerprints: build, placement, search, exact re-rank (one implementation).

Influence is the inner product of unit fingerprints, so every index uses
``METRIC_INNER_PRODUCT``. ``Flat`` is exact. Approximate indexes (``IVF{n},PQ{m}``,
``PCA256,IVF1024,PQ64x4fs``, ``HNSW32``, ...) are trained on a sample and return candidates
that are re-ranked exactly against the float16 fingerprints (memory-mapped ``.npy``, so RAM
holds only the compressed codes), so returned scores are always exact inner products.
The vectors added to FAISS are the float16-rounded fingerprints (upcast), so the Flat
scores, the re-ranked scores and a brute-force product over ``fingerprints.f16.npy`` agree.

Placement: ``cpu`` (default), ``gpu`` (one GPU, needs faiss-gpu) or ``shards`` (the index
split over all visible GPUs); the re-rank always reads the memory-mapped store. (Exact
search with torch on the GPUs, without faiss-gpu: ``engine.torch_search``.)
Used by ``InfluenceIndex`` (build and search) and by ``benchmarks/bench_search.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from api.errors import ConfigError
from indexer.exact import exact_top_k, rerank_exact

log = logging.getLogger(__name__)

RERANK_FACTOR = 10
"""Default candidates fetched per requested result from an approximate index."""
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 128
PLACEMENTS = ("cpu", "gpu", "shards")


@dataclass(frozen=True)
class SearchParams:
    """Query-time knobs of an approximate index.

    Attributes:
        nprobe: IVF lists visited per query (capped at nlist).
        ef_search: HNSW beam width.
        candidates: approximate hits re-ranked exactly per query; None: ``RERANK_FACTOR * k``;
            0: no re-rank (the index's own approximate scores).
    """

    nprobe: int = DEFAULT_NPROBE
    ef_search: int = DEFAULT_EF_SEARCH
    candidates: int | None = None


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
        raise ConfigError(
            f"bad FAISS factory string {factory!r}: {msg}", code="invalid_faiss_factory"
        ) from exc


def check_trainable(factory: str, dim: int, n_train: int) -> None:
    """Fail before any expensive pass when ``factory`` cannot be built over ``n_train``
    training vectors of ``dim`` dims: an unparsable string, or more IVF lists / PQ
    centroids than training vectors (FAISS would fail, or train empty clusters, at the end).

    Raises:
        ConfigError: code ``invalid_faiss_factory`` or ``faiss_needs_more_data``.
    """
    index = create_index(factory, dim)
    if index.is_trained:
        return
    need = []
    try:
        need.append(("IVF lists", faiss.extract_index_ivf(index).nlist))
    except RuntimeError:  # not an IVF index
        pass
    for name in ("pq", "fine_quantizer"):
        pq = getattr(faiss.downcast_index(index), name, None)
        if pq is not None and hasattr(pq, "ksub"):
            need.append(("PQ centroids per sub-quantizer", int(pq.ksub)))
    for what, count in need:
        if n_train < count:
            raise ConfigError(
                f"FAISS factory {factory!r} needs at least {count} training vectors ({what}), "
                f"the build has {n_train}: use fewer lists or bits, a larger --faiss-train-sample, "
                "or Flat",
                code="faiss_needs_more_data",
            )


def _n_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def place(index: faiss.Index, placement: str) -> faiss.Index:
    """Move an index to its placement (a no-op for ``cpu``).

    Raises:
        ConfigError: unknown placement, or a GPU placement without faiss-gpu and a GPU.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "cpu":
        return index
    if _n_gpus() == 0:
        raise ConfigError(f"placement {placement!r} needs faiss-gpu and a visible GPU")
    if placement == "gpu":
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    opts = faiss.GpuMultipleClonerOptions()
    opts.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=opts)


def _to_gpu(index: faiss.Index, use_gpu: bool) -> tuple[faiss.Index, bool]:
    """Best effort: one GPU when asked and possible, else the index unchanged."""
    if use_gpu and _n_gpus() > 0:
        try:
            return place(index, "gpu"), True
        except RuntimeError as exc:  # not every index type has a GPU version (e.g. HNSW)
            log.info("FAISS index stays on the CPU: %s", exc)
    return index, False


def build_index(
    factory: str,
    dim: int,
    chunks: Iterable[np.ndarray],
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
        a CPU index holding every vector, with the default search parameters set.
    """
    pca_match = _PLAIN_PCA.match(factory.replace(" ", ""))
    if pca_match is not None and train_sample is not None and len(train_sample) > 0:
        create_index(factory, dim)  # validate the whole string first (clear error)
        d_out, rest = int(pca_match.group(1)), pca_match.group(2)
        pca = train_pca(train_sample, d_out)
        inner = build_index(
            rest,
            d_out,
            (pca.apply(np.ascontiguousarray(c, dtype=np.float32)) for c in chunks),
            pca.apply(np.ascontiguousarray(train_sample, dtype=np.float32)),
            use_gpu=use_gpu,
        )
        wrapped = faiss.IndexPreTransform(pca, inner)
        set_search_params(wrapped)
        return wrapped
    index: faiss.Index = create_index(factory, dim)
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


_PLAIN_PCA = re.compile(r"^PCA(\d+),(.+)$")
PCA_EIGH_MAX_DIM = 2048
"""Up to this input dimension the PCA is an exact eigendecomposition of the covariance;
above it, a randomized SVD of the centered sample (Halko et al. 2011), which finds the
leading components in O(n d q) instead of the O(d^3) of FAISS's own dense eigensolver
(121 s for d = 4096 on 2 cores, against seconds here)."""


def train_pca(sample: np.ndarray, d_out: int) -> faiss.PCAMatrix:
    """A trained ``faiss.PCAMatrix`` (d -> d_out), computed with torch (on the GPU when one
    is present). It is FAISS's own transform type, so the index serializes and loads as if
    FAISS had trained it: x -> A (x - mean), A's rows the leading principal directions.

    Raises:
        ConfigError: fewer training vectors than output dimensions, or d_out > d.
    """
    import torch

    n, d = sample.shape
    if not 0 < d_out <= d or n < d_out:
        raise ConfigError(
            f"PCA{d_out} needs d_out <= d ({d}) and at least {d_out} training vectors (got {n})",
            code="invalid_faiss_factory",
        )
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(dev)
    mean = x.double().mean(0)
    xc = x - mean.to(x.dtype)
    if d <= PCA_EIGH_MAX_DIM:
        evals, evecs = torch.linalg.eigh(xc.double().T @ xc.double())
        order = torch.argsort(evals, descending=True)[:d_out]
        comps, top = evecs[:, order].T, evals[order]
    else:
        torch.manual_seed(0)
        _u, sv, v = torch.svd_lowrank(xc, q=min(d_out + 32, n, d), niter=6)
        comps, top = v[:, :d_out].T, sv[:d_out].double().square()
    pca = faiss.PCAMatrix(d, d_out)  # eigenvalues as FAISS keeps them: of X_c^T X_c, unscaled
    faiss.copy_array_to_vector(mean.float().cpu().numpy(), pca.mean)
    faiss.copy_array_to_vector(top.float().cpu().numpy(), pca.eigenvalues)
    faiss.copy_array_to_vector(
        np.ascontiguousarray(comps.float().cpu().numpy()).ravel(), pca.PCAMat
    )
    pca.prepare_Ab()
    pca.is_trained = True
    log.info(
        "trained PCA%d on %d vectors of d=%d (%s, %s)",
        d_out,
        n,
        d,
        "eigh" if d <= PCA_EIGH_MAX_DIM else "randomized SVD",
        dev.type,
    )
    return pca


def _find_ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_search_params(index: faiss.Index, params: SearchParams | None = None) -> None:
    """Apply nprobe / efSearch wherever the index (or a wrapped sub-index) has them.

    Mutates the index: call it at load time or from one thread at a time.
    """
    params = params or SearchParams()
    ivf = _find_ivf(index)
    nprobe = min(params.nprobe, ivf.nlist) if ivf is not None else params.nprobe
    space = (
        faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    )
    for name, value in (("nprobe", nprobe), ("efSearch", params.ef_search)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # this index type has no such parameter


def search(
    index: faiss.Index,
    fingerprints: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search, the index's candidates re-ranked exactly.

    Query-time knobs (nprobe, efSearch) are set on the index once, at load
    (``set_search_params``): applying them mutates it, and searches run concurrently.

    Args:
        index: the FAISS index.
        fingerprints: float16 [N, d] stored fingerprints (may be memory-mapped).
        queries: float32 [Q, d] unit query fingerprints.
        k: results per query.
        candidates: the index's hits re-ranked per query against ``fingerprints``; 0: the
            index's own scores (what a Flat index's already are); None: ``RERANK_FACTOR * k``.
    Returns:
        scores [Q, k] float32 (descending) and ids [Q, k] int64; ids -1 (score -inf) pad
        when the index holds fewer than k vectors.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != fingerprints.shape[1]:
        raise ConfigError(
            f"queries must be [Q, {fingerprints.shape[1]}], got {list(queries.shape)}"
        )
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    n_q, n = queries.shape[0], index.ntotal
    scores = np.full((n_q, k), -np.inf, dtype=np.float32)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    if n == 0 or n_q == 0:
        return scores, ids
    n_cand = RERANK_FACTOR * k if candidates is None else candidates
    if n_cand == 0:
        d, i = index.search(queries, min(k, n))
        d = np.where(i >= 0, d, -np.inf).astype(np.float32)
        scores[:, : d.shape[1]], ids[:, : i.shape[1]] = d, i
        return scores, ids
    _, cand = index.search(queries, min(max(n_cand, k), n))
    return rerank_exact(queries, cand, fingerprints, k)


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
        _, ids = search(index, fingerprints, queries, k, candidates=None if rr else 0)
        hits = sum(
            len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact_ids, strict=True)
        )
        out[key] = hits / float(k * len(queries))
    return out


def read_index(path, *, use_gpu: bool = False) -> faiss.Index:
    """Load a saved index (moved to the GPU for search when asked and possible)."""
    index = faiss.read_index(str(path))
    set_search_params(index)
    index, _ = _to_gpu(index, use_gpu)
    return index
