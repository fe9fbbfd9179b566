"""How an index is opened (``OpenOptions``) and the lock its model is shared under
(``FairLock``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from api.errors import ConfigError
from encoder.model_loading import resolve_device
from engine.choices import SEARCH_PLACEMENTS, Placement
from indexer import faiss_index
from indexer.milvus import MilvusTarget


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


@dataclass(frozen=True)
class OpenOptions:
    """How to open an index (``InfluenceIndex.open``).

    Attributes:
        device: where the model runs (default: CUDA if present, else CPU).
        model_dir: the model, if not at the path recorded in the manifest.
        verify: check file checksums, the model/tokenizer hashes and the config against a
            sample of the stored fingerprints.
        search_params: an approximate index's query-time knobs (nprobe, efSearch,
            candidates re-ranked exactly; ``candidates=0``: none).
        placement: where search runs (``engine.vectors.open_vectors``).
        milvus: search through this Milvus collection (``influence index push``) instead;
            the vectors and metadata are then read from it.
    """

    device: str | torch.device | None = None
    model_dir: str | Path | None = None
    verify: bool = True
    search_params: faiss_index.SearchParams = faiss_index.SearchParams()
    placement: Placement = "auto"
    milvus: MilvusTarget | None = None

    def __post_init__(self) -> None:
        if self.placement not in SEARCH_PLACEMENTS:  # refused before the model loads
            raise ConfigError(
                f"search placement must be one of {SEARCH_PLACEMENTS}, got {self.placement!r}"
            )
        resolve_device(self.device)
