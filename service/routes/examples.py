"""GET /v1/examples/{id}: one training example."""

from __future__ import annotations

import asyncio

from fastapi import Path

from api.error_models import ErrorResponse
from api.index_models import Example
from engine.protocols import Record
from service.auth import v1_router
from service.deps import StateDep
from service.routes.influence import str_or_none

router = v1_router()

INT64_MAX = 2**63 - 1


@router.get(
    "/examples/{example_id}",
    operation_id="get_example",
    tags=["examples"],
    summary="Get one training example by id",
    response_model=Example,
    responses={404: {"model": ErrorResponse, "description": "Unknown example id."}},
)
async def get_example(
    state: StateDep, example_id: int = Path(ge=0, le=INT64_MAX, description="Training example id.")
) -> Example:
    """The stored training sequence with its source, document id and offsets."""

    def fetch() -> Record:
        with state.lease() as index:
            return index.example(example_id)

    record = await asyncio.get_running_loop().run_in_executor(None, fetch)
    return Example(
        id=int(record.id),
        text=record.text,
        source=record.source,
        document_id=str_or_none(record.document_id),
        token_start=record.token_start,
        token_end=record.token_end,
        char_start=record.char_start,
        char_end=record.char_end,
    )
