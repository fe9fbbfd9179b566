"""``InfluenceIndex``: a published index, opened, checked and held (``engine.protocols.Index``).

``open`` checks the manifest and its checksums and the model hash, rebuilds the exact
encoder the index was built with, and loads the vector search, the float16 fingerprints
(memory-mapped), the BM25 index and the metadata store, all at once: nothing is loaded
lazily. The service, the evaluation and ``influence query`` all go through this class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import torch

from api.errors import ArtifactError
from encoder.batching import Example, Tokenizer, collate, sequence_example, tokenize_query
from encoder.fingerprint import TrackStarEncoder
from encoder.generation import Generated, Generation, generate
from encoder.model_loading import load_model, load_tokenizer, model_max_tokens
from encoder.rescoring import ExactRescorer, QueryScorer
from encoder.shared_scores import SharedScorers
from encoder.token_attribution import attribute_tokens
from engine.milvus import MilvusMetadata, MilvusSearch
from engine.opening import HeldFiles, verify_model
from engine.options import FairLock, OpenOptions
from engine.protocols import Attribution, Record, Summary, VectorSearch
from engine.vectors import open_vectors
from indexer import integrity
from indexer import manifest as mf
from indexer.bm25 import BM25Index, open_for_index
from indexer.metadata import ExampleRecord, MetadataStore
from indexer.saved_encoder import build_encoder

log = logging.getLogger(__name__)

QUERY_BATCH = 32
"""Queries encoded per backward pass in ``encode_examples``."""

DEFAULT_RESCORE = 100
"""Candidates a hessian-none index re-scores exactly by default (``default_rescore``), at
most: the certified second stage stops earlier once its top-k is certain. Chosen by the
overlap with the unprojected ranking and between seeds of the default (plain) sketch, on
the demo and on real text (benchmarks/results/bench_rescore_depth_*plain.md); the whitened
sketch (``--whiten``) needs more (bench_rescore_depth_real_sets.md)."""

EXPLAIN_CHUNK = 4
"""Target tokens per backward pass of an explanation made while queries are flowing: each
pass holds the model for about one query's encode, which bounds a query's wait for it."""

__all__ = ["ExampleRecord", "InfluenceIndex", "OpenOptions"]


class InfluenceIndex:
    """A loaded, immutable index: encode queries, search, fetch and explain examples.

    Use ``InfluenceIndex.open``. Every method is thread-safe; the model runs one pass at a
    time, in the order the passes were asked for (``encode_lock``).
    """

    def __init__(
        self,
        index_dir: Path,
        manifest: mf.Manifest,
        encoder: TrackStarEncoder,
        tokenizer: Tokenizer,
        vectors: VectorSearch,
        fingerprints: np.ndarray,
        store: MetadataStore | MilvusMetadata,
        lexical: BM25Index,
    ) -> None:
        self._index_dir = index_dir
        self.manifest = manifest
        self.encoder = encoder
        self._tokenizer = tokenizer
        self.vectors = vectors
        self.fingerprints = fingerprints
        self.store = store
        self._lexical = lexical
        self._version = manifest.version
        m = manifest
        self._summary = Summary(
            model=m.model.name,
            model_hash=m.model.hash,
            index_version=self._version,
            index_dir=index_dir,
            size=m.sequences,
            counts=dict(m.counts),
            fingerprint=dict(m.fingerprint),
            faiss=m.factory,
            built_at=m.created_at,
            backend=vectors.backend,
        )
        """Immutable like the index: made once (every batch reports its model name)."""
        self._max_tokens = model_max_tokens(encoder.model)
        self._pad = int(tokenizer.pad_token_id or 0)
        self._held = HeldFiles(index_dir)
        self.last_query_at = -float("inf")
        """``time.monotonic()`` of the last query's model pass (explain yields to queries)."""
        self.exact_sq = integrity.load_exact_norms(index_dir, manifest)
        """Each sequence's squared norm in the exact second stage (None: not stored)."""
        self._rescorer: ExactRescorer | None = None
        """The exact second stage: a second encoder on the loaded model, made on first use."""
        self.encode_lock = FairLock()
        """Held while the model runs (hooks are per-pass state)."""

    @classmethod
    def open(cls, index_dir: str | Path, options: OpenOptions | None = None) -> InfluenceIndex:
        """Open a published index directory.

        Raises:
            ArtifactError: not an index, a failed checksum, another format version, or a
                model that is not the one the index was built with (``model_mismatch``).
            ModelLoadError: the model or tokenizer cannot be loaded.
            ConfigError: an unknown placement.
        """
        opts = options or OpenOptions()
        index_dir = Path(index_dir).resolve()
        manifest = mf.Manifest.read(index_dir)
        model_dir = (
            Path(opts.model_dir) if opts.model_dir is not None else Path(manifest.model.path)
        )
        if opts.verify:
            verify_model(index_dir, manifest, model_dir)
        tokenizer = load_tokenizer(model_dir)
        encoder = build_encoder(index_dir, manifest, load_model(model_dir, device=opts.device))
        fingerprints = np.load(index_dir / mf.FINGERPRINTS, mmap_mode="r")
        if fingerprints.shape != (manifest.sequences, encoder.dim):
            raise ArtifactError(
                f"index counts disagree: manifest {manifest.sequences}, fingerprints "
                f"{list(fingerprints.shape)}, encoder dim {encoder.dim}"
            )
        store = MetadataStore(index_dir / mf.METADATA)
        try:
            if opts.verify:
                integrity.check_against_encoder(
                    encoder,
                    store,
                    fingerprints,
                    manifest,
                    int(tokenizer.pad_token_id or 0),
                    integrity.load_exact_norms(index_dir, manifest),
                )
            lexical = open_for_index(index_dir, manifest.sequences)
            vectors = open_vectors(
                index_dir,
                manifest,
                fingerprints,
                placement=opts.placement,
                params=opts.search_params,
                on_cuda=encoder.device.type == "cuda",
                milvus=opts.milvus,
            )
        except BaseException:
            store.close()
            raise
        served: MetadataStore | MilvusMetadata = store
        if isinstance(
            vectors, MilvusSearch
        ):  # metadata from Milvus too; the local store was for the checks
            served = vectors.metadata()
            store.close()
        log.info(
            "opened index %s: %d sequences, d=%d, %s",
            index_dir,
            manifest.sequences,
            encoder.dim,
            vectors.backend,
        )
        return cls(index_dir, manifest, encoder, tokenizer, vectors, fingerprints, served, lexical)

    @property
    def index_dir(self) -> Path:
        return self._index_dir

    @property
    def version(self) -> str:
        return self._version

    @property
    def size(self) -> int:
        return self.manifest.sequences  # checked against every artifact at open

    @property
    def max_tokens(self) -> int | None:
        return self._max_tokens

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def lexical(self) -> BM25Index:
        return self._lexical

    @property
    def idle_s(self) -> float:
        return time.monotonic() - self.last_query_at

    @property
    def default_rescore(self) -> int:
        """``DEFAULT_RESCORE`` where the exact stage scores what the first stage estimates
        (a projected index without a projected R), else 0: over a whitened (R) index it would
        rank by another score."""
        config = self.encoder.config
        return DEFAULT_RESCORE if config.projected and config.hessian == "none" else 0

    def summary(self) -> Summary:
        return self._summary

    def encode_queries(
        self, pairs: list[tuple[str, str]], max_tokens: int | None = None
    ) -> np.ndarray:
        """Fingerprints of (prompt, completion) queries, completion tokens as targets.

        Args:
            pairs: Q (prompt, completion) strings.
            max_tokens: token limit per query (capped at the model's context length).
        Returns:
            [Q, d] float32 unit vectors.
        Raises:
            InputError: empty completion / prompt. InputTooLongError: over the limit.
        """
        limit = (
            self.max_tokens
            if max_tokens is None
            else min(max_tokens, self.max_tokens or max_tokens)
        )
        return self.encode_examples(
            [tokenize_query(self.tokenizer, p, c, max_tokens=limit) for p, c in pairs]
        )

    def encode_examples(self, examples: list[Example]) -> np.ndarray:
        """Fingerprints of tokenized queries (``encoder.batching.tokenize_query``); [Q, d]
        float32 unit vectors."""
        self.last_query_at = time.monotonic()
        out = np.zeros((len(examples), self.encoder.dim), dtype=np.float32)
        with self.encode_lock:
            for s in range(0, len(examples), QUERY_BATCH):
                batch = collate(examples[s : s + QUERY_BATCH], self._pad)
                out[s : s + len(batch)] = self.encoder.encode(batch).float().cpu().numpy()
        return out

    def generate(self, prompt_ids: list[int], options: Generation) -> Generated:
        """The model's continuation of ``prompt_ids`` (``encoder.generation``), run under
        the model's lock like an encode pass."""
        self.last_query_at = time.monotonic()
        with self.encode_lock:
            return generate(
                self.encoder.model,
                prompt_ids,
                options,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self._pad,
            )

    def rescore(self, example: Example, ids: list[int]) -> np.ndarray:
        """The exact second stage (``encoder.rescoring``): scores of sequences ``ids`` for
        one tokenized query by their unprojected corrected (sketch: and whitened) gradients;
        [len(ids)] float32."""
        return self.exact_scorer(example)(ids)

    def _query_scorer(self, example: Example) -> QueryScorer:
        """The exact stage's scorer for one query (call under ``encode_lock``)."""
        if self._rescorer is None:
            seq_len = int(self.manifest.corpus.get("seq_len") or max(len(example.input_ids), 2))
            self._rescorer = ExactRescorer.of(self.encoder, seq_len)
        return self._rescorer.for_query(example, self._pad)

    def exact_scorer(self, example: Example) -> Callable[[list[int]], np.ndarray]:
        """``rescore`` a chunk at a time: the query's side is computed here, once; each call
        scores sequences ``ids`` under the model lock, which other queries take between
        chunks."""
        return self.exact_scorers([example], [None])[0]

    def exact_scorers(
        self, examples: list[Example], pools: Sequence[Collection[int] | None]
    ) -> list[Callable[[list[int]], np.ndarray]]:
        """``exact_scorer`` of several queries whose candidates' passes are shared
        (``encoder.shared_scores``): a chunk scored for one query is scored for every query
        whose pool (its candidate ids; None: none shared) holds it."""
        self._held.check()
        self.last_query_at = time.monotonic()
        with self.encode_lock:
            group = SharedScorers([self._query_scorer(e) for e in examples], pools)

        def scorer(k: int) -> Callable[[list[int]], np.ndarray]:
            def score(ids: list[int]) -> np.ndarray:
                self._held.check()
                todo = group.missing(k, ids)
                if todo:
                    sequences = [sequence_example(t) for t in self.store.token_ids_many(todo)]
                    sq = None if self.exact_sq is None else torch.from_numpy(self.exact_sq[todo])
                    self.last_query_at = time.monotonic()
                    with self.encode_lock:
                        group.run(k, todo, sequences, sq)
                return group.scores(k, ids).float().numpy()

            return score

        return [scorer(k) for k in range(len(examples))]

    def score_sd(self, vector: np.ndarray, ids: list[int]) -> np.ndarray | None:
        """Per-result standard deviation of the scores of query fingerprint ``vector`` [d]
        against sequences ``ids`` under another seed (``Family.score_variance``); None for an
        index with a projected R, where the model of it does not hold."""
        if self.encoder.config.hessian != "none" or not ids:
            return None
        # Stored rows as they are (float16): torch widens them faster than numpy does.
        rows = torch.from_numpy(np.ascontiguousarray(self.fingerprints[np.asarray(ids)]))
        query = torch.from_numpy(np.asarray(vector, dtype=np.float32))
        variance = self.encoder.family.score_variance(query, rows, self.encoder.block_dims)
        return variance.clamp_min(0).sqrt().float().numpy()

    def attribute(
        self,
        query: Example,
        id: int,
        input_ids: list[int],
        *,
        busy: bool,
        exact: bool = False,  # noqa: A002
    ) -> Attribution:
        """Split the score of (query, sequence ``id``) over its tokens: the first stage's
        fingerprint score (``encoder.token_attribution``; the model is taken per pass, so
        queries run in between; ``busy``: one pass per ``EXPLAIN_CHUNK`` targets instead of
        one forward-mode pass), or with ``exact`` the exact second stage's score
        (``QueryScorer.token_contributions``: one candidate pass per target token)."""
        if exact:
            return self._attribute_exact(query, id, input_ids)
        with self.encode_lock:
            e_q = self.encoder.encode(collate([query], self._pad))[0]
        lock = self.encode_lock
        attribution = attribute_tokens(
            self.encoder,
            sequence_example(input_ids),
            e_q,
            chunk=EXPLAIN_CHUNK,
            hold=lambda: lock,
            method="copies" if busy else "jvp",
        )
        stored = torch.from_numpy(np.asarray(self.fingerprints[id], dtype=np.float64))
        rebuilt = attribution.fingerprint.double()
        agreement = float(stored @ rebuilt / (stored.norm() * rebuilt.norm()).clamp_min(1e-30))
        return Attribution(
            contributions=attribution.contributions.tolist(),
            score=attribution.score,
            index_score=float(stored @ e_q.double().cpu()),
            agreement=agreement,
        )

    def _attribute_exact(self, query: Example, id: int, input_ids: list[int]) -> Attribution:  # noqa: A002
        sequence = sequence_example(input_ids)
        with self.encode_lock:
            scorer = self._query_scorer(query)
        lock = self.encode_lock  # taken per pass: queries run in between
        contributions, score = scorer.token_contributions(sequence, hold=lambda: lock)
        with self.encode_lock:
            e_q, rebuilt = self.encoder.encode(collate([query, sequence], self._pad)).double().cpu()
        stored = torch.from_numpy(np.asarray(self.fingerprints[id], dtype=np.float64))
        agreement = float(stored @ rebuilt / (stored.norm() * rebuilt.norm()).clamp_min(1e-30))
        index_score = float(stored @ e_q)
        return Attribution(contributions.tolist(), score, index_score, agreement)

    def check_unchanged(self) -> None:
        """Raise ``IndexChangedError`` (503) when a file read while serving was modified in
        place since open (renaming a new index over the path is safe: the files are held);
        ``SearchBackendUnavailable`` (503) when the vector search cannot answer."""
        self._held.check()
        self.vectors.check_ready()

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k training sequences by influence for [Q, d] float32 query fingerprints:
        scores [Q, k] float32 descending, ids [Q, k] int64 (-1 and -inf pad)."""
        self._held.check()
        return self.vectors.search(vectors, k)

    def examples(self, ids: list[int]) -> list[Record]:
        """Metadata records for ids, in order (``NotFoundError`` for an unknown id)."""
        self._held.check()
        return list(self.store.get_many(ids))

    def example(self, id: int) -> Record:  # noqa: A002 - the contract's name
        return self.examples([id])[0]

    def token_ids(self, id: int) -> list[int]:  # noqa: A002 - the contract's name
        """The token ids sequence ``id`` was indexed with."""
        return self.store.token_ids(id)

    def close(self) -> None:
        self._held.close()
        self.vectors.close()
        self.store.close()
        self.fingerprints = np.zeros((0, self.encoder.dim), dtype=np.float16)
