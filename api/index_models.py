"""The v1 wire contract of the index and its operations: training examples by id, the
served index's summary, its hot swap, liveness and readiness (the queries' models are in
``api.models``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.models import Text


class Example(BaseModel):
    """A training example as stored in the index's metadata store."""

    id: int
    text: str
    source: str | None = None
    document_id: str | None = None
    token_start: int | None = Field(None, description="First token offset in the document.")
    token_end: int | None = Field(None, description="End token offset (exclusive).")
    char_start: int | None = None
    char_end: int | None = None


class IndexSummary(BaseModel):
    """What the service is serving: the index manifest, summarized."""

    model: str
    model_hash: str | None = None
    index_version: str
    index_dir: str
    size: int = Field(description="Number of training examples in the index.")
    counts: dict[str, Any] = Field(default_factory=dict)
    fingerprint: dict[str, Any] = Field(
        default_factory=dict, description="Fingerprint config (modules, k, seed, hessian, ...)."
    )
    faiss: str | None = Field(None, description="FAISS factory string of the index.")
    backend: str | None = Field(
        None,
        description="The vector search serving it: local FAISS (CPU or GPU), torch, or a Milvus collection.",
    )
    built_at: str | None = None


class ReloadRequest(BaseModel):
    """Load a newly published index directory (default: the configured one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    index_dir: Text | None = Field(
        None, max_length=4096, description="Index directory; default: the configured."
    )


class ReloadResponse(BaseModel):
    """The outcome of a successful hot swap."""

    index_version: str
    previous_version: str | None
    index_dir: str
    size: int


class Health(BaseModel):
    """Liveness / readiness."""

    status: Literal["ok", "ready"]
    index_version: str | None = None
