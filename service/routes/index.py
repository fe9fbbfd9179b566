"""GET /v1/index (the served index) and POST /v1/admin/reload (its hot swap)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends

from api.errors import ErrorResponse
from api.models import IndexSummary, ReloadRequest, ReloadResponse
from encoder.errors import InfluenceError
from engine.protocols import Index
from service.auth import require_admin, v1_router
from service.deps import MetricsDep, StateDep

router = v1_router()


def summarize(index: Index) -> IndexSummary:
    """What ``index`` says about itself, on the wire."""
    s = index.summary()
    return IndexSummary(model=s.model, model_hash=s.model_hash, index_version=s.index_version,
                        index_dir=str(s.index_dir), size=s.size, counts=s.counts, fingerprint=s.fingerprint,
                        faiss=s.faiss, built_at=s.built_at)  # fmt: skip


@router.get("/index", operation_id="get_index", tags=["index"], summary="Describe the served index",
            response_model=IndexSummary)  # fmt: skip
async def get_index(state: StateDep) -> IndexSummary:
    """Model, example counts, fingerprint configuration and FAISS index type."""
    return summarize(state.current)


@router.post(
    "/admin/reload",
    operation_id="reload_index",
    tags=["admin"],
    summary="Hot-swap to a newly published index",
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses={404: {"model": ErrorResponse, "description": "No such index directory."}},
)
async def reload_index(state: StateDep, metrics: MetricsDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Open the index directory (default: the configured one) and swap it in atomically.
    In-flight queries finish on the old index; a bad index is refused (422) and the old one
    keeps serving. Always requires an API key."""
    target = Path(body.index_dir) if body is not None and body.index_dir else None
    try:
        index, previous = await state.reload(target)
    except InfluenceError:
        metrics.reloads.labels("refused").inc()
        raise
    metrics.reloads.labels("ok").inc()
    return ReloadResponse(index_version=index.version, previous_version=None if previous is None else previous.version,
                          index_dir=str(index.index_dir), size=index.size)  # fmt: skip
