"""The v1 wire contract of ``POST /v1/influence/explain``: which of a training example's tokens
carry one result's score (``api.models`` holds the query and its answer)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from api.models import MAX_TEXT_FIELD_CHARS, Span, Text, WholeNumber


class ExplainRequest(BaseModel):
    """Split one result's influence score over the training example's tokens."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "The capital of Drosora is", "completion": " Mutu.", "id": 42}]
        },
    )

    prompt: Text = Field(max_length=MAX_TEXT_FIELD_CHARS, description="The query's prompt.")
    completion: Text = Field(
        min_length=1, max_length=MAX_TEXT_FIELD_CHARS, description="The query's completion."
    )
    id: WholeNumber = Field(
        ge=0,
        le=2**53 - 1,  # exact in JSON numbers (float64) and JavaScript; ids are dense row numbers
        strict=True,
        description="The training example to explain (a result's id; 3.0 counts as 3).",
    )
    span: Span | None = Field(
        None,
        description="The query's `span`, if it had one: explain the score of the same traced tokens.",
    )
    exact: bool | None = Field(
        None,
        strict=True,
        description="Explain the exact second stage's score (the one a re-scored result shows) or, false, "
        "the first stage's fingerprint score. Null: the score a result shows by default, the exact one "
        "where the index re-scores by default.",
    )


class TokenContribution(BaseModel):
    """One token of the training example and its share of the score."""

    text: str = Field(description="The token's text (a slice of the example's text).")
    start: int = Field(description="Character offset of the token in the example's text.")
    end: int = Field(description="End character offset (exclusive).")
    contribution: float = Field(
        description="This token's loss term's share of the score: e_q . R^-1/2 phi^(t) / "
        "||R^-1/2 phi||. Signed; the contributions sum to `score`. 0 for the first token, "
        "which is never predicted."
    )


class ExplainResponse(BaseModel):
    """Per-token attribution of one (query, training example) influence score."""

    id: int
    score: float = Field(
        description="The influence score recomputed exactly (float32), "
        "= sum of the token contributions."
    )
    index_score: float = Field(
        description="The score against the stored float16 fingerprint (what the search ranked by)."
    )
    fingerprint_agreement: float = Field(
        description="Cosine between the recomputed and the stored fingerprint of the example; "
        "~1 when the example's tokens were reconstructed exactly from its text."
    )
    tokens: list[TokenContribution]
    exact: bool = Field(
        False, description="The exact second stage's score is explained (else the first stage's)."
    )
    model: str
    index_version: str
    timings_ms: dict[str, float] = Field(description="Server-side time: `total`.")
