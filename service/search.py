"""One micro-batch of influence queries against one index: validate, encode, search, filter.

Blocking (torch, FAISS, SQLite): called from the batcher's worker thread, never on the
event loop. Each query's outcome is independent: a query that fails validation gets its
own error and never fails its batch mates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from encoder.batching import Example, tokenize_prompt
from encoder.errors import InfluenceError, InputError, InputTooLongError
from encoder.generation import Generated, Generation, token_spans, traced_example
from indexer.fusion import mode_search
from indexer.manifest import display_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """What the search needs from a request (text formatting happens in the route)."""

    prompt: str
    completion: str | None
    k: int
    source: str | None = None
    min_score: float | None = None
    mode: str = "influence"
    rescore: int = 0
    generate: Generation | None = None
    """Generate and trace: the model writes the completion (``completion`` is None)."""
    span: tuple[int, int] | None = None
    """Trace only the completion tokens overlapping this character range."""


@dataclass(frozen=True)
class Limits:
    """Token limits per query (413 beyond them)."""

    max_prompt_tokens: int
    max_completion_tokens: int
    max_new_tokens: int = 64

    @classmethod
    def of(cls, settings: Any) -> Limits:
        """The limits a ``service.settings.Settings`` sets."""
        return cls(settings.max_prompt_tokens, settings.max_completion_tokens, settings.max_new_tokens)


@dataclass
class Hit:
    """A result: example id, influence score, and its metadata record."""

    id: int
    score: float
    record: Any
    score_sd: float | None = None


@dataclass
class Outcome:
    """One query's result, or its error, plus the index and batch timings it ran with."""

    hits: list[Hit] = field(default_factory=list)
    error: InfluenceError | None = None
    model: str = ""
    index_version: str = ""
    encode_ms: float = 0.0
    search_ms: float = 0.0
    batch_size: int = 0
    traced: Traced | None = None


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


def traced_fields(traced: Traced | None) -> dict[str, Any]:
    """What a query traced, as the response fields ``completion``, ``span`` and
    ``generation`` (the REST response's and ``influence query --json``'s)."""
    if traced is None:
        return {"completion": None, "span": None, "generation": None}
    g, (start, end) = traced.generated, traced.span
    return {
        "completion": traced.completion,
        "span": {"start": start, "end": end} if end > start else None,
        "generation": None if g is None else {"n_tokens": len(g.ids), "finish_reason": g.finish_reason, "seed": g.seed},
    }


def model_name(manifest: dict) -> str:
    """The model id recorded in an index manifest."""
    model = manifest.get("model")
    if isinstance(model, dict):
        if model.get("id") or model.get("name"):
            return str(model.get("id") or model.get("name"))
        # An index built before names were recorded: a name from its model directory,
        # never the server's full path.
        return display_name(Path(str(model.get("path") or "unknown")))
    if model:
        return str(model)
    return str(manifest.get("model_id") or "unknown")


def _check_length(part: str, n: int, limit: int) -> None:
    if n > limit:
        raise InputTooLongError(f"the {part} is {n} tokens, the limit is {limit}", field=part, n_tokens=n, limit=limit)


