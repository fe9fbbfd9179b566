"""Corpus readers: JSONL, Parquet, an HF ``datasets`` directory, or a folder of text files.

Each yields ``Document``s in a fixed order (ids are assigned in that order, so the order
is part of the index's identity). Readers stream: no corpus is held in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from api.errors import InputError, safe_text
from encoder.hashing import sha256_named_files

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Document:
    """One corpus document: ``id`` (unique string), ``text``, optional ``source`` label."""

    id: str
    text: str
    source: str | None = None


def corpus_format(path: Path) -> str:
    """``jsonl`` | ``parquet`` | ``hf_dataset`` | ``text_dir`` for a corpus path.

    Raises:
        InputError: code ``corpus_not_found`` or ``unknown_corpus_format``.
    """
    if not path.exists():
        raise InputError(f"corpus {path} does not exist", code="corpus_not_found")
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()
        ):
            return "hf_dataset"
        return "text_dir"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text_dir"
    raise InputError(
        f"cannot tell the format of {path}: use .jsonl, .parquet, a datasets directory "
        f"(save_to_disk) or a folder of .txt files",
        code="unknown_corpus_format",
    )


def corpus_files(path: Path) -> list[Path]:
    """The files a corpus consists of, in reading order."""
    fmt = corpus_format(path)
    if fmt == "text_dir":
        if path.is_file():
            return [path]
        return sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        )
    if fmt == "hf_dataset":
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def corpus_hash(path: Path) -> str:
    """sha256 over the corpus files' relative names and bytes (the corpus identity)."""
    root = path if path.is_dir() else path.parent
    return sha256_named_files((str(f.relative_to(root)), f) for f in corpus_files(path))


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where} is not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 4]!r}); "
            f"re-encode the corpus as UTF-8",
            code="invalid_encoding",
        ) from exc


def _doc(text: object, doc_id: object, source: object, where: str) -> Document:
    if not isinstance(text, str):
        raise InputError(
            f"{where}: the 'text' field is missing or not a string", code="invalid_corpus"
        )
    for field, value in (("text", text), ("id", str(doc_id)), ("source", source)):
        if isinstance(value, str):
            _check_encodable(value, where, field)
    return Document(str(doc_id), text, None if source is None else str(source))


def _check_encodable(value: str, where: str, field: str) -> None:
    """A lone surrogate (JSON's ``"\ud800"``) is no text a tokenizer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{where}: the {field!r} field holds a lone surrogate (\\u{ord(value[exc.start]):04x} at character "
            f"{exc.start}), which is not text; fix or drop that record",
            code="invalid_encoding",
        ) from exc


def _read_jsonl(path: Path) -> Iterator[Document]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}, line {lineno}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{where}: not valid JSON ({exc})", code="invalid_corpus") from exc
            if not isinstance(obj, dict):
                raise InputError(
                    f"{where}: expected a JSON object with a 'text' field", code="invalid_corpus"
                )
            yield _doc(obj.get("text"), obj.get("id", lineno - 1), obj.get("source"), where)


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means a bad file
        raise InputError(
            f"{path} is not a readable Parquet file: {exc}", code="invalid_corpus"
        ) from exc
    if "text" not in pf.schema_arrow.names:
        raise InputError(f"{path} has no 'text' column", code="invalid_corpus")
    cols = [c for c in ("text", "id", "source") if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=1024):
        data = batch.to_pydict()
        ids, sources = data.get("id"), data.get("source")
        for i, text in enumerate(data["text"]):
            doc_id = ids[i] if ids is not None else row
            yield _doc(
                text, doc_id, sources[i] if sources is not None else None, f"{path}, row {row}"
            )
            row += 1


def _read_hf_dataset(path: Path) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{path} is not a loadable datasets directory: {exc}", code="invalid_corpus"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        log.info("datasets directory %s: reading split %r", path, split)
        ds = ds[split]
    if "text" not in ds.column_names:
        raise InputError(f"{path} has no 'text' column", code="invalid_corpus")
    for row, ex in enumerate(ds):
        yield _doc(ex["text"], ex.get("id", row), ex.get("source"), f"{path}, row {row}")


def _read_text_files(path: Path) -> Iterator[Document]:
    root = path if path.is_dir() else path.parent
    for f in corpus_files(path):
        rel = str(f.relative_to(root))
        yield Document(rel, _decode(f.read_bytes(), str(f)), root.name)


def read_corpus(path: str | Path) -> Iterator[Document]:
    """Stream the documents of a corpus.

    Args:
        path: a ``.jsonl`` file (``text``, optional ``id``/``source``), a ``.parquet``
            file (same columns), a directory saved with ``datasets.save_to_disk``, or a
            folder of ``.txt``/``.md`` files (id = relative path).
    Yields:
        documents in corpus order.
    Raises:
        InputError: missing path (``corpus_not_found``), non-UTF-8 bytes or a lone
            surrogate (``invalid_encoding``), malformed records (``invalid_corpus``), a
            document id seen before (``duplicate_document_id``).
    """
    path = Path(path)
    readers = {
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "hf_dataset": _read_hf_dataset,
        "text_dir": _read_text_files,
    }
    seen: set[str] = set()
    for n, doc in enumerate(readers[corpus_format(path)](path), start=1):
        if doc.id in seen:
            raise InputError(
                f"{path}: document id {safe_text(doc.id)!r} appears twice (again in document {n}); "
                "ids must be unique, so that every result names one document: fix the 'id' field "
                "or drop it (then the line number is the id)",
                code="duplicate_document_id",
            )
        seen.add(doc.id)
        yield doc
