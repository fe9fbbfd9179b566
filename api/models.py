"""The v1 wire contract: pydantic request and response models (DESIGN.md, "Service contract").

These models are shared by the service and by Python clients; ``api/openapi.json`` is
exported from the app built on them (``influence openapi``). Field descriptions and
examples end up in generated clients, so they are written for the people reading those.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from api.error_models import ErrorBody

MAX_K = 1000
"""The largest ``k`` a query may ask for."""
MAX_RESCORE = 1000
"""The most candidates one query may re-score exactly (one backward pass each)."""

MAX_NEW_TOKENS = 1024
"""The most tokens a ``generate`` query may ask for; the server's ``max_new_tokens``
setting (413 beyond it) is the real bound."""

MAX_TEXT_FIELD_CHARS = 100_000
"""A character cap on prompt and completion, checked before tokenization; the token limits
(413) are the real bound and are set by the server's settings."""


def _integral_float(value: object) -> object:
    # JSON Schema's "integer" includes 5.0 (a number with a zero fractional part); strict
    # mode alone would refuse it, so every integer field accepts it the same way.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_integral_float)]
"""An integer field: a JSON integer, or a number with no fractional part (``5.0`` is 5)."""


def _unicode_text(value: str) -> str:
    # JSON can spell a lone surrogate ("\ud800"), which is no Unicode text: no tokenizer,
    # path or UTF-8 encoder takes it. Refused here, once, for every text field of a request.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start} is not text"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]
"""A request text field: any Unicode string (lone surrogates refused with 422)."""

COMPLETION_OR_GENERATE = "completion_or_generate"
"""The error type of a query with both or neither of ``completion`` and ``generate``; its
field is reported as ``completion``."""

EXAMPLE_QUERY: dict[str, JsonValue] = {
    "prompt": "The capital of Drosora is",
    "completion": " Mutu.",
    "k": 5,
}


Mode = Literal["influence", "attribution", "bm25", "hybrid"]
"""What a query asks: ``influence`` (which training examples moved the model toward this
output) or ``attribution`` (which passages state it), each answered by the method the
evaluation picks for it; or one retrieval method by name (``bm25``, ``hybrid``). The engine
dispatches on these (``engine.retrieval``)."""

AnswerMethod = Literal["gradient", "bm25", "hybrid"]
"""The method that answered a query (``InfluenceResponse.method``)."""


class GenerateOptions(BaseModel):
    """Let the model write the completion, then trace it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: WholeNumber = Field(
        ge=1,
        le=MAX_NEW_TOKENS,
        description="At most this many tokens; generation also stops at the end-of-sequence token "
        "(which is not traced). Bounded by the server's `max_new_tokens` setting (413 beyond).",
        examples=[16],
    )
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="0 (the default) decodes greedily: the model's most likely continuation. "
        "Above 0 samples at this temperature from the full distribution.",
    )
    seed: Annotated[int, Field(ge=0, le=2**32 - 1), BeforeValidator(_integral_float)] | None = (
        Field(
            None,
            description="Seed of the sampling generator (temperature > 0); null = a fresh one, "
            "reported in the response's `generation.seed`.",
        )
    )


class Span(BaseModel):
    """A character range [start, end) of the completion: `end` must be greater than `start`
    (422 otherwise; a rule JSON Schema cannot state)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    start: WholeNumber = Field(
        ge=0, le=MAX_TEXT_FIELD_CHARS, description="First character (0-based)."
    )
    end: WholeNumber = Field(
        ge=1, le=MAX_TEXT_FIELD_CHARS, description="End character (exclusive)."
    )

    @model_validator(mode="after")
    def _non_empty(self) -> Span:
        if self.end <= self.start:
            raise ValueError(f"span end {self.end} must be greater than its start {self.start}")
        return self


COMPLETION_XOR_GENERATE: dict[str, JsonValue] = {
    "if": {"properties": {"completion": {"type": "string"}}, "required": ["completion"]},
    "then": {"properties": {"generate": {"type": "null"}}},
    "else": {"properties": {"generate": {"type": "object"}}, "required": ["generate"]},
}
"""Exactly one of a ``completion`` string and a ``generate`` object (the other absent or
null), in JSON Schema: the rule ``InfluenceQuery._one_completion`` enforces. Said with
if/then/else rather than a top-level oneOf, which client generators turn into a union of
two query classes."""


