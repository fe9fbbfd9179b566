"""The vector searches an index can serve from (``engine.protocols.VectorSearch``).

``FaissSearch`` (the published FAISS index, approximate candidates re-ranked exactly
against the stored fingerprints), ``engine.torch_search.TorchFlatSearch`` (exact brute
force with torch, split over the GPUs) and ``engine.milvus.MilvusSearch`` (a Milvus
collection pushed from the index). ``open_vectors`` picks one from the placement.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from api.errors import ArtifactError
from engine.choices import Placement
from engine.milvus import MilvusSearch
from engine.protocols import VectorSearch
from engine.torch_search import TorchFlatSearch
from indexer import faiss_index
from indexer import manifest as mf
from indexer.milvus import MilvusTarget


class FaissSearch:
    """Search with a FAISS index; an approximate one's top ``candidates`` per query are
    re-ranked exactly against ``fingerprints`` (``faiss_index.search``).

    Args:
        index: the FAISS index (its nprobe / efSearch already set).
        fingerprints: [N, d] float16 stored fingerprints (memory-mapped).
        exact: the index is Flat: its scores are already exact (no re-ranking).
        candidates: re-ranked per query (None: ``RERANK_FACTOR * k``; 0: none).
    """

    def __init__(
        self,
        index: faiss.Index,
        fingerprints: np.ndarray,
        *,
        exact: bool,
        candidates: int | None,
        backend: str = "faiss",
    ) -> None:
        self.index = index
        self.fingerprints = fingerprints
        self.candidates = 0 if exact else candidates
        self._backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss_index.search(
            self.index, self.fingerprints, vectors, k, candidates=self.candidates
        )

    def check_ready(self) -> None:
        """Always ready: the index is in memory."""

    def close(self) -> None:
        """Nothing to release beyond the references the index drops."""


def open_vectors(
    index_dir: Path,
    manifest: mf.Manifest,
    fingerprints: np.ndarray,
    *,
    placement: Placement,
    params: faiss_index.SearchParams,
    on_cuda: bool,
    milvus: MilvusTarget | None,
) -> VectorSearch:
    """The vector search an index is served from.

    Args:
        placement: ``auto`` (FAISS on one GPU when the model runs on CUDA and faiss-gpu is
            present, else the CPU), ``cpu``, ``gpu`` / ``shards`` (FAISS on one GPU / split
            over all; needs faiss-gpu), ``torch`` (``TorchFlatSearch``; the FAISS file is
            then not loaded).
        params: query-time knobs, set on the FAISS index once here.
        on_cuda: the model runs on CUDA (``auto``).
        milvus: search this Milvus collection instead (the FAISS file is not loaded).
    Raises:
        ConfigError: a GPU placement without faiss-gpu (``OpenOptions`` refuses an unknown one).
        ArtifactError: the FAISS index's count is not the manifest's.
    """
    if milvus is not None:
        return MilvusSearch(milvus, manifest.version, manifest, fingerprints, params.candidates)
    if placement == "torch":
        return TorchFlatSearch(fingerprints)
    index = faiss_index.read_index(
        index_dir / mf.FAISS_INDEX, use_gpu=placement == "auto" and on_cuda
    )
    if placement in ("gpu", "shards"):
        index = faiss_index.place(index, placement)
    if index.ntotal != manifest.sequences:
        raise ArtifactError(
            f"index counts disagree: manifest {manifest.sequences}, FAISS {index.ntotal}"
        )
    faiss_index.set_search_params(index, params)  # once, before any concurrent search
    where = "GPU" if "Gpu" in type(index).__name__ or placement in ("gpu", "shards") else "CPU"
    exact = faiss_index.is_exact(manifest.factory)
    backend = f"faiss {manifest.factory} on the {where}"
    return FaissSearch(
        index, fingerprints, exact=exact, candidates=params.candidates, backend=backend
    )
