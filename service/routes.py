"""The v1 routes. Thin: validate (pydantic), hand off to the batcher or the index, format.

Operation ids, tags and descriptions are written for generated clients
(``openapi-python-client`` turns ``query_influence`` into ``query_influence.sync(...)``).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import ValidationError

from api.models import (
    BatchInfluenceRequest,
    BatchInfluenceResponse,
    BatchQueryError,
    ErrorResponse,
    Example,
    Health,
    IndexSummary,
    InfluenceQuery,
    InfluenceResponse,
    InfluenceResult,
    ReloadRequest,
    ReloadResponse,
    Timings,
)
from encoder.errors import InfluenceError, InputError
from encoder.generation import Generation
from service.auth import require_admin, require_key
from service.errors import ERROR_RESPONSES, error_body, validation_error_body
from service.search import Outcome, Query, model_name, traced_fields

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)
ops = APIRouter()

INT64_MAX = 2**63 - 1


def _query(q: InfluenceQuery, default_rescore: int = 0) -> Query:
    rescore = 0 if q.mode != "influence" else (q.rescore if q.rescore is not None else default_rescore)
    generate = None if q.generate is None else Generation(q.generate.max_new_tokens, q.generate.temperature, q.generate.seed)
    span = None if q.span is None else (q.span.start, q.span.end)
    return Query(q.prompt, q.completion, q.k, source=q.source, min_score=q.min_score, mode=q.mode, rescore=rescore,
                 generate=generate, span=span)  # fmt: skip


def _response(q: InfluenceQuery, outcome: Outcome, started: float) -> InfluenceResponse:
    if outcome.error is not None:
        raise outcome.error
    results = []
    for rank, hit in enumerate(outcome.hits, start=1):
        text = hit.record.text if q.return_text else None
        if text is not None and q.max_text_chars is not None:
            text = text[: q.max_text_chars]
        results.append(
            InfluenceResult(
                rank=rank,
                id=hit.id,
                score=hit.score,
                score_sd=hit.score_sd,
                text=text,
                source=hit.record.source,
                document_id=_str_or_none(hit.record.document_id),
            )
        )
    return InfluenceResponse(
        results=results,
        **traced_fields(outcome.traced),
        model=outcome.model,
        index_version=outcome.index_version,
        timings_ms=Timings(
            encode=outcome.encode_ms,
            search=outcome.search_ms,
            total=(time.perf_counter() - started) * 1e3,
        ),
    )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


@v1.post(
    "/influence",
    operation_id="query_influence",
    tags=["influence"],
    summary="Find the training examples that most influenced a completion",
    response_model=InfluenceResponse,
)
async def query_influence(body: InfluenceQuery, request: Request) -> InfluenceResponse:
    """Encode (prompt, completion) as a TrackStar fingerprint and return the `k` training
    examples with the highest influence score, best first."""
    started = time.perf_counter()
    (outcome,) = await request.app.state.batcher.submit([_query(body, request.app.state.settings.rescore)])
    return _response(body, outcome, started)


@v1.post(
    "/influence/batch",
    operation_id="query_influence_batch",
    tags=["influence"],
    summary="Run many influence queries in one call",
    response_model=BatchInfluenceResponse,
)
async def query_influence_batch(
    body: BatchInfluenceRequest, request: Request
) -> BatchInfluenceResponse:
    """Answer each query exactly as `POST /v1/influence` would, in request order. A query
    that fails gets `null` in `responses` and an entry in `errors` (its `query_index`, the
    status and error body the single endpoint would have returned); the others are
    answered. Only problems of the call itself (too many queries, auth, overload) fail it."""
    started = time.perf_counter()
    limit = request.app.state.settings.batch_query_limit
    if len(body.queries) > limit:
        raise InputError(
            f"{len(body.queries)} queries in one call, the limit is {limit}",
            code="too_many_queries",
            field="queries",
            limit=limit,
        )
    parsed: dict[int, InfluenceQuery] = {}
    errors: dict[int, BatchQueryError] = {}
    for i, item in enumerate(body.queries):
        try:
            parsed[i] = InfluenceQuery.model_validate(item)
        except ValidationError as exc:
            errors[i] = BatchQueryError(query_index=i, status=422, error=validation_error_body(exc.errors()))
    default_rescore = request.app.state.settings.rescore
    outcomes = await request.app.state.batcher.submit([_query(q, default_rescore) for q in parsed.values()]) if parsed else []
    responses: dict[int, InfluenceResponse] = {}
    for (i, q), outcome in zip(parsed.items(), outcomes, strict=True):
        if outcome.error is None:
            responses[i] = _response(q, outcome, started)
        else:
            exc = outcome.error
            errors[i] = BatchQueryError(query_index=i, status=exc.http_status,
                                        error=error_body(exc.code, exc.message, exc.details))  # fmt: skip
    return BatchInfluenceResponse(responses=[responses.get(i) for i in range(len(body.queries))],
                                  errors=[errors[i] for i in sorted(errors)])  # fmt: skip


@v1.get(
    "/examples/{example_id}",
    operation_id="get_example",
    tags=["examples"],
    summary="Get one training example by id",
    response_model=Example,
    responses={404: {"model": ErrorResponse, "description": "Unknown example id."}},
)
async def get_example(
    request: Request,
    example_id: int = Path(ge=0, le=INT64_MAX, description="Training example id."),
) -> Example:
    """The stored training sequence with its source, document id and offsets."""
    state = request.app.state.index_state

    def fetch():
        with state.lease() as index:
            return index.example(example_id)

    record = await asyncio.get_running_loop().run_in_executor(None, fetch)
    return Example(
        id=int(record.id),
        text=record.text,
        source=record.source,
        document_id=_str_or_none(record.document_id),
        token_start=record.token_start,
        token_end=record.token_end,
        char_start=record.char_start,
        char_end=record.char_end,
    )


def summarize(index) -> IndexSummary:
    """The manifest of ``index`` as an ``IndexSummary``."""
    manifest = index.manifest
    model = manifest.get("model")
    fingerprint = manifest.get("fingerprint") or manifest.get("fingerprint_config") or {}
    faiss = manifest.get("faiss")
    factory = faiss.get("factory") if isinstance(faiss, dict) else faiss
    factory = factory or manifest.get("faiss_factory")
    return IndexSummary(
        model=model_name(manifest),
        model_hash=(model.get("hash") if isinstance(model, dict) else None)
        or manifest.get("model_hash"),
        index_version=str(index.version),
        index_dir=str(index.index_dir),
        size=int(index.size),
        counts=manifest.get("counts") or {"examples": int(index.size)},
        fingerprint=fingerprint if isinstance(fingerprint, dict) else {},
        faiss=None if factory is None else str(factory),
        built_at=_str_or_none(manifest.get("created_at") or manifest.get("built_at")),
    )


@v1.get(
    "/index",
    operation_id="get_index",
    tags=["index"],
    summary="Describe the served index",
    response_model=IndexSummary,
)
async def get_index(request: Request) -> IndexSummary:
    """Model, example counts, fingerprint configuration and FAISS index type."""
    return summarize(request.app.state.index_state.current)


@v1.post(
    "/admin/reload",
    operation_id="reload_index",
    tags=["admin"],
    summary="Hot-swap to a newly published index",
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses={404: {"model": ErrorResponse, "description": "No such index directory."}},
)
async def reload_index(request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    """Open the index directory (default: the configured one) and swap it in atomically.
    In-flight queries finish on the old index; a bad index is refused (422) and the old one
    keeps serving. Always requires an API key."""
    state = request.app.state.index_state
    target = body.index_dir if body is not None and body.index_dir else None
    try:
        index, previous = await state.reload(target)
    except InfluenceError:
        request.app.state.metrics.reloads.labels("refused").inc()
        raise
    request.app.state.metrics.reloads.labels("ok").inc()
    return ReloadResponse(
        index_version=str(index.version),
        previous_version=None if previous is None else str(previous.version),
        index_dir=str(index.index_dir),
        size=int(index.size),
    )


@ops.get("/healthz", operation_id="healthz", tags=["health"], response_model=Health)
async def healthz() -> Health:
    """Liveness: the process is up and serving HTTP."""
    return Health(status="ok")


@ops.get(
    "/readyz",
    operation_id="readyz",
    tags=["health"],
    response_model=Health,
    responses={503: ERROR_RESPONSES[503]},
)
async def readyz(request: Request) -> Health:
    """Readiness: the model and the index are loaded (503 until then), and the index's
    files are as they were opened (503 ``index_changed`` after an in-place edit)."""
    index = request.app.state.index_state.current
    index.check_unchanged()
    return Health(status="ready", index_version=str(index.version))


@ops.get(
    "/metrics",
    operation_id="metrics",
    tags=["health"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency by route and status, queue depth, batch
    sizes, encode and search time."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)
