"""The interfaces of the read side: what an opened index offers the query engine.

``Index`` is implemented by ``engine.index.InfluenceIndex`` (a published index on disk) and
by the service tests' fake; ``VectorSearch`` by ``engine.vectors.FaissSearch``,
``engine.torch_search.TorchFlatSearch`` and ``engine.milvus.MilvusSearch``;
``LexicalSearch`` by ``indexer.bm25.BM25Index``. mypy checks each implementation against
its Protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from encoder.batching import Example, Tokenizer
from encoder.generation import Generated, Generation


class Record(Protocol):
    """One indexed training sequence's metadata (``indexer.metadata.ExampleRecord``)."""

    @property
    def id(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def source(self) -> str | None: ...
    @property
    def document_id(self) -> str: ...
    @property
    def token_start(self) -> int: ...
    @property
    def token_end(self) -> int: ...
    @property
    def char_start(self) -> int: ...
    @property
    def char_end(self) -> int: ...


class VectorSearch(Protocol):
    """Top-k inner-product search over an index's fingerprints."""

    @property
    def backend(self) -> str:
        """Which vector search serves, in words (the log, ``/v1/index``, ``/metrics``)."""
        ...

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q, d] float32 queries -> (scores [Q, k] float32 descending, ids [Q, k] int64);
        ids -1 and scores -inf pad when fewer than k vectors are held."""
        ...

    def check_ready(self) -> None:
        """Raise (503) when the backend cannot answer now."""
        ...

    def close(self) -> None: ...


class LexicalSearch(Protocol):
    """Top-k lexical search over the sequences' texts (BM25)."""

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Summary:
    """What an index says about itself (``GET /v1/index``, ``influence index info``)."""

    model: str
    model_hash: str
    index_version: str
    index_dir: Path
    size: int
    counts: dict[str, int]
    fingerprint: dict[str, Any]
    faiss: str
    built_at: str | None
    backend: str = "faiss"
    """The vector search serving the index (``VectorSearch.backend``)."""


@dataclass(frozen=True)
class Attribution:
    """One (query, training sequence) score split over the sequence's tokens.

    Attributes:
        contributions: per token of the sequence (0 for a non-target), summing to ``score``.
        score: the rebuilt fingerprint's score, e_q . e.
        index_score: the stored fingerprint's score (float16 storage, search's number).
        agreement: cosine of the rebuilt and the stored fingerprint (1 when identical).
    """

    contributions: list[float]
    score: float
    index_score: float
    agreement: float


class Index(Protocol):
    """An opened, immutable index: the primitives the query engine is built from.

    Thread-safe: model passes are serialized inside (in arrival order).
    """

    @property
    def index_dir(self) -> Path: ...
    @property
    def version(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def max_tokens(self) -> int | None:
        """The model's context length, if its config says."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def lexical(self) -> LexicalSearch: ...
    @property
    def idle_s(self) -> float:
        """Seconds since the model last ran for a query (an explanation yields while low)."""
        ...

    @property
    def default_rescore(self) -> int:
        """Candidates the exact second stage re-scores when a query does not say (0: off)."""
        ...

    def summary(self) -> Summary: ...

    def encode_examples(self, examples: list[Example]) -> np.ndarray:
        """[Q, d] float32 unit fingerprints of tokenized queries."""
        ...

    def generate(self, prompt_ids: list[int], options: Generation) -> Generated: ...

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``VectorSearch.search`` over this index's vectors."""
        ...

    def rescore(self, example: Example, ids: list[int]) -> np.ndarray:
        """[len(ids)] exact (unprojected) scores of sequences ``ids`` for one query."""
        ...

    def exact_scorer(self, example: Example) -> Callable[[list[int]], np.ndarray]:
        """``rescore`` a chunk at a time: the query's side prepared once, then any number of
        calls with candidate ids, each [len(ids)] float32."""
        ...

    def exact_scorers(
        self, examples: list[Example], pools: Sequence[Collection[int] | None]
    ) -> list[Callable[[list[int]], np.ndarray]]:
        """``exact_scorer`` of several queries at once: a candidate in several pools (their
        candidate ids; None: share nothing) runs its backward pass once for all of them."""
        ...

    def score_sd(self, vector: np.ndarray, ids: list[int]) -> np.ndarray | None:
        """Per-result score standard deviation under another projection, or None."""
        ...

    def examples(self, ids: list[int]) -> Sequence[Record]:
        """Records in the order of ``ids`` (``NotFoundError`` for an unknown id)."""
        ...

    def example(self, id: int) -> Record: ...  # noqa: A002 - the contract's name

    def token_ids(self, id: int) -> list[int]:  # noqa: A002 - the contract's name
        """The token ids sequence ``id`` was indexed with."""
        ...

    def attribute(
        self,
        query: Example,
        id: int,
        input_ids: list[int],
        *,
        busy: bool,
        exact: bool = False,  # noqa: A002
    ) -> Attribution:
        """Split the score of (query, sequence ``id`` run as ``input_ids``) over its tokens;
        ``busy``: queries are flowing, so hold the model one short pass at a time."""
        ...

    def check_unchanged(self) -> None:
        """Raise (503) when a served file was modified in place, or the backend is down."""
        ...

    def close(self) -> None: ...