class InfluenceQuery(BaseModel):
    """One influence query: which training examples made the model say ``completion``
    after ``prompt``? Give the completion, or ask the model to ``generate`` it.

    Rules no JSON Schema can state, answered 422 or 413 with their own codes: a `span`'s
    `end` must be greater than its `start` and its `start` must lie within the completion
    (which may be generated); prompt and completion must fit the server's token limits
    (`x-max-tokens`) and, together, the model's context."""

    # strict: `false` is not a score and `"5"` is not a k (no silent coercion).
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [EXAMPLE_QUERY], **COMPLETION_XOR_GENERATE},
    )

    prompt: Text = Field(
        max_length=MAX_TEXT_FIELD_CHARS,
        description="Context given to the model. Its tokens are not attributed.",
        examples=["The capital of Drosora is"],
    )
    completion: Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_FIELD_CHARS)] | None = (
        Field(
            None,
            description="The model output to explain; only its tokens carry loss. Required unless "
            "`generate` is given (then it must be absent).",
            examples=[" Mutu."],
        )
    )
    generate: GenerateOptions | None = Field(
        None,
        description="Generate and trace: the model continues the prompt (greedy by default) and "
        "its own tokens are traced; the response carries the generated `completion`.",
    )
    span: Span | None = Field(
        None,
        description="Trace only the completion tokens overlapping this character range of the "
        "completion (given or generated), e.g. the one fact in a longer generation: earlier "
        "completion tokens become context, later ones are dropped. An `end` past the completion's "
        "end means to its end; 422 `invalid_span` when `start` is not within the completion.",
    )
    k: WholeNumber = Field(
        10, ge=1, le=MAX_K, description="Number of results to return (5.0 counts as 5)."
    )
    return_text: bool = Field(True, description="Include each training example's text.")
    max_text_chars: Annotated[int, Field(ge=0), BeforeValidator(_integral_float)] | None = Field(
        None, description="Truncate returned texts to this many characters."
    )
    min_score: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="Drop results whose influence score is below this.",
    )
    source: Text | None = Field(
        None, max_length=1000, description="Only return training examples from this source."
    )
    mode: Mode = Field(
        "influence",
        description="The question asked. `influence`: which training examples moved the model "
        "toward this output, answered by gradient search (TrackStar: cosines in [-1, 1], with the "
        "exact second stage). `attribution`: which passages state it, answered by the method the "
        "evaluation picks for that question (the response's `method` names it). Or one method "
        "by name: `bm25` is lexical BM25 over the training texts with query = prompt + "
        "completion (scores are BM25 scores); `hybrid` fuses BM25 and gradient rankings by "
        "reciprocal rank (scores are RRF scores, sum of 1/(60 + rank)).",
    )
    rescore: (
        Annotated[int, Field(ge=0, le=MAX_RESCORE), BeforeValidator(_integral_float)] | None
    ) = Field(
        None,
        description="Exact second stage (mode `influence`; the other modes ignore it): re-score the first "
        "stage's candidates in order, at most its top max(rescore, k), by their unprojected gradients as "
        "the index forms them (the plain gradients; K-FAC-whitened for an index built with --whiten; no "
        "projection noise, no projected R), "
        "stopping once the top-k is certified at `confidence`, and return the best k; each candidate "
        "costs one backward pass. 0 = off; null = the server's default (`INFLUENCE_RESCORE`; unset, the "
        "index's: on without a projected R, 0 with one).",
    )

    confidence: float = Field(
        0.95,
        gt=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="The exact second stage stops once its top-k is certified at this confidence: "
        "by the first stage's calibrated uncertainty, no candidate left unscored can still enter "
        "the top-k (the response's `rescore` says how many were scored and whether it was).",
    )

    @model_validator(mode="after")
    def _one_completion(self) -> InfluenceQuery:
        if (self.completion is None) == (self.generate is None):
            raise PydanticCustomError(
                COMPLETION_OR_GENERATE,
                "give either `completion` (the output to explain) "
                "or `generate` (let the model write it), not both or neither",
            )
        return self


