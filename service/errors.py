"""The one place errors become HTTP: JSON ``{"error": {"code", "message", "details"}}``.

``InfluenceError`` subclasses carry their status and stable code (encoder/errors.py);
schema violations are 422 ``validation_error`` naming the field; unknown routes are 404
``not_found``; 503s carry ``Retry-After``. Anything else is a bug: 500 ``internal_error``,
logged with its traceback, never echoed to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.error_models import ErrorBody, ErrorResponse
from api.errors import InfluenceError, safe_text
from api.models import COMPLETION_OR_GENERATE
from service.deps import services

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        401: "Missing API key.",
        403: "Wrong API key.",
        413: "Prompt or completion over the token limit.",
        422: "Invalid input; `details.field` names the offending field.",
        503: "Overloaded or not ready; retry after `Retry-After` seconds.",
    }.items()
}
"""OpenAPI ``responses`` entries for the error statuses every v1 route can return."""


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> ErrorBody:
    """The error body. Client text can reach ``message`` and ``details`` (a path, a field
    name, an unknown key): it is escaped and truncated here, so no input fails to encode."""
    safe = {
        k: safe_text(v) if isinstance(v, str) else v for k, v in jsonable(details or {}).items()
    }
    return ErrorBody(code=code, message=safe_text(message, 1000), details=safe or None)


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=error_body(code, message, details))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | None) else str(v)
        for k, v in details.items()
    }


def _field_name(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_error_body(errors: list[Any], prefix: tuple = ()) -> ErrorBody:
    """The ``validation_error`` body for pydantic's ``errors()``: the first problem in the
    message, every offending field in ``details`` (locations under ``prefix``)."""

    def loc(e: Any) -> tuple:
        where = (*prefix, *e.get("loc", ()))
        return (*where, "completion") if e.get("type") == COMPLETION_OR_GENERATE else where

    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _field_name(loc(first))
    fields = sorted({_field_name(loc(e)) for e in errors})
    return error_body(
        "validation_error",
        f"{field}: {first.get('msg', 'invalid')}",
        {"field": field, "fields": ", ".join(fields)},
    )


def install_error_handlers(app: FastAPI, *, retry_after_s: int) -> None:
    """Register the exception handlers on ``app``."""

    async def influence_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InfluenceError)  # registered for InfluenceError only
        headers = None
        if exc.http_status == 503:  # the error's own estimate where it has one (a backlog)
            headers = {"Retry-After": str(exc.details.get("retry_after_s", retry_after_s))}
            services(request).metrics.rejected.labels(exc.code).inc()
        if exc.http_status >= 500 and exc.code != "not_ready":  # /readyz polls are routine
            log.warning(
                "%s %s -> %d %s", request.method, request.url.path, exc.http_status, exc.code
            )
        return error_response(exc.http_status, exc.code, exc.message, exc.details, headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # registered for it only
        body = ErrorResponse(error=validation_error_body(list(exc.errors())))
        return JSONResponse(body.model_dump(mode="json"), status_code=422)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # registered for it only
        if exc.status_code == 400:  # FastAPI: a body that is not decodable at all
            return error_response(
                422,
                "validation_error",
                f"body: {exc.detail}",
                {"field": "body", "fields": "body"},
            )
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(InfluenceError, influence_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
