"""sha256 of files, read in 1 MiB chunks: the identities of models, corpora and artifacts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def _update(h: hashlib._Hash, path: Path) -> None:
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update(h, path)
    return h.hexdigest()


def sha256_named_files(files: Iterable[tuple[str, Path]]) -> str:
    """Hex sha256 over (name, file) pairs in the given order: each name's UTF-8 bytes, then
    the file's bytes (a renamed file is another identity)."""
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode())
        _update(h, path)
    return h.hexdigest()
