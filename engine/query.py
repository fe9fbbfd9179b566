"""What a query asks and what it gets back, and its validation against the token limits.

A ``Query`` is the wire request without its formatting options; ``validate`` tokenizes it
as the encoder will and enforces the per-part limits and the model's context, returning
the ``Traced`` query (for a ``generate`` query after ``generated_completion`` ran the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from api.errors import InfluenceError, InputError, InputTooLongError
from api.models import InfluenceQuery, Mode
from encoder.batching import Example, Tokenizer, tokenize_prompt
from encoder.generation import Generated, Generation, token_spans, traced_example
from engine.certify import DEFAULT_CONFIDENCE, Certificate
from engine.protocols import Index, Record


@dataclass(frozen=True)
class Query:
    """What the search needs from a request (text formatting happens in the route)."""

    prompt: str
    completion: str | None
    k: int
    source: str | None = None
    min_score: float | None = None
    mode: Mode = "influence"
    rescore: int | None = None
    """Exact second stage over at most the top max(rescore, k); None: the index's
    ``default_rescore``. It stops earlier once its top-k is certified (``engine.certify``)."""
    confidence: float = DEFAULT_CONFIDENCE
    """The confidence the second stage's certificate is given at."""
    generate: Generation | None = None
    """Generate and trace: the model writes the completion (``completion`` is None)."""
    span: tuple[int, int] | None = None
    """Trace only the completion tokens overlapping this character range."""

    @classmethod
    def from_wire(cls, q: InfluenceQuery, default_rescore: int | None = None) -> Query:
        """The engine's query for a validated wire query (the REST body's, and
        ``influence query``'s, which builds the same model). ``rescore`` applies only to
        ``influence``; None: ``default_rescore``, else the index's ``default_rescore``."""
        rescore = (
            0
            if q.mode != "influence"
            else (q.rescore if q.rescore is not None else default_rescore)
        )
        g = q.generate
        return cls(
            q.prompt,
            q.completion,
            q.k,
            source=q.source,
            min_score=q.min_score,
            mode=q.mode,
            rescore=rescore,
            generate=None if g is None else Generation(g.max_new_tokens, g.temperature, g.seed),
            span=None if q.span is None else (q.span.start, q.span.end),
            confidence=q.confidence,
        )


Abandoned = Callable[[], bool]
"""True once a query's client has given up (its request timed out): work on it stops at
the next chunk boundary."""


def never() -> bool:
    """An ``Abandoned`` for queries nobody abandons (the CLI, the evaluation)."""
    return False


@dataclass(frozen=True)
class Limits:
    """Token limits per query (413 beyond them)."""

    max_prompt_tokens: int
    max_completion_tokens: int
    max_new_tokens: int = 64


@dataclass
class Hit:
    """A result: example id, influence score, its metadata record and, where the model of it
    holds, the score's standard deviation under another projection."""

    id: int
    score: float
    record: Record
    score_sd: float | None = None


@dataclass(frozen=True)
class Traced:
    """What a query traces: the tokenized query, the completion's text (generated or
    given), the character range of it whose tokens are targets, and how it was generated."""

    example: Example
    completion: str
    span: tuple[int, int]
    generated: Generated | None = None

    @property
    def text(self) -> str:
        """The traced characters of the completion."""
        return self.completion[self.span[0] : self.span[1]]


@dataclass
class Outcome:
    """One query's result, or its error, plus the index and batch timings it ran with."""

    hits: list[Hit] = field(default_factory=list)
    error: InfluenceError | None = None
    model: str = ""
    index_version: str = ""
    encode_ms: float = 0.0
    search_ms: float = 0.0
    rescore_ms: float = 0.0
    """This query's own exact second stage (not shared with its batch)."""
    batch_size: int = 0
    traced: Traced | None = None
    certificate: Certificate | None = None
    """How its exact second stage ended (None without one)."""


def traced_fields(traced: Traced | None) -> dict[str, Any]:
    """What a query traced, as the response fields ``completion``, ``span`` and
    ``generation`` (the REST response's and ``influence query --json``'s)."""
    if traced is None:
        return {"completion": None, "span": None, "generation": None}
    g, (start, end) = traced.generated, traced.span
    return {
        "completion": traced.completion,
        "span": {"start": start, "end": end} if end > start else None,
        "generation": None
        if g is None
        else {"n_tokens": len(g.ids), "finish_reason": g.finish_reason, "seed": g.seed},
    }