class InfluenceResult(BaseModel):
    """One retrieved training example."""

    rank: int = Field(description="1-based rank, best first.", examples=[1])
    id: int = Field(description="Stable training example id.", examples=[42])
    score: float = Field(
        description="Influence score: cosine of the unit-norm fingerprints, in [-1, 1].",
        examples=[0.83],
    )
    score_sd: float | None = Field(
        None,
        description="How far the score could move under another random projection: its standard "
        "deviation across projection draws (encoder/uncertainty.py; calibrated for indexes built "
        "with hessian `none`). A 90% interval for another projection's score is score ± "
        "1.645·√2·score_sd. 0 for results re-scored exactly (`rescore`); null where it is not "
        "modelled: whitened indexes (hessian train/mixed), modes bm25/hybrid.",
        examples=[0.004],
    )
    text: str | None = Field(
        None, description="The training sequence's text (null when return_text is false)."
    )
    source: str | None = Field(None, description="Where the training example came from.")
    document_id: str | None = Field(None, description="The document it was chunked from.")


class Timings(BaseModel):
    """Server-side time in milliseconds. ``encode`` and ``search`` are the times of the
    micro-batch the query ran in (shared with the queries batched with it); ``rescore`` is
    this query's own exact second stage."""

    encode: float
    search: float
    rescore: float = 0.0
    total: float


class RescoreReport(BaseModel):
    """How the exact second stage ended for this query."""

    candidates: int = Field(description="Candidates re-scored exactly.")
    certified: bool = Field(
        description="The top-k is the exhaustive exact top-k at `confidence`: no candidate left "
        "unscored can still enter it (or every sequence was scored)."
    )
    confidence: float = Field(description="The confidence asked for.")
    miss_probability: float = Field(
        description="Bound on the chance that an unscored candidate belongs in the top-k "
        "(1 where the index models no first-stage uncertainty)."
    )


class GenerationInfo(BaseModel):
    """How the traced completion was generated (queries with `generate`)."""

    n_tokens: int = Field(description="Tokens generated (the end-of-sequence token not counted).")
    finish_reason: Literal["eos", "length"] = Field(
        description="`eos`: the model ended it; `length`: it reached `max_new_tokens` (or the "
        "model's context)."
    )
    seed: int | None = Field(description="The sampling seed; null for greedy decoding.")


class InfluenceResponse(BaseModel):
    """Ranked training examples for one query."""

    results: list[InfluenceResult]
    completion: str | None = Field(
        None,
        description="The completion that was traced: the model's own generation for a "
        "query with `generate`, else the query's completion.",
    )
    span: Span | None = Field(
        None,
        description="The character range of `completion` whose tokens were traced: the "
        "query's `span` widened to token boundaries, or the whole completion.",
    )
    generation: GenerationInfo | None = Field(None, description="Set for queries with `generate`.")
    rescore: RescoreReport | None = Field(None, description="Set when the exact second stage ran.")
    method: AnswerMethod = Field(
        description="The method that answered: `gradient` (the index's fingerprint search, "
        "re-scored exactly where `rescore` is set), `bm25` or `hybrid`."
    )
    model: str = Field(description="The model the index was built on.")
    index_version: str = Field(description="Content hash of the index manifest that answered.")
    timings_ms: Timings


QueryItem = Annotated[
    dict[str, JsonValue],
    WithJsonSchema(
        {
            "anyOf": [{"$ref": "#/components/schemas/InfluenceQuery"}, {"type": "object"}],
            "description": "An `InfluenceQuery`; any other object is answered with its "
            "validation error in `errors`.",
        }
    ),
]
"""One query of a batch call: validated by the route as an ``InfluenceQuery``, per query."""


class BatchInfluenceRequest(BaseModel):
    """Many queries in one call; the server caps how many (`max_batch_queries`)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"queries": [EXAMPLE_QUERY]}]}
    )

    queries: list[QueryItem] = Field(
        min_length=1,
        description="Queries, answered in order. Each is validated on its own: one that is not a "
        "valid `InfluenceQuery` gets its 422 in `errors` and does not fail the call.",
    )


class BatchQueryError(BaseModel):
    """Why one query of a batch call failed: what `POST /v1/influence` would have answered."""

    query_index: int = Field(ge=0, description="Position of the query in the request.")
    status: int = Field(
        description="The HTTP status a single `POST /v1/influence` would have returned.",
        examples=[413],
    )
    error: ErrorBody


class BatchInfluenceResponse(BaseModel):
    """One entry per query, in request order: a response, or `null` where the query failed
    (its error is in `errors`). One bad query does not fail its batch mates."""

    responses: list[InfluenceResponse | None]
    errors: list[BatchQueryError] = Field(
        default_factory=list,
        description="One per failed query, in request order; empty when all succeeded.",
    )
