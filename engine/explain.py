"""Which tokens of a retrieved training example carry its score (the explain endpoint).

The math is ``encoder.token_attribution`` (the score split over the example's target-token
loss terms), run by ``Index.attribute`` under the index's model lock. This module validates
the query like a search, takes the example's indexed token ids, maps them to character
spans of its text, and reports how well the rebuilt fingerprint agrees with the stored one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from api.errors import InputError, InputTooLongError
from encoder.batching import Tokenizer
from engine.protocols import Index, Record
from engine.query import Limits, Query, validate

log = logging.getLogger(__name__)

MAX_EXPLAIN_TOKENS = 512
"""Longest example explained (one encode pass and one forward-mode pass over it)."""

QUERIES_ACTIVE_S = 1.0
"""An explanation takes the fast path (one forward-mode pass over the example, held
at once) unless a query was encoded this recently; then short passes, so plain queries
stay fast beside it."""

AGREEMENT_WARN = 0.999
"""Below this cosine the rebuilt example is logged as differing from the indexed one."""


@dataclass(frozen=True)
class SequenceTokens:
    """A training sequence's token ids with their character spans in its text."""

    input_ids: list[int]
    spans: list[tuple[int, int]]


def sequence_tokens(tokenizer: Tokenizer, record: Record, indexed_ids: list[int]) -> SequenceTokens:
    """The token ids an indexed training sequence was indexed with, and their character
    spans in its text.

    Returns:
        ids and [start, end) character spans: the tokenizer's offsets when the ids are the
        text's own tokenization (plus an appended EOS, spanning (len, len)), else (a window
        cut inside a word) spans from decoding growing prefixes.
    Raises:
        InputError: fewer than 2 tokens (nothing to attribute).
    """
    text = record.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    spans = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    eos = tokenizer.eos_token_id
    if eos is not None and len(indexed_ids) == len(ids) + 1 and int(indexed_ids[-1]) == eos:
        ids.append(int(eos))
        spans.append((len(text), len(text)))
    if list(indexed_ids) != ids:
        ids = [int(i) for i in indexed_ids]
        ends = [min(len(text), len(tokenizer.decode(ids[: i + 1]))) for i in range(len(ids))]
        spans = [(min(a, b), b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    if len(ids) < 2:
        raise InputError(f"example {record.id} has fewer than 2 tokens: nothing to attribute")
    return SequenceTokens(ids, spans)


@dataclass(frozen=True)
class TokenScore:
    """One example token: its text, character span and contribution to the score."""

    text: str
    start: int
    end: int
    contribution: float


@dataclass(frozen=True)
class Explanation:
    """A (query, example) score split over the example's tokens (contributions sum to
    ``score``), with the stored fingerprint's score and its agreement with the rebuilt one."""

    id: int
    score: float
    index_score: float
    agreement: float
    tokens: list[TokenScore]
    exact: bool = False
    """The exact second stage's score is explained (else the first stage's)."""


def explain(
    index: Index, query: Query, id: int, limits: Limits, exact: bool | None = None
) -> Explanation:  # noqa: A002
    """Attribute the score of (``query``, example ``id``) to the example's tokens: the
    score a result shows, the exact second stage's where the index re-scores by default
    (``exact`` None), else the first stage's; ``exact`` picks one.

    Blocking (torch); call it off the event loop.

    Raises:
        InputError / InputTooLongError: a bad query, or an example over
            ``MAX_EXPLAIN_TOKENS``. NotFoundError: unknown id.
    """
    example = validate(index.tokenizer, query, limits, index.max_tokens).example
    record = index.example(id)
    seq = sequence_tokens(index.tokenizer, record, index.token_ids(id))
    if len(seq.input_ids) > MAX_EXPLAIN_TOKENS:
        raise InputTooLongError(
            f"example {record.id} has {len(seq.input_ids)} tokens; per-token explanations are "
            f"limited to {MAX_EXPLAIN_TOKENS}",
            field="id",
            n_tokens=len(seq.input_ids),
            limit=MAX_EXPLAIN_TOKENS,
        )
    exact = index.default_rescore > 0 if exact is None else exact
    attribution = index.attribute(
        example, id, seq.input_ids, busy=index.idle_s < QUERIES_ACTIVE_S, exact=exact
    )
    if attribution.agreement < AGREEMENT_WARN:
        log.warning(
            "example %d: rebuilt fingerprint agrees with the stored one at cosine %.4f",
            id,
            attribution.agreement,
        )
    tokens = [
        TokenScore(record.text[s:e] if e > s else index.tokenizer.decode([tok]), s, e, c)
        for tok, (s, e), c in zip(seq.input_ids, seq.spans, attribution.contributions, strict=True)
    ]
    return Explanation(
        int(record.id),
        attribution.score,
        attribution.index_score,
        attribution.agreement,
        tokens,
        exact,
    )
