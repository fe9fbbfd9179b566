"""POST /v1/influence/explain: which tokens of a retrieved training example carry its score.

The math is ``encoder.token_attribution`` (the score split over the example's target-token
loss terms). This module takes the example's token ids from the index, runs the
attribution under the index's encode lock (the encoder's hooks live on the shared model, so
two backward passes must not interleave), and formats tokens with character offsets.

The example is run with the token ids it was indexed with (the metadata store's ``tokens``
table); for an index built before that table existed they are re-tokenized from the text.
``fingerprint_agreement`` compares the rebuilt fingerprint with the stored one, so any
difference from the indexed sequence is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request

from api.models import ErrorResponse, ExplainRequest, ExplainResponse, TokenContribution
from encoder.batching import collate, sequence_example
from encoder.errors import InputError, InputTooLongError
from encoder.token_attribution import attribute_tokens
from service.auth import require_key
from service.batcher import OverloadedError
from service.errors import ERROR_RESPONSES
from service.search import Limits, Query, model_name, validate

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)

MAX_EXPLAIN_TOKENS = 512
"""Longest example explained (one encode pass and one forward-mode pass over it)."""

EXPLAIN_CHUNK = 4
"""Target tokens per backward pass of an explanation made while queries are flowing: each
pass holds the model for about one query's encode, which bounds a query's wait for it."""

QUERIES_ACTIVE_S = 1.0
"""An explanation takes the fast path (one forward-mode pass, ~2x a forward over the example,
held at once) unless a query was encoded this recently; then short passes of
``EXPLAIN_CHUNK`` targets, so plain queries stay fast beside it."""

AGREEMENT_WARN = 0.999
"""Below this cosine the rebuilt example is logged as differing from the indexed one."""


@dataclass(frozen=True)
class SequenceTokens:
    """A training sequence's token ids with their character spans in its text."""

    input_ids: list[int]
    spans: list[tuple[int, int]]


def sequence_tokens(tokenizer, record, indexed_ids: list[int] | None = None) -> SequenceTokens:
    """The token ids of an indexed training sequence, with character spans in its text.

    Args:
        tokenizer: the index's tokenizer.
        record: an ``ExampleRecord`` (text, token_start, token_end).
        indexed_ids: the ids the sequence was indexed with (the metadata store's ``tokens``
            table); None for an index built before it: the ids are then re-tokenized from
            the text, plus the EOS the chunker appends to a document's last window (a token
            count one above the text's).
    Returns:
        ids and [start, end) character spans; an appended EOS token spans (len, len). When
        the indexed ids differ from the text's tokenization (a window cut inside a word),
        the ids are the indexed ones and the spans come from decoding growing prefixes.
    """
    text = record.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    spans = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    n_indexed = int(record.token_end) - int(record.token_start)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and n_indexed == len(ids) + 1:
        ids.append(int(eos))
        spans.append((len(text), len(text)))
    if indexed_ids is not None and list(indexed_ids) != ids:
        ids = [int(i) for i in indexed_ids]
        ends = [min(len(text), len(tokenizer.decode(ids[: i + 1]))) for i in range(len(ids))]
        spans = [(min(a, b), b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    if len(ids) < 2:
        raise InputError(f"example {record.id} has fewer than 2 tokens: nothing to attribute")
    return SequenceTokens(ids, spans)


def explain(index, body: ExplainRequest, limits: Limits) -> ExplainResponse:
    """Attribute the score of (query, example ``body.id``) to the example's tokens.

    Blocking (torch); call it off the event loop.

    Args:
        index: an ``InfluenceIndex`` (leased).
        body: the request.
        limits: the service's token limits (the query is validated like a search).
    Returns:
        The response; contributions sum to ``score``.
    Raises:
        InputError / InputTooLongError: a bad query. NotFoundError: unknown id.
    """
    started = time.perf_counter()
    span = None if body.span is None else (body.span.start, body.span.end)
    query = validate(index.tokenizer, Query(body.prompt, body.completion, 1, span=span), limits,
                     getattr(index, "max_tokens", None)).example  # fmt: skip
    record = index.example(body.id)
    token_ids = getattr(index, "token_ids", None)
    seq = sequence_tokens(index.tokenizer, record, token_ids(body.id) if token_ids is not None else None)
    if len(seq.input_ids) > MAX_EXPLAIN_TOKENS:
        raise InputTooLongError(
            f"example {record.id} has {len(seq.input_ids)} tokens; per-token explanations are "
            f"limited to {MAX_EXPLAIN_TOKENS}",
            field="id",
            n_tokens=len(seq.input_ids),
            limit=MAX_EXPLAIN_TOKENS,
        )
    encoder = index.encoder
    lock = getattr(index, "encode_lock", None) or contextlib.nullcontext()
    with lock:
        e_q = encoder.encode(collate([query], int(index.tokenizer.pad_token_id or 0)))[0]
    # The model is taken per pass, not for the whole explanation: queries run in between,
    # in the order they asked.
    busy = time.monotonic() - index.last_query_at < QUERIES_ACTIVE_S
    attribution = attribute_tokens(encoder, sequence_example(seq.input_ids), e_q, chunk=EXPLAIN_CHUNK,
                                   hold=lambda: lock, method="copies" if busy else "jvp")  # fmt: skip
    stored = torch.from_numpy(np.asarray(index.fingerprints[body.id], dtype=np.float64))
    rebuilt = attribution.fingerprint.double()
    agreement = float(stored @ rebuilt / (stored.norm() * rebuilt.norm()).clamp_min(1e-30))
    if agreement < AGREEMENT_WARN:
        log.warning("example %d: rebuilt fingerprint agrees with the stored one at cosine %.4f",
                    body.id, agreement)
    tokens = [
        TokenContribution(
            text=record.text[s:e] if e > s else index.tokenizer.decode([tok]),
            start=s,
            end=e,
            contribution=float(c),
        )
        for tok, (s, e), c in zip(seq.input_ids, seq.spans, attribution.contributions.tolist(), strict=True)
    ]
    return ExplainResponse(
        id=int(record.id),
        score=attribution.score,
        index_score=float(stored @ e_q.double().cpu()),
        fingerprint_agreement=agreement,
        tokens=tokens,
        model=model_name(index.manifest),
        index_version=str(index.version),
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
async def explain_influence(body: ExplainRequest, request: Request) -> ExplainResponse:
    """For a query and one training example (a result's `id`), each example token's
    contribution to the influence score: that token's loss term, corrected, projected and
    whitened, dotted with the query fingerprint. The contributions sum to `score`.
    On an idle server one encode pass and one forward-mode pass over the example; while
    queries are flowing, short backward passes that let them run in between."""
    settings = request.app.state.settings
    limits = Limits.of(settings)
    state = request.app.state.index_state

    def run() -> ExplainResponse:
        with state.lease() as index:
            return explain(index, body, limits)

    with request.app.state.explain_admission.slot():
        return await asyncio.get_running_loop().run_in_executor(None, run)


class Admission:
    """At most ``limit`` explanations in flight; the next is refused at once (503 +
    Retry-After) rather than queued behind minutes of backward passes. Used from the
    event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise OverloadedError(
                f"{self.active} explanations are running (limit {self.limit}); retry later",
                code="explain_overloaded",
                limit=self.limit,
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
