"""POST /v1/influence and /v1/influence/batch: the most influential training examples."""

from __future__ import annotations

import time

from pydantic import ValidationError

from api.errors import InputError
from api.models import (
    BatchInfluenceRequest,
    BatchInfluenceResponse,
    BatchQueryError,
    InfluenceQuery,
    InfluenceResponse,
    InfluenceResult,
    RescoreReport,
    Timings,
)
from engine.query import Outcome, Query, certificate_fields, traced_fields
from engine.retrieval import method_of
from service.auth import v1_router
from service.deps import BatcherDep, SettingsDep
from service.errors import error_body, validation_error_body

router = v1_router()


def as_response(q: InfluenceQuery, outcome: Outcome, started: float) -> InfluenceResponse:
    """The wire response of an answered query (raises its error)."""
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
                document_id=str_or_none(hit.record.document_id),
            )
        )
    report = certificate_fields(outcome.certificate)
    rescore = None if report is None else RescoreReport(**report)
    total = (time.perf_counter() - started) * 1e3
    return InfluenceResponse(
        results=results,
        **traced_fields(outcome.traced),
        rescore=rescore,
        method=method_of(q.mode),
        model=outcome.model,
        index_version=outcome.index_version,
        timings_ms=Timings(
            encode=outcome.encode_ms,
            search=outcome.search_ms,
            rescore=outcome.rescore_ms,
            total=total,
        ),
    )


def str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


@router.post(
    "/influence",
    operation_id="query_influence",
    tags=["influence"],
    summary="Find the training examples that most influenced a completion",
    response_model=InfluenceResponse,
)
async def query_influence(
    body: InfluenceQuery, batcher: BatcherDep, settings: SettingsDep
) -> InfluenceResponse:
    """Encode (prompt, completion) as a TrackStar fingerprint and return the `k` training
    examples with the highest influence score, best first."""
    started = time.perf_counter()
    (outcome,) = await batcher.submit([Query.from_wire(body, settings.rescore)])
    return as_response(body, outcome, started)


@router.post(
    "/influence/batch",
    operation_id="query_influence_batch",
    tags=["influence"],
    summary="Run many influence queries in one call",
    response_model=BatchInfluenceResponse,
)
async def query_influence_batch(
    body: BatchInfluenceRequest, batcher: BatcherDep, settings: SettingsDep
) -> BatchInfluenceResponse:
    """Answer each query exactly as `POST /v1/influence` would, in request order. A query
    that fails gets `null` in `responses` and an entry in `errors` (its `query_index`, the
    status and error body the single endpoint would have returned); the others are
    answered. Only problems of the call itself (too many queries, auth, overload) fail it."""
    started = time.perf_counter()
    limit = settings.batch_query_limit
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
            errors[i] = BatchQueryError(
                query_index=i, status=422, error=validation_error_body(exc.errors())
            )
    queries = [Query.from_wire(q, settings.rescore) for q in parsed.values()]
    outcomes = await batcher.submit(queries) if queries else []
    responses: dict[int, InfluenceResponse] = {}
    for (i, q), outcome in zip(parsed.items(), outcomes, strict=True):
        if outcome.error is None:
            responses[i] = as_response(q, outcome, started)
        else:
            err = outcome.error
            errors[i] = BatchQueryError(
                query_index=i,
                status=err.http_status,
                error=error_body(err.code, err.message, err.details),
            )
    return BatchInfluenceResponse(
        responses=[responses.get(i) for i in range(len(body.queries))],
        errors=[errors[i] for i in sorted(errors)],
    )
