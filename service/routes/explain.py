"""POST /v1/influence/explain: which tokens of a retrieved training example carry its score
(``engine.explain``), run off the event loop, at most ``max_explains`` at a time."""

from __future__ import annotations

import time

from api.error_models import ErrorResponse
from api.explain_models import ExplainRequest, ExplainResponse, TokenContribution
from engine import explain as engine_explain
from engine.query import Limits, Query
from service.auth import v1_router
from service.deps import AdmissionDep, LimitsDep, StateDep
from service.state import IndexState
from service.threads import in_passing_thread

router = v1_router()


def explain(state: IndexState, body: ExplainRequest, limits: Limits) -> ExplainResponse:
    """The explanation of ``body`` on a lease of the served index (blocking: torch)."""
    started = time.perf_counter()
    span = None if body.span is None else (body.span.start, body.span.end)
    with state.lease() as index:
        e = engine_explain.explain(
            index, Query(body.prompt, body.completion, 1, span=span), body.id, limits, body.exact
        )
        model, version = index.summary().model, index.version
    return ExplainResponse(
        id=e.id,
        score=e.score,
        index_score=e.index_score,
        fingerprint_agreement=e.agreement,
        exact=e.exact,
        tokens=[
            TokenContribution(text=t.text, start=t.start, end=t.end, contribution=t.contribution)
            for t in e.tokens
        ],
        model=model,
        index_version=version,
        timings_ms={"total": (time.perf_counter() - started) * 1e3},
    )


@router.post(
    "/influence/explain",
    operation_id="explain_influence",
    tags=["influence"],
    summary="Split one result's score over the training example's tokens",
    response_model=ExplainResponse,
    responses={404: {"model": ErrorResponse, "description": "Unknown example id."}},
)
async def explain_influence(
    body: ExplainRequest, state: StateDep, limits: LimitsDep, admission: AdmissionDep
) -> ExplainResponse:
    """For a query and one training example (a result's `id`), each example token's
    contribution to the influence score: that token's loss term, corrected, projected and
    whitened, dotted with the query fingerprint. The contributions sum to `score`.
    On an idle server one encode pass and one forward-mode pass over the example; while
    queries are flowing, short backward passes that let them run in between."""
    with admission.slot():
        return await in_passing_thread(explain, state, body, limits)
