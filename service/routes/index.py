"""GET /v1/index (the served index) and POST /v1/admin/reload (its hot swap)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends

from api.error_models import ErrorResponse
from api.errors import ForbiddenError, InfluenceError, InputError, safe_text
from api.index_models import IndexSummary, ReloadRequest, ReloadResponse
from engine.protocols import Index
from service.auth import require_admin, v1_router
from service.deps import MetricsDep, SettingsDep, StateDep
from service.errors import ERROR_RESPONSES
from service.settings import Settings

router = v1_router()
admin = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)], responses=ERROR_RESPONSES)
"""The admin routes: an admin key, never a query key (``service.auth``)."""


def summarize(index: Index) -> IndexSummary:
    """What ``index`` says about itself, on the wire."""
    s = index.summary()
    return IndexSummary(
        model=s.model,
        model_hash=s.model_hash,
        index_version=s.index_version,
        index_dir=str(s.index_dir),
        size=s.size,
        counts=s.counts,
        fingerprint=s.fingerprint,
        faiss=s.faiss,
        built_at=s.built_at,
        backend=s.backend,
    )


@router.get(
    "/index",
    operation_id="get_index",
    tags=["index"],
    summary="Describe the served index",
    response_model=IndexSummary,
)
async def get_index(state: StateDep) -> IndexSummary:
    """Model, example counts, fingerprint configuration and FAISS index type."""
    return summarize(state.current)


def allowed_target(settings: Settings, requested: str | None) -> Path | None:
    """The directory a reload may open: ``requested`` resolved (symlinks and ``..`` followed),
    if it is the configured index or lies under ``settings.reload_root``.

    Raises:
        ForbiddenError: code ``reload_outside_root``.
        InputError: a path the file system cannot name (a NUL byte).
    """
    if not requested:
        return None
    try:
        target = Path(requested).resolve()
        root = settings.reload_root.resolve() if settings.reload_root is not None else None
        configured = settings.index_dir.resolve() if settings.index_dir is not None else None
    except (ValueError, OSError) as exc:
        raise InputError(f"index_dir is not a usable path: {exc}", field="index_dir") from None
    if target == configured or (root is not None and target.is_relative_to(root)):
        return target
    where = f"under {root}" if root is not None else "the configured index (no reload root is set)"
    raise ForbiddenError(
        f"index_dir {safe_text(requested)} is not {where}", code="reload_outside_root"
    )


@admin.post(
    "/admin/reload",
    operation_id="reload_index",
    tags=["admin"],
    summary="Hot-swap to a newly published index",
    response_model=ReloadResponse,
    responses={404: {"model": ErrorResponse, "description": "No such index directory."}},
)
async def reload_index(
    state: StateDep, metrics: MetricsDep, settings: SettingsDep, body: ReloadRequest | None = None
) -> ReloadResponse:
    """Open the index directory (default: the configured one) and swap it in atomically.
    In-flight queries finish on the old index; a bad index is refused (422) and the old one
    keeps serving. Requires an admin key; the directory must lie under the server's
    `reload_root` (unset: only the configured index may be reloaded; 403 `reload_outside_root`)."""
    try:
        target = allowed_target(settings, body.index_dir if body is not None else None)
        index, previous = await state.reload(target)
    except InfluenceError:
        metrics.reloads.labels("refused").inc()
        raise
    metrics.reloads.labels("ok").inc()
    return ReloadResponse(
        index_version=index.version,
        previous_version=None if previous is None else previous.version,
        index_dir=str(index.index_dir),
        size=index.size,
    )
