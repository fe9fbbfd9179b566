"""schemathesis hooks: the rules of a valid query that no JSON Schema can state, so that
the positive-data checks hold the server to everything else without exemptions.

What JSON Schema can say is in ``api/openapi.json`` (completion XOR generate as ``oneOf``,
every bound as ``minimum`` / ``maximum``, this server's ``max_new_tokens``). What it cannot
is filtered here, each rule documented in the schema's descriptions:

- a span's ``end`` must exceed its ``start``, and its ``start`` lie within the completion
  (a generated completion's length is not known in advance, so a generate query's span is
  left out of positive data);
- prompt and completion within the server's token limits and, together, the model's
  context (``x-max-tokens``; a byte-level tokenizer gives at most one token per UTF-8 byte,
  so a text of at most that many bytes is certainly within it).

The limits come from ``INFLUENCE_ST_LIMITS`` (JSON: prompt, completion, context), set by
the test that runs schemathesis against its server.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis

LIMITS: dict[str, int] = json.loads(os.environ.get("INFLUENCE_ST_LIMITS", "{}"))


def _n_bytes(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _whole(value: Any) -> int | None:
    """A JSON integer as the server reads it (5.0 is 5), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def _span_ok(body: dict[str, Any]) -> bool:
    span = body.get("span")
    if not isinstance(span, dict):
        return True
    start, end = _whole(span.get("start")), _whole(span.get("end"))
    if start is None or end is None:
        return True  # not a span the schema allows: negative data, the server refuses it
    completion = body.get("completion")
    if end <= start or body.get("generate") is not None:
        return False
    return not isinstance(completion, str) or start < len(completion)


def _tokens_ok(body: dict[str, Any]) -> bool:
    prompt, completion = _n_bytes(body.get("prompt")), _n_bytes(body.get("completion"))
    return (
        prompt <= LIMITS.get("prompt", 0)
        and completion <= LIMITS.get("completion", 0)
        and 1 + prompt + completion <= LIMITS.get("context", 0)  # + BOS
    )


@schemathesis.hook
def filter_case(ctx: Any, case: Any) -> bool:
    """Keep a case unless its query body breaks a rule that the schema cannot state (a
    case hook: the coverage phase applies those, not the body hooks)."""
    body = getattr(case, "body", None)
    if not isinstance(body, dict) or "prompt" not in body:
        return True
    return _span_ok(body) and _tokens_ok(body)
