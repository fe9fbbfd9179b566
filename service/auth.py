"""Optional API-key auth: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

With no keys configured the query endpoints are open; health, readiness and metrics are
always open. The admin endpoint (reload) needs one of its own keys (``admin_keys``; a query
key is not one): with none configured it is disabled (use SIGHUP).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import APIRouter, Depends, Request

from api.errors import ForbiddenError, UnauthorizedError
from service.deps import services
from service.errors import ERROR_RESPONSES


def presented_key(request: Request) -> str | None:
    """The key the client sent, from ``Authorization: Bearer`` or ``X-API-Key``."""
    return key_in(request.headers)


def key_in(headers: Mapping[str, str]) -> str | None:
    """``presented_key`` over any case-insensitive header mapping (an ASGI scope's too)."""
    header = headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def check_key(keys: list[str], presented: str | None) -> None:
    """Raise unless ``presented`` is one of ``keys`` (constant-time comparison).

    Raises:
        UnauthorizedError: no key presented (401).
        ForbiddenError: a key that is not accepted (403).
    """
    if presented is None:
        raise UnauthorizedError("an API key is required (Authorization: Bearer or X-API-Key)")
    ok = False
    for key in keys:  # compare against every key: timing does not reveal which matched
        ok |= hmac.compare_digest(key.encode(), presented.encode())
    if not ok:
        raise ForbiddenError("the API key is not accepted")


async def require_key(request: Request) -> None:
    """FastAPI dependency for query endpoints: a valid key when auth is enabled.

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in its
    thread pool, a thread hop (and a GIL hand-off) on every request for a header check.
    """
    keys = services(request).settings.api_keys
    if keys:
        check_key(keys, presented_key(request))


async def require_admin(request: Request) -> None:
    """FastAPI dependency for admin endpoints: always an admin key (``async``: see require_key)."""
    check_admin(services(request).settings.admin_keys, presented_key(request))


def check_admin(admin_keys: list[str], presented: str | None) -> None:
    """Admin endpoints need an admin key even when queries are open; without admin keys
    they are off."""
    if not admin_keys:
        raise ForbiddenError(
            "admin endpoints are disabled without admin keys (set INFLUENCE_ADMIN_KEYS, or send SIGHUP)",
            code="admin_disabled",
        )
    check_key(admin_keys, presented)


def v1_router() -> APIRouter:
    """A router for part of the v1 API: under ``/v1``, behind ``require_key``, with the
    shared error responses documented. The prefix is the router's own, so each route's
    path (the metrics' route label) is its full path."""
    return APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)
