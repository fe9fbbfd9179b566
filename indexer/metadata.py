"""The metadata store: SQLite mapping sequence id -> text, source, document, offsets, and
the token ids the sequence was indexed with.

Ids are dense 0..N-1 in corpus order (the row id of the FAISS index and of the float16
fingerprint matrix). Offsets locate the sequence in its document: tokens
[token_start, token_end) and characters [char_start, char_end). The ``tokens`` table holds
each sequence's token ids (uint32 little-endian) so that anything that re-runs the model on
an indexed sequence (the explain endpoint) uses exactly those ids instead of re-tokenizing
its text.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from api.errors import ArtifactError, NotFoundError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    source TEXT,
    document_id TEXT NOT NULL,
    token_start INTEGER NOT NULL,
    token_end INTEGER NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL
)
"""
_COLUMNS = "id, text, source, document_id, token_start, token_end, char_start, char_end"
_TOKENS_SCHEMA = "CREATE TABLE IF NOT EXISTS tokens (id INTEGER PRIMARY KEY, ids BLOB NOT NULL)"


@dataclass(frozen=True)
class ExampleRecord:
    """One indexed training sequence.

    Attributes:
        id: dense sequence id (row of the index).
        text: the sequence's text.
        source: the document's source label (may be None).
        document_id: id of the document the sequence starts in.
        token_start, token_end: token span in the document, end exclusive.
        char_start, char_end: character span in the document, end exclusive.
    """

    id: int
    text: str
    source: str | None
    document_id: str
    token_start: int
    token_end: int
    char_start: int
    char_end: int


T = TypeVar("T")


def pack_token_ids(ids: Sequence[int]) -> bytes:
    """A sequence's token ids as stored: little-endian uint32."""
    return np.asarray(ids, dtype="<u4").tobytes()


def unpack_token_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<u4").astype(np.int64).tolist()


def in_order(
    ids: Sequence[int], fetch: Callable[[list[int]], Iterable[tuple[int, T]]], chunk: int
) -> list[T]:
    """Values for ``ids`` in the given order, each distinct id fetched once, ``chunk`` ids
    per ``fetch`` call (a store's lookup, yielding (id, value)).

    Raises:
        NotFoundError: an id is not in the store (code ``unknown_id``).
    """
    wanted = [int(i) for i in ids]
    unique = sorted(set(wanted))
    found: dict[int, T] = {}
    for start in range(0, len(unique), chunk):
        found.update(fetch(unique[start : start + chunk]))
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NotFoundError(
            f"no training example with id {missing[0]}", code="unknown_id", id=missing[0]
        )
    return [found[i] for i in wanted]


def records_in_order(
    ids: Sequence[int], fetch: Callable[[list[int]], Iterable[ExampleRecord]], chunk: int
) -> list[ExampleRecord]:
    """``in_order`` for a lookup that yields records."""
    return in_order(ids, lambda part: ((int(r.id), r) for r in fetch(part)), chunk)


class MetadataWriter:
    """Appends records to a new SQLite file in one transaction per ``add`` call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self._conn = sqlite3.connect(str(self.path))
        self._conn.execute("PRAGMA journal_mode=OFF")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute(_SCHEMA)
        self._conn.execute(_TOKENS_SCHEMA)

    def add(self, records: Iterable[ExampleRecord], token_ids: Sequence[Sequence[int]]) -> None:
        """Append records (and, in the same order, each one's token ids)."""
        records = list(records)
        rows = [
            (
                r.id,
                r.text,
                r.source,
                r.document_id,
                r.token_start,
                r.token_end,
                r.char_start,
                r.char_end,
            )
            for r in records
        ]
        with self._conn:
            self._conn.executemany(
                f"INSERT INTO examples ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", rows
            )
            if len(token_ids) != len(records):
                raise ValueError(f"{len(records)} records but {len(token_ids)} token id lists")
            self._conn.executemany(
                "INSERT INTO tokens (id, ids) VALUES (?, ?)",
                [(r.id, pack_token_ids(ids)) for r, ids in zip(records, token_ids, strict=True)],
            )

    def close(self) -> None:
        self._conn.commit()
        self._conn.close()


class MetadataStore:
    """Read-only access to a published metadata store (safe to share across threads)."""

    def __init__(self, path: Path) -> None:
        if not Path(path).is_file():
            raise ArtifactError(f"metadata store {path} is missing")
        uri = f"file:{Path(path).resolve()}?mode=ro&immutable=1"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        if (
            self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tokens'"
            ).fetchone()
            is None
        ):
            self._conn.close()
            raise ArtifactError(
                f"metadata store {path} has no tokens table: rebuild the index",
                code="format_version",
            )

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0])

    def get_many(self, ids: Sequence[int]) -> list[ExampleRecord]:
        """Records for ``ids`` in the given order.

        Raises:
            NotFoundError: an id is not in the store (code ``unknown_id``).
        """

        def fetch(chunk: list[int]) -> Iterable[ExampleRecord]:
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM examples WHERE id IN ({marks})", chunk
            )
            return (ExampleRecord(*row) for row in rows)

        return records_in_order(ids, fetch, chunk=500)

    def token_ids(self, id: int) -> list[int]:  # noqa: A002 - the store's key
        """The token ids sequence ``id`` was indexed with (``NotFoundError`` for an unknown id)."""
        return self.token_ids_many([id])[0]

    def token_ids_many(self, ids: Sequence[int]) -> list[list[int]]:
        """The token ids of sequences ``ids``, in order, one query per 500 ids.

        Raises:
            NotFoundError: an id is not in the store (code ``unknown_id``).
        """

        def fetch(chunk: list[int]) -> Iterable[tuple[int, list[int]]]:
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(f"SELECT id, ids FROM tokens WHERE id IN ({marks})", chunk)
            return ((int(i), unpack_token_ids(data)) for i, data in rows)

        return in_order(ids, fetch, chunk=500)

    def close(self) -> None:
        self._conn.close()
