"""Request id, access log and request metrics, as one pure ASGI middleware.

``X-Request-ID`` is read from the request (a new one is generated when absent or
unreasonable), echoed on the response, and written in the access log line, so a gateway
and this service log the same id for one request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.metrics import Metrics

access_log = logging.getLogger("influence.access")
log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh uuid4 hex."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if _REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Adds the request id, logs one access line and records request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug: answered here as JSON 500. Above this middleware Starlette's
            # ServerErrorMiddleware would answer it and re-raise, and the server then
            # closes the connection, failing the client's next request on it too.
            if started:
                raise
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal_error", "internal server error")
            await response(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(template, scope["method"], status, seconds)
            client = scope.get("client") or ("-", 0)
            access_log.info(
                '%s "%s %s" %d %.1fms request_id=%s',
                client[0],
                scope["method"],
                scope["path"],
                status,
                seconds * 1e3,
                request_id,
            )
