"""Authentication and the body-size cap, before anything reads the request body.

FastAPI reads and parses a body before it runs a route's dependencies, so with auth as a
dependency alone an anonymous client could make the server buffer and parse any body
(malformed JSON got 422 instead of 401; four 100 MB bodies took 1.1 GB). This ASGI
middleware answers 401/403 from the headers, and 413 ``request_too_large`` (the gateway's
code) for a body over ``max_body_bytes``, declared or streamed, before the app sees it.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import InfluenceError
from service.auth import check_admin, check_key, key_in
from service.errors import error_response
from service.settings import Settings

ADMIN_PREFIX = "/v1/admin/"
KEYED_PREFIX = "/v1/"


class RequestGuardMiddleware:
    """401/403 and 413 from the headers and a bounded read of the body."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = scope.get("headers", [])
        try:
            if path.startswith(ADMIN_PREFIX):
                check_admin(self.settings.admin_keys, key_in(Headers(scope=scope)))
            elif path.startswith(KEYED_PREFIX) and self.settings.api_keys:
                check_key(self.settings.api_keys, key_in(Headers(scope=scope)))
        except InfluenceError as exc:
            await error_response(exc.http_status, exc.code, exc.message)(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        declared = next((v for n, v in headers if n.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send)
            return
        # Read the body here, at most `limit` bytes, and replay it: a chunked body has no length.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)
                return
            size += len(message.get("body", b""))
            if size > limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, None, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.settings.max_body_bytes
        response = error_response(
            413,
            "request_too_large",
            f"request body exceeds {limit} bytes",
            {"limit": limit},
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that hands out the body read so far as one message, then defers."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if pending is not None:
                return pending
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await receive()

    return replay
