"""Log configuration of every ``influence`` process: one format, client text escaped.

Anything a client sends can end up in a log message (paths, ids, error text): the formatter
escapes control characters and lone surrogates in the message, so a request cannot forge a
log line or break the log's encoding. Tracebacks are appended unescaped.
"""

from __future__ import annotations

import logging

from api.errors import safe_text

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
MESSAGE_LIMIT = 4000


class SafeFormatter(logging.Formatter):
    """``logging.Formatter`` whose message part is passed through ``safe_text``."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = safe_text(record.message, MESSAGE_LIMIT)
        return super().formatMessage(record)


def configure_logging(level: int = logging.INFO, fmt: str = FORMAT) -> None:
    """A root handler on stderr with ``SafeFormatter``, as ``logging.basicConfig`` does: a
    no-op where the root logger has handlers already (an embedding application, pytest)."""
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter(fmt))
    # The handler filters too: a library that sets its own logger to DEBUG (bm25s does, at
    # import) would otherwise print DEBUG lines through it whatever the root's level.
    handler.setLevel(level)
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def uvicorn_log_config() -> dict:
    """uvicorn's ``log_config``: its loggers go through the root handler (``SafeFormatter``)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": "INFO"}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
