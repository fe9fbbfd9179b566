"""Read side of a published index: ``InfluenceIndex`` (the contract in docs/architecture.md).

``open`` checks the manifest checksums and the model hash, rebuilds the exact encoder the
index was built with (saved projections, second moments and whitener), and loads FAISS,
the float16 fingerprints (memory-mapped) and the SQLite metadata. The service, the
evaluation and the ``influence query`` command all go through this class.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder.basis import load_projections
from encoder.batching import Example, collate, sequence_example, tokenize_query
from encoder.config import FingerprintConfig
from encoder.errors import ArtifactError, ConfigError, IndexChangedError
from encoder.fingerprint import TrackStarEncoder
from encoder.generation import Generated, Generation, generate
from encoder.model_loading import load_model, load_tokenizer, model_hash, tokenizer_hash
from encoder.optimizer_state import load_second_moments
from encoder.rescoring import ExactRescorer
from encoder.uncertainty import score_sd
from encoder.whitening import Whitener
from indexer import faiss_index, integrity
from indexer import manifest as mf
from indexer.bm25 import BM25Index
from indexer.bm25 import open_for_index as open_bm25
from indexer.metadata import ExampleRecord, MetadataStore
from indexer.milvus import MilvusMetadata, MilvusSearch, MilvusTarget
from indexer.torch_search import TorchFlatSearch

log = logging.getLogger(__name__)

SEARCH_PLACEMENTS = ("auto", "cpu", "gpu", "shards", "torch")
QUERY_BATCH = 32
"""Queries encoded per backward pass in ``encode_queries``."""

__all__ = ["ExampleRecord", "InfluenceIndex"]


def model_max_tokens(model: torch.nn.Module) -> int | None:
    """The model's context length (positions), if its config says."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_encoder(index_dir: Path, manifest: dict[str, Any], model: torch.nn.Module) -> TrackStarEncoder:
    """The encoder an index was built with, from its saved artifacts.

    Raises:
        ArtifactError: the saved projections do not fit the plan, or (gaussian) differ from
            those the config generates.
    """
    fp = manifest["fingerprint"]
    config = FingerprintConfig.from_dict(fp["config"])
    second_moments = None
    if config.correction:
        second_moments = load_second_moments(index_dir / mf.SECOND_MOMENTS, model)
    whitener = Whitener.load(index_dir / mf.WHITENER) if config.hessian != "none" else None
    if whitener is not None and (whitener.lambda_ != fp.get("lambda") or (config.hessian == "train" and whitener.lambda_ != 0)):
        raise ArtifactError(f"the whitener mixes R_eval with lambda {whitener.lambda_}, the manifest says hessian "
                            f"{config.hessian!r}, lambda {fp.get('lambda')}", code="manifest_mismatch")  # fmt: skip
    saved = load_projections(index_dir / mf.PROJECTIONS) if integrity.has_projections(manifest) else None
    try:  # a fitted basis is installed before the second moments: one correction set-up
        encoder = TrackStarEncoder(model, config, second_moments=second_moments, whitener=whitener,
                                   projections=saved if config.projection == "pca" else None)  # fmt: skip
    except ConfigError as exc:
        raise ArtifactError(f"the saved projection basis does not fit the model: {exc}",
                            code="manifest_mismatch") from exc  # fmt: skip
    if encoder.module_names != fp["modules"]:
        raise ArtifactError("the model's tracked modules differ from those the index was built with",
                            code="manifest_mismatch")
    if encoder.block_dims != fp.get("block_dims", encoder.block_dims):
        raise ArtifactError(f"the config sizes the fingerprint blocks as {encoder.block_dims}, the manifest "
                            f"says {fp['block_dims']}", code="manifest_mismatch")  # fmt: skip
    projections = encoder.projections()
    if projections and config.projection == "gaussian":
        if saved is None or set(saved) != set(projections):
            raise ArtifactError("the saved projections name other modules than the config projects",
                                code="manifest_mismatch")
        for name, (a, b) in projections.items():
            if not (torch.equal(saved[name][0], a) and torch.equal(saved[name][1], b)):
                raise ArtifactError(f"projection of {name} differs from the saved one (seed or torch RNG changed)",
                                    code="manifest_mismatch")
    return encoder


