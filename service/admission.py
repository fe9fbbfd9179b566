"""Admission of explanations: at most ``limit`` in flight, the next refused at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from api.errors import OverloadedError


class Admission:
    """At most ``limit`` explanations in flight; the next is refused at once (503 +
    Retry-After) rather than queued behind minutes of backward passes. Used from the
    event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise OverloadedError(
                f"{self.active} explanations are running (limit {self.limit}); retry later",
                code="explain_overloaded",
                limit=self.limit,
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