def certificate_fields(certificate: Certificate | None) -> dict[str, Any] | None:
    """How a query's exact second stage ended, as the response field ``rescore`` (the REST
    response's and ``influence query --json``'s); None without one."""
    c = certificate
    if c is None:
        return None
    return {
        "candidates": c.rescored,
        "certified": c.certified,
        "confidence": c.confidence,
        "miss_probability": c.miss_probability,
    }


def _check_length(part: str, n: int, limit: int) -> None:
    if n > limit:
        raise InputTooLongError(
            f"the {part} is {n} tokens, the limit is {limit}", field=part, n_tokens=n, limit=limit
        )


def validate(
    tokenizer: Tokenizer,
    query: Query,
    limits: Limits,
    context: int | None = None,
    generated: Generated | None = None,
) -> Traced:
    """Tokenize as the encoder will and enforce the per-part token limits and the model's
    context length ``context`` (total tokens). ``generated``: the completion's tokens as
    the model generated them (a ``generate`` query), traced as they are.

    Raises:
        InputError: empty completion / empty prompt without BOS / a span outside the
            completion (422).
        InputTooLongError: prompt or completion over its limit (413).
    """
    if generated is not None:  # its prompt was tokenized and checked before generating
        prompt_ids = list(generated.prompt_ids)
        completion_ids = list(generated.ids)
        completion = tokenizer.decode(completion_ids, clean_up_tokenization_spaces=False)
    else:
        prompt_ids = tokenize_prompt(tokenizer, query.prompt)
        _check_length("prompt", len(prompt_ids), limits.max_prompt_tokens)
        completion = query.completion or ""
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if not completion_ids:
            raise InputError(
                "the completion is empty: nothing to attribute", code="empty_completion"
            )
    _check_length("completion", len(completion_ids), limits.max_completion_tokens)
    n = len(prompt_ids) + len(completion_ids)
    if context is not None and n > context:
        raise InputTooLongError(
            f"prompt + completion is {n} tokens, the model's context is {context}",
            field="completion",
            n_tokens=n,
            limit=context,
        )
    spans = token_spans(tokenizer, completion, completion_ids) if query.span is not None else []
    example, snapped = traced_example(prompt_ids, completion_ids, spans, query.span)
    return Traced(
        example, completion, snapped if query.span is not None else (0, len(completion)), generated
    )


def generated_completion(index: Index, query: Query, limits: Limits) -> Generated:
    """The model's continuation for a ``generate`` query, within the token limits: at most
    ``max_new_tokens`` (413 beyond the server's bound), the completion limit and the room
    the prompt leaves in the model's context."""
    if query.generate is None:
        raise InputError("the query asks for no generation", field="generate")
    asked, context = query.generate.max_new_tokens, index.max_tokens
    if asked > limits.max_new_tokens:
        raise InputTooLongError(
            f"generate.max_new_tokens is {asked}, the limit is {limits.max_new_tokens}",
            field="generate.max_new_tokens",
            n_tokens=asked,
            limit=limits.max_new_tokens,
        )
    prompt_ids = tokenize_prompt(index.tokenizer, query.prompt)
    _check_length("prompt", len(prompt_ids), limits.max_prompt_tokens)
    room = min(
        asked, limits.max_completion_tokens, (context or asked + len(prompt_ids)) - len(prompt_ids)
    )
    if room < 1:
        raise InputTooLongError(
            f"the prompt is {len(prompt_ids)} tokens and fills the model's context "
            f"({context}): no room to generate",
            field="prompt",
            n_tokens=len(prompt_ids),
            limit=context,
        )
    generated = index.generate(prompt_ids, replace(query.generate, max_new_tokens=room))
    if not generated.ids:
        raise InputError(
            "the model ended its generation at once (end-of-sequence token): nothing to trace",
            code="empty_generation",
            field="generate",
        )
    return generated


def trace(index: Index, query: Query, limits: Limits) -> Traced:
    """``validate`` a query against ``index``, generating its completion first if it asks."""
    generated = generated_completion(index, query, limits) if query.generate is not None else None
    return validate(index.tokenizer, query, limits, index.max_tokens, generated)