class FairLock:
    """A FIFO mutex: threads get it in the order they asked. ``threading.Lock`` lets the
    releasing thread take it straight back, so a long explanation that releases the model
    between its passes would still starve the queries waiting for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> FairLock:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


LIVE_FILES = (mf.FINGERPRINTS, mf.METADATA)
"""The files read while serving (memory-mapped fingerprints, SQLite); the rest is in RAM."""


class HeldFiles:
    """Open descriptors of an index's live files and their size and mtime at open.

    Holding them keeps the inodes a served index reads alive whatever happens to the path
    (rename-based publishing is always safe); ``check`` notices an in-place modification
    (which would otherwise surface as SIGBUS on a truncated memory map or garbage reads).
    """

    def __init__(self, index_dir: Path, names: tuple[str, ...]) -> None:
        self.fds: dict[str, int] = {}
        self.stats: dict[str, tuple[int, int]] = {}
        for name in names:
            fd = os.open(index_dir / name, os.O_RDONLY)
            st = os.fstat(fd)
            self.fds[name], self.stats[name] = fd, (st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        for name, fd in self.fds.items():
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self.stats[name]:
                raise IndexChangedError(
                    f"index file {name} was modified in place while served (published indexes are "
                    "immutable: publish a new directory and reload)",
                    file=name,
                )

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class InfluenceIndex:
    """A loaded, immutable index: encode queries, search, fetch examples.

    Use ``InfluenceIndex.open``. ``search`` and ``examples`` are thread-safe;
    ``encode_queries`` serializes its backward passes with a lock.
    """

    def __init__(
        self,
        index_dir: Path,
        manifest: dict[str, Any],
        encoder: TrackStarEncoder,
        tokenizer: Any,
        faiss_idx: Any,
        fingerprints: np.ndarray,
        store: MetadataStore | MilvusMetadata,
        search_params: faiss_index.SearchParams | None = None,
        torch_search: TorchFlatSearch | MilvusSearch | None = None,
        bm25: BM25Index | None = None,
    ) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.faiss = faiss_idx
        self.fingerprints = fingerprints
        self.store = store
        self.version = mf.manifest_version(index_dir)
        self.exact = faiss_index.is_exact(manifest["faiss"]["factory"])
        self.max_tokens = model_max_tokens(encoder.model)
        self.search_params = search_params or faiss_index.SearchParams()
        """Query-time knobs; nprobe/efSearch are set on the FAISS index when opened."""
        self.torch_search = torch_search
        """Set by ``placement="torch"`` (exact search with torch) or by ``milvus`` (search
        through a Milvus collection): the vector search used instead of FAISS."""
        self.bm25 = bm25
        """The lexical index (``mode: bm25`` / ``hybrid``), opened with the rest."""
        self._held = HeldFiles(index_dir, LIVE_FILES)
        self.last_query_at = -float("inf")
        """``time.monotonic()`` of the last ``encode_examples`` call (explain yields to queries)."""
        self._rescorer: ExactRescorer | None = None
        """The exact second stage, built from the loaded model on first use (no file read)."""
        self.encode_lock = FairLock()
        """Held while the model runs (hooks are per-pass state): take it to run the model,
        one pass at a time, so waiting queries get their turn in order."""

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        model_dir: str | Path | None = None,
        verify: bool = True,
        search_params: faiss_index.SearchParams | None = None,
        placement: str = "auto",
        milvus: MilvusTarget | None = None,
    ) -> InfluenceIndex:
        """Open a published index directory.

        Args:
            index_dir: the directory holding ``manifest.json``.
            device: where the model runs (default: CUDA if present, else CPU).
            model_dir: the model, if not at the path recorded in the manifest.
            verify: check file checksums and the model/tokenizer hashes.
            search_params: an approximate index's query-time knobs (nprobe, efSearch,
                candidates re-ranked exactly); default ``SearchParams()``.
            placement: where search runs. ``auto``: the FAISS index on one GPU when the
                model runs on CUDA and faiss-gpu is present, else on the CPU; ``cpu``;
                ``gpu`` / ``shards``: the FAISS index on one GPU / split over all GPUs
                (needs faiss-gpu); ``torch``: exact brute force over the stored
                fingerprints with torch, split over all visible GPUs (else the CPU), which
                needs no faiss-gpu; the FAISS index is then not loaded (``faiss`` is None).
            milvus: search through this Milvus collection (``indexer.milvus``, pushed with
                ``influence index push``) instead; the FAISS index is not loaded.
        Raises:
            ArtifactError: not an index, a failed checksum, or a model that is not the one
                the index was built with (code ``model_mismatch``).
            ModelLoadError: the model or tokenizer cannot be loaded.
        """
        if placement not in SEARCH_PLACEMENTS:
            raise ConfigError(f"search placement must be one of {SEARCH_PLACEMENTS}, got {placement!r}")
        index_dir = Path(index_dir).resolve()
        manifest = mf.read_manifest(index_dir)
        mdir = Path(model_dir) if model_dir is not None else Path(manifest["model"]["path"])
        if verify:
            integrity.check_listing(manifest)
            mf.verify_checksums(index_dir, manifest)
            if not mdir.is_dir():
                raise ArtifactError(
                    f"the index's model directory {mdir} does not exist; pass the model directory",
                    code="model_missing",
                )
            if model_hash(mdir) != manifest["model"]["hash"]:
                raise ArtifactError(
                    f"the model in {mdir} is not the model this index was built with "
                    f"(hash mismatch); rebuild the index or pass the right model",
                    code="model_mismatch",
                )
            if tokenizer_hash(mdir) != manifest["model"]["tokenizer_hash"]:
                raise ArtifactError(
                    f"the tokenizer in {mdir} differs from the one this index was built with",
                    code="model_mismatch",
                )
        tokenizer = load_tokenizer(mdir)
        model = load_model(mdir, device=device)
        encoder = build_encoder(index_dir, manifest, model)
        fingerprints = np.load(index_dir / mf.FINGERPRINTS, mmap_mode="r")
        # placement torch scores the fingerprints itself: the FAISS index (for Flat, another
        # N x d x 4 bytes of RAM) is not loaded; its file was checksummed above all the same.
        idx = None
        if placement != "torch" and milvus is None:
            idx = faiss_index.read_index(index_dir / mf.FAISS_INDEX,
                                         use_gpu=placement == "auto" and encoder.device.type == "cuda")  # fmt: skip
            if placement in ("gpu", "shards"):
                idx = faiss_index.place(idx, placement)
        store = MetadataStore(index_dir / mf.METADATA)
        n = int(manifest["counts"]["sequences"])
        if fingerprints.shape != (n, encoder.dim) or (idx is not None and idx.ntotal != n):
            raise ArtifactError(
                f"index counts disagree: manifest {n}, fingerprints {list(fingerprints.shape)}, "
                f"FAISS {idx.ntotal if idx is not None else '-'}, encoder dim {encoder.dim}"
            )
        if verify:
            integrity.check_against_encoder(encoder, store, fingerprints, manifest, int(tokenizer.pad_token_id or 0))
        params = search_params or faiss_index.SearchParams()
        if idx is not None:
            faiss_index.set_search_params(idx, params)  # once, before any concurrent search
        log.info("opened index %s: %d sequences, d=%d, %s (%s)", index_dir, n, encoder.dim,
                 manifest["faiss"]["factory"], params)  # fmt: skip
        brute: TorchFlatSearch | MilvusSearch | None = TorchFlatSearch(fingerprints) if placement == "torch" else None
        lexical = open_bm25(index_dir, manifest, lambda: [r.text for r in store.get_many(list(range(n)))])
        served_store: MetadataStore | MilvusMetadata = store
        if milvus is not None:  # vectors and metadata from Milvus; the local store was for the checks
            brute = MilvusSearch(milvus, mf.manifest_version(index_dir), manifest, fingerprints, params.candidates)
            served_store = brute.metadata()
            store.close()
        return cls(index_dir, manifest, encoder, tokenizer, idx, fingerprints, served_store, params, brute, lexical)

    @property
    def size(self) -> int:
        return int(self.manifest["counts"]["sequences"])  # checked against every artifact at open

    def encode_queries(self, pairs: list[tuple[str, str]], max_tokens: int | None = None) -> np.ndarray:
        """Fingerprints of (prompt, completion) queries, completion tokens as targets.

        Args:
            pairs: Q (prompt, completion) strings.
            max_tokens: token limit per query (capped at the model's context length).
        Returns:
            [Q, d] float32 unit vectors.
        Raises:
            InputError: empty completion / prompt. InputTooLongError: over the limit.
        """
        limit = self.max_tokens if max_tokens is None else min(max_tokens, self.max_tokens or max_tokens)
        return self.encode_examples([tokenize_query(self.tokenizer, p, c, max_tokens=limit) for p, c in pairs])

    def encode_examples(self, examples: list[Example]) -> np.ndarray:
        """Fingerprints of already tokenized queries (``encoder.batching.tokenize_query``), so
        a caller that tokenized them to validate them does not tokenize them twice.

        Returns:
            [Q, d] float32 unit vectors.
        """
        self.last_query_at = time.monotonic()
        out = np.zeros((len(examples), self.encoder.dim), dtype=np.float32)
        pad = int(self.tokenizer.pad_token_id or 0)
        with self.encode_lock:
            for s in range(0, len(examples), QUERY_BATCH):
                batch = collate(examples[s : s + QUERY_BATCH], pad)
                out[s : s + len(batch)] = self.encoder.encode(batch).float().cpu().numpy()
        return out

    def generate(self, prompt_ids: list[int], options: Generation) -> Generated:
        """The model's continuation of ``prompt_ids`` (``encoder.generation``), run under
        the model's lock like an encode pass."""
        self.last_query_at = time.monotonic()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        with self.encode_lock:
            return generate(self.encoder.model, prompt_ids, options, eos_token_id=eos,
                            pad_token_id=int(self.tokenizer.pad_token_id or 0))  # fmt: skip

    def rescore(self, example: Example, ids: list[int]) -> np.ndarray:
        """The exact second stage (``encoder.rescoring``): scores of sequences ``ids`` for
        one tokenized query by their unprojected corrected gradients.

        Returns:
            [len(ids)] float32 scores (cosines with unit norm).
        Raises:
            ArtifactError: code ``rescore_unavailable`` for an index whose metadata store
                does not keep token ids (built before it did).
        """
        self._held.check()
        tokens = [self.store.token_ids(i) for i in ids]
        if any(t is None for t in tokens):
            raise ArtifactError("this index does not store its sequences' token ids, which re-scoring "
                                "needs: rebuild it", code="rescore_unavailable")  # fmt: skip
        self.last_query_at = time.monotonic()
        pad = int(self.tokenizer.pad_token_id or 0)
        with self.encode_lock:
            if self._rescorer is None:
                self._rescorer = ExactRescorer(self.encoder.model, self.encoder.config, self.encoder.second_moments)
            scores = self._rescorer.scores(example, [sequence_example(t) for t in tokens if t is not None], pad)
        return scores.float().numpy()

    def score_sd(self, vector: np.ndarray, ids: list[int]) -> np.ndarray | None:
        """Per-result standard deviation of the scores of query fingerprint ``vector`` [d]
        against sequences ``ids`` under another projection (``encoder.uncertainty``); None
        for whitened indexes, where the model of it does not hold, and for a fitted (pca)
        basis, which has no random projection to vary."""
        if self.encoder.config.hessian != "none" or self.encoder.config.projection != "gaussian" or not ids:
            return None
        rows = torch.from_numpy(np.asarray(self.fingerprints[np.asarray(ids)], dtype=np.float32))
        sd = score_sd(torch.from_numpy(np.asarray(vector, dtype=np.float32)), rows, self.encoder.plan, self.encoder.block_dims)
        return sd.float().numpy()

    def check_unchanged(self) -> None:
        """Raise ``IndexChangedError`` (503) when a file read while serving was modified in
        place since open; renaming a new index over the path is safe (the files are held).
        Raise ``SearchBackendUnavailable`` (503) when the Milvus collection does not answer."""
        self._held.check()
        if isinstance(self.torch_search, MilvusSearch):
            self.torch_search.check_ready()

    def search(self, vectors: np.ndarray, k: int, *, rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k training sequences by influence for query fingerprints.

        Args:
            vectors: [Q, d] float32 query fingerprints.
            k: results per query.
            rerank: re-rank an approximate index's candidates exactly (ignored for Flat).
        Returns:
            scores [Q, k] float32 descending, ids [Q, k] int64 (-1 and -inf pad).
        """
        self._held.check()
        if self.torch_search is not None:
            return self.torch_search.search(vectors, k)  # exact, or re-ranked by the searcher (Milvus)
        return faiss_index.search(self.faiss, self.fingerprints, vectors, k, exact=self.exact, rerank=rerank,
                                  candidates=self.search_params.candidates)  # fmt: skip

    def examples(self, ids: list[int]) -> list[ExampleRecord]:
        """Metadata records for ids, in order (``NotFoundError`` for an unknown id)."""
        self._held.check()
        return self.store.get_many(ids)

    def example(self, id: int) -> ExampleRecord:  # noqa: A002 - the contract's name
        return self.examples([id])[0]

    def token_ids(self, id: int) -> list[int] | None:  # noqa: A002 - the contract's name
        """The token ids sequence ``id`` was indexed with (None for an index built before
        the metadata store kept them)."""
        return self.store.token_ids(id)

    def close(self) -> None:
        self._held.close()
        if isinstance(self.torch_search, MilvusSearch):
            self.torch_search.close()
        self.torch_search = None  # frees its device memory
        self.store.close()
        self.fingerprints = np.zeros((0, self.encoder.dim), dtype=np.float16)
