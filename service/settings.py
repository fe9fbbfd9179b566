"""Service settings: the only place the service reads the environment.

Every field can be set by an ``INFLUENCE_<FIELD>`` environment variable (lists as
comma-separated strings, e.g. ``INFLUENCE_API_KEYS=k1,k2``) or by ``influence serve`` flags,
which take precedence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.models import MAX_NEW_TOKENS, MAX_RESCORE
from engine.choices import Placement

CSV_FIELDS = ("api_keys", "admin_keys", "cors_origins")
"""List settings written as comma-separated text in the environment (``INFLUENCE_API_KEYS=a,b``)."""


class Settings(BaseSettings):
    """Typed service configuration.

    Batching (DESIGN.md: bounded queue, bounded wait, bounded batch): a query waits at most
    ``max_wait_ms`` for others to share its encode pass, a pass holds at most
    ``max_batch_size`` queries, and at most ``max_queue`` queries wait; beyond that the
    service answers 503 with ``Retry-After: retry_after_s``.
    """

    model_config = SettingsConfigDict(env_prefix="INFLUENCE_", extra="ignore")

    index_dir: Path | None = Field(None, description="Published index directory to serve.")
    model_dir: Path | None = Field(None, description="Override the manifest's model directory.")
    device: str | None = Field(None, description="torch device for query encoding; default auto.")
    verify_index: bool = Field(True, description="Verify artifact checksums when loading.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes (uvicorn workers), each with its own model and index.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch/FAISS CPU threads per process; default: cores / workers."
    )
    search_placement: Placement = Field(
        "auto",
        description="Where search runs: auto (FAISS on the GPU when the model is on CUDA and faiss-gpu "
        "is present), cpu, gpu / shards (FAISS on one GPU / over all GPUs, needs faiss-gpu), torch "
        "(exact brute force with torch over all GPUs, else the CPU).",
    )
    milvus_uri: str | None = Field(
        None,
        description="Search through a Milvus collection (`influence index push`) at this pymilvus URI "
        "(`http://host:19530`) instead of the local FAISS index; model, encoder, metadata stay local.",
    )
    milvus_collection: str | None = Field(
        None, description="The Milvus collection; default `influence_<index version>`."
    )
    milvus_timeout_s: float = Field(
        10.0, gt=0, description="Per-call Milvus timeout; beyond it, 503."
    )
    nprobe: int = Field(16, ge=1, description="IVF indexes: lists visited per query.")
    ef_search: int = Field(128, ge=1, description="HNSW indexes: search beam width.")
    rerank_candidates: int | None = Field(
        None,
        ge=0,
        description="Approximate indexes: hits re-ranked exactly per query (default 10 x k; 0: no re-rank).",
    )
    rescore: int | None = Field(
        None,
        ge=0,
        le=MAX_RESCORE,
        description="Default of the request's `rescore` (exact second stage over the top max(rescore, k) "
        "candidates, a certified stop before); 0 = off. Unset: the index's default (on for an "
        "index without a projected R: the default sketch index's top-10 then does not depend on "
        "the projection seed), 0 for one with R.",
    )
    max_batch_size: int = Field(16, ge=1, description="Queries per encode pass.")
    max_wait_ms: float = Field(
        15.0,
        ge=0,
        description="At most how long a query waits for batch mates; it waits only while fewer have gathered than there are clients likely to be active, so a lone client never waits.",
    )
    max_queue: int = Field(256, ge=1, description="Queries waiting; beyond this, 503.")
    max_batch_queries: int = Field(
        64, ge=1, description="Queries per /v1/influence/batch call (at most max_queue)."
    )
    max_explains: int = Field(
        2, ge=1, description="Explanations running at once; beyond this, 503."
    )
    request_timeout_s: float = Field(60.0, gt=0, description="Queue + compute time per request.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds on 503.")

    max_body_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Largest request body accepted (413 request_too_large beyond); the gateway's default too.",
    )
    max_prompt_tokens: int = Field(512, ge=1)
    max_completion_tokens: int = Field(256, ge=1)
    max_new_tokens: int = Field(
        64,
        ge=1,
        le=MAX_NEW_TOKENS,
        description="The most tokens a generate-and-trace query may ask the model for (413 beyond).",
    )

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False, description="Accepted API keys; empty: auth off."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Keys for the admin endpoints (reload), apart from api_keys; empty: admin off "
        "(SIGHUP still reloads the configured index).",
    )
    reload_root: Path | None = Field(
        None,
        description="Directory under which an admin reload may open an index; unset: only the "
        "configured index_dir.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str | None) -> str | None:
        from api.errors import ConfigError
        from encoder.model_loading import resolve_device  # torch: only when a device is named

        if value is not None:
            try:
                resolve_device(value)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator(*CSV_FIELDS, mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def batch_query_limit(self) -> int:
        """Queries one batch call may hold: ``max_batch_queries``, and never more than the
        queue admits (a larger batch would get 503 forever, even on an idle server)."""
        return min(self.max_batch_queries, self.max_queue)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
