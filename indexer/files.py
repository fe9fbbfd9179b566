"""All-or-nothing file writes (stdlib only: the CLI imports it to print help)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp"


def is_temporary(path: Path) -> bool:
    """A ``write_atomic`` file left by a crash (``name.tmp.suffix``): never an artifact."""
    return path.name.endswith(TMP_MARK) or f"{TMP_MARK}." in path.name


def write_atomic(path: Path, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` then move the result to ``path`` (all or nothing)."""
    tmp = path.with_name(path.name + TMP_MARK + path.suffix)
    writer(tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
