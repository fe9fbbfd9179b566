"""The error shape of every API response: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """A stable machine-readable ``code`` plus a message for people."""

    code: str = Field(examples=["input_too_long"])
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    """Every error the API returns has this shape."""

    error: ErrorBody
