"""Project exceptions: one small hierarchy with stable codes.

Every error a user can cause carries a stable machine-readable ``code``. The service maps
these to HTTP in one place (``service/errors.py``) and the CLI maps them to exit code 2 in
one place (``service/cli.py``).
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
