"""The project's errors, part of the v1 wire contract: one hierarchy, each class with a stable
machine-readable ``code`` and the HTTP status it answers with.

Every layer raises them (the encoder and the indexer too: this module imports nothing), the
service turns them into ``{"error": {"code", "message", "details"}}`` in one place
(``service/errors.py``, shaped by ``api.error_models``) and the CLI into exit code 2 in one
place (``service/cli.py``).
"""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class. ``code`` is stable (clients match on it); ``message`` is for people."""

    code: str = "influence_error"
    http_status: int = 400

    def __init__(self, message: str, *, code: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def __str__(self) -> str:
        return self.message


class ConfigError(InfluenceError):
    """A configuration value is invalid (unknown module glob, bad k, bad lambda, ...)."""

    code = "invalid_config"
    http_status = 422


class ModelLoadError(InfluenceError):
    """A model or tokenizer directory cannot be loaded."""

    code = "model_load_error"
    http_status = 422


class OptimizerStateError(InfluenceError):
    """Optimizer state is missing, unreadable, or does not match the model."""

    code = "optimizer_state_mismatch"
    http_status = 422


class InputError(InfluenceError):
    """A query or training example is malformed (e.g. an empty completion)."""

    code = "invalid_input"
    http_status = 422


class InputTooLongError(InputError):
    """A query or example has more tokens than allowed."""

    code = "input_too_long"
    http_status = 413


class ArtifactError(InfluenceError):
    """An index artifact is missing, corrupt, or does not match the model."""

    code = "artifact_error"
    http_status = 422


class IndexChangedError(InfluenceError):
    """A served index's files were modified in place (published indexes are immutable)."""

    code = "index_changed"
    http_status = 503


class InternalError(InfluenceError):
    """A bug met while answering one query: that query alone fails (500), logged with its
    traceback; the message never echoes the exception's text to the client."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str = "internal error while answering this query") -> None:
        super().__init__(message)


class NotFoundError(InfluenceError):
    """An id or resource does not exist."""

    code = "not_found"
    http_status = 404


class SearchBackendUnavailable(InfluenceError):
    """The vector search backend (Milvus) is down or too slow: retry later (503)."""

    code = "search_backend_unavailable"
    http_status = 503


class QueryAbandonedError(InfluenceError):
    """A query's client gave up before it was answered; its remaining work was dropped."""

    code = "abandoned"
    http_status = 503


class UnauthorizedError(InfluenceError):
    """No API key was sent."""

    code = "unauthorized"
    http_status = 401


class ForbiddenError(InfluenceError):
    """The API key sent is not accepted."""

    code = "forbidden"
    http_status = 403


class WorkOverBudgetError(InfluenceError):
    """A request's estimated work does not fit in the request timeout (413)."""

    code = "work_over_budget"
    http_status = 413


class BacklogError(InfluenceError):
    """The work ahead of a request would outlast its timeout: retry after the backlog (503)."""

    code = "overloaded"
    http_status = 503


class NotReadyError(InfluenceError):
    """No index is loaded (yet): the service answers 503."""

    code = "not_ready"
    http_status = 503


class OverloadedError(InfluenceError):
    """The query queue is full: retry later (503 + Retry-After)."""

    code = "overloaded"
    http_status = 503


class QueryTimeoutError(InfluenceError):
    """A query waited and ran longer than the request timeout (503 + Retry-After)."""

    code = "timeout"
    http_status = 503


def safe_text(value: object, limit: int = 200) -> str:
    """``value`` as printable text for an error message or a log line.

    Client text reaches messages and logs; escaped here it can neither forge a log line
    (newlines, NUL, ANSI escapes), fail to encode (lone surrogates) nor flood (``limit``
    characters, then a count of the rest).
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = f"{text[:limit]}...(+{len(text) - limit} chars)"
    if text.isprintable() and text.isascii():
        return text
    out = []
    for ch in text:
        cp = ord(ch)
        if ch.isprintable() and not 0xD800 <= cp <= 0xDFFF:
            out.append(ch)
        elif cp < 0x100:
            out.append(f"\\x{cp:02x}")
        else:
            out.append(f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}")
    return "".join(out)