def validate(tokenizer, query: Query, limits: Limits, context: int | None = None,
             generated: Generated | None = None) -> Traced:  # fmt: skip
    """Tokenize as the encoder will and enforce the per-part token limits and the model's
    context length ``context`` (total tokens). ``generated``: the completion's tokens as
    the model generated them (a ``generate`` query), traced as they are.

    Returns:
        the traced query, its example ready for ``encode_examples``.

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
            raise InputError("the completion is empty: nothing to attribute", code="empty_completion")
    _check_length("completion", len(completion_ids), limits.max_completion_tokens)
    n = len(prompt_ids) + len(completion_ids)
    if context is not None and n > context:
        raise InputTooLongError(f"prompt + completion is {n} tokens, the model's context is {context}",
                                field="completion", n_tokens=n, limit=context)  # fmt: skip
    spans = token_spans(tokenizer, completion, completion_ids) if query.span is not None else []
    example, snapped = traced_example(prompt_ids, completion_ids, spans, query.span)
    return Traced(example, completion, snapped if query.span is not None else (0, len(completion)), generated)


def generated_completion(index, query: Query, limits: Limits, context: int | None) -> Generated:
    """The model's continuation for a ``generate`` query, within the token limits: at most
    ``max_new_tokens`` (413 beyond the server's bound), the completion limit and the room
    the prompt leaves in the model's context."""
    assert query.generate is not None
    asked = query.generate.max_new_tokens
    if asked > limits.max_new_tokens:
        raise InputTooLongError(f"generate.max_new_tokens is {asked}, the limit is {limits.max_new_tokens}",
                                field="generate.max_new_tokens", n_tokens=asked, limit=limits.max_new_tokens)  # fmt: skip
    prompt_ids = tokenize_prompt(index.tokenizer, query.prompt)
    _check_length("prompt", len(prompt_ids), limits.max_prompt_tokens)
    room = min(asked, limits.max_completion_tokens, (context or asked + len(prompt_ids)) - len(prompt_ids))
    if room < 1:
        raise InputTooLongError(f"the prompt is {len(prompt_ids)} tokens and fills the model's context "
                                f"({context}): no room to generate", field="prompt",
                                n_tokens=len(prompt_ids), limit=context)  # fmt: skip
    generated = index.generate(prompt_ids, replace(query.generate, max_new_tokens=room))
    if not generated.ids:
        raise InputError("the model ended its generation at once (end-of-sequence token): nothing to trace",
                         code="empty_generation", field="generate")  # fmt: skip
    return generated


def _encode(index, examples: list[Example]) -> tuple[np.ndarray, list[InfluenceError | None]]:
    """Encode validated queries in one pass; should the encoder still refuse one, encode
    them one by one so that only that query fails.

    Returns:
        vectors [V, d] float32 (rows of failed queries are zero), per-query error or None.
    """
    try:
        return np.asarray(index.encode_examples(examples), dtype=np.float32), [None] * len(examples)
    except InfluenceError:
        if len(examples) == 1:
            raise
    rows: list[np.ndarray | None] = []
    errors: list[InfluenceError | None] = []
    for example in examples:
        try:
            rows.append(np.asarray(index.encode_examples([example]), dtype=np.float32)[0])
            errors.append(None)
        except InfluenceError as exc:
            rows.append(None)
            errors.append(exc)
    dim = next(r.shape[0] for r in rows if r is not None) if any(r is not None for r in rows) else 1
    vectors = np.stack([r if r is not None else np.zeros(dim, np.float32) for r in rows])
    return vectors, errors


def _records(index, ids: list[int]) -> dict[int, Any]:
    return {int(r.id): r for r in index.examples(ids)} if ids else {}


def _hits(index, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    """Hits for one row of search output (-1 padding dropped), best first."""
    return _hit_rows(index, scores[None, :], ids[None, :], [len(ids)])[0]


def _hit_rows(index, scores: np.ndarray, ids: np.ndarray, ks: list[int]) -> list[list[Hit]]:
    """Hits for each row r of search output, its first ``ks[r]`` columns (-1 padding
    dropped), best first; one metadata lookup for all rows (a batch of 16 queries had
    spent ~1.6 ms in 16 separate SQLite queries)."""
    rows = [
        [(int(i), float(s)) for i, s in zip(ids[r, :k], scores[r, :k], strict=True) if int(i) >= 0]
        for r, k in enumerate(ks)
    ]
    records = _records(index, sorted({i for pairs in rows for i, _ in pairs}))
    return [[Hit(i, s, records[i]) for i, s in pairs] for pairs in rows]


def _filtered_search(index, vector: np.ndarray, query: Query) -> list[Hit]:
    """Search for ``query.k`` hits from ``query.source``: widen the candidate pool until
    enough match or the whole index has been ranked, so the filter is exact."""
    size = int(index.size)
    pool = min(size, max(4 * query.k, 64))
    while True:
        scores, ids = index.search(vector[None, :], pool)
        hits = [h for h in _hits(index, scores[0], ids[0]) if h.record.source == query.source]
        if len(hits) >= query.k or pool >= size:
            return hits[: query.k]
        pool = min(size, pool * 4)


def _mode_search(index, vector: np.ndarray, query: Query, text: str) -> list[Hit]:
    """``bm25`` / ``hybrid`` hits (indexer.fusion); a source filter ranks the whole index."""
    k = int(index.size) if query.source is not None else query.k
    scores, ids = mode_search(index, vector, query.prompt + text, query.mode, k)
    hits = _hits(index, scores, ids)
    if query.source is not None:
        hits = [h for h in hits if h.record.source == query.source]
    return hits[: query.k]


def _rescored(index, example: Example, vector: np.ndarray, query: Query) -> list[Hit]:
    """The exact second stage: the first stage's top max(rescore, k) candidates (from
    ``query.source`` when set), re-scored by ``index.rescore``; the best k, best first."""
    pool = max(query.rescore, query.k)
    if query.source is not None:
        candidates = _filtered_search(index, vector, replace(query, k=pool))
    else:
        scores, ids = index.search(vector[None, :], pool)
        candidates = _hits(index, scores[0], ids[0])
    if not candidates:
        return []
    exact = index.rescore(example, [h.id for h in candidates])
    order = np.argsort(-exact, kind="stable")[: query.k]
    return [Hit(candidates[i].id, float(exact[i]), candidates[i].record, 0.0) for i in order]


def run_batch(index, queries: list[Query], limits: Limits) -> list[Outcome]:
    """Answer a micro-batch of queries with one encode pass and one search call.

    Args:
        index: an ``InfluenceIndex`` (leased for the duration of the call).
        queries: Q queries.
        limits: token limits.
    Returns:
        Q outcomes in order; each carries hits (best first) or an error.
    """
    model, version = model_name(index.manifest), str(index.version)
    outcomes = [
        Outcome(model=model, index_version=version, batch_size=len(queries)) for _ in queries
    ]
    context = getattr(index, "max_tokens", None)
    valid: list[int] = []
    examples: list[Example] = []
    for i, query in enumerate(queries):
        try:
            generated = generated_completion(index, query, limits, context) if query.generate is not None else None
            outcomes[i].traced = validate(index.tokenizer, query, limits, context, generated)
            examples.append(outcomes[i].traced.example)
            valid.append(i)
        except InfluenceError as exc:
            outcomes[i].error = exc
    if not valid:
        return outcomes

    t0 = time.perf_counter()
    try:
        vectors, errors = _encode(index, examples)  # [V, d]
    except InfluenceError as exc:
        outcomes[valid[0]].error = exc
        return outcomes
    t1 = time.perf_counter()
    for j, error in enumerate(errors):
        if error is not None:
            outcomes[valid[j]].error = error
    keep = [j for j, error in enumerate(errors) if error is None]
    vectors, valid, examples = vectors[keep], [valid[j] for j in keep], [examples[j] for j in keep]
    if not valid:
        return outcomes

    plain = [j for j, i in enumerate(valid)
             if queries[i].source is None and queries[i].mode == "influence" and not queries[i].rescore]  # fmt: skip
    if plain:
        k_max = max(queries[valid[j]].k for j in plain)
        scores, ids = index.search(vectors[plain], k_max)  # [P, k_max]
        ks = [queries[valid[j]].k for j in plain]
        for j, hits in zip(plain, _hit_rows(index, scores, ids, ks), strict=True):
            outcomes[valid[j]].hits = hits
    for j, i in enumerate(valid):
        if queries[i].rescore:
            try:
                outcomes[i].hits = _rescored(index, examples[j], vectors[j], queries[i])
            except InfluenceError as exc:
                outcomes[i].error = exc
        elif queries[i].mode != "influence":
            traced = outcomes[i].traced
            assert traced is not None  # every valid query was traced
            outcomes[i].hits = _mode_search(index, vectors[j], queries[i], traced.text)
        elif queries[i].source is not None:
            outcomes[i].hits = _filtered_search(index, vectors[j], queries[i])
    for j, i in enumerate(valid):
        if queries[i].mode == "influence" and not queries[i].rescore and outcomes[i].hits:
            sds = index.score_sd(vectors[j], [h.id for h in outcomes[i].hits])
            if sds is not None:
                for h, sd in zip(outcomes[i].hits, sds, strict=True):
                    h.score_sd = float(sd)
    for i in valid:
        floor = queries[i].min_score
        if floor is not None:
            outcomes[i].hits = [h for h in outcomes[i].hits if h.score >= floor]
    t2 = time.perf_counter()

    for i in valid:
        outcomes[i].encode_ms = (t1 - t0) * 1e3
        outcomes[i].search_ms = (t2 - t1) * 1e3
    log.debug(
        "batch of %d: encode %.1f ms, search %.1f ms", len(valid), (t1 - t0) * 1e3, (t2 - t1) * 1e3
    )
    return outcomes
