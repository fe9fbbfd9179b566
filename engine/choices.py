"""Names of the read side's choices, importable without torch or FAISS (settings, CLI)."""

from __future__ import annotations

from typing import Literal, get_args

Placement = Literal["auto", "cpu", "gpu", "shards", "torch"]
"""Where search runs (``engine.vectors.open_vectors``)."""
SEARCH_PLACEMENTS: tuple[str, ...] = get_args(Placement)
