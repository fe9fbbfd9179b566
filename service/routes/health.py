"""Liveness, readiness and metrics (outside /v1, no API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from api.index_models import Health
from service.deps import MetricsDep, StateDep
from service.errors import ERROR_RESPONSES

router = APIRouter()


@router.get("/healthz", operation_id="healthz", tags=["health"], response_model=Health)
async def healthz() -> Health:
    """Liveness: the process is up and serving HTTP."""
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    tags=["health"],
    response_model=Health,
    responses={503: ERROR_RESPONSES[503]},
)
async def readyz(state: StateDep) -> Health:
    """Readiness: the model and the index are loaded (503 until then), and the index's
    files are as they were opened (503 ``index_changed`` after an in-place edit)."""
    index = state.current
    index.check_unchanged()
    return Health(status="ready", index_version=index.version)


@router.get(
    "/metrics",
    operation_id="metrics",
    tags=["health"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics: requests and latency by route and status, queue depth, batch
    sizes, encode and search time."""
    return Response(m.render(), media_type=m.content_type)
