"""A published index on Milvus, for corpora that outgrow one machine: push its
fingerprints, ids, texts, sources and document ids into a collection, and search it.

The collection records the index version and the fingerprint config (collection
properties); a server refuses a collection that does not match its manifest. Pushing is
resumable and idempotent: each batch of ids is checked against the collection before it
is inserted, so a rerun after a kill inserts the rest and never an id twice.

Vectors are float16 where the server takes ``FLOAT16_VECTOR`` (Milvus); Milvus Lite does
not, and gets the same float16 values widened to float32 (``FLOAT_VECTOR``): the inner
products are then exactly those FAISS ``Flat`` computes over the stored fingerprints.
Milvus caps dense vectors at 32,768 dims; a larger fingerprint (every default index of a
model with 16 or more tracked modules) is folded into fewer dims (``fold``: a CountSketch of
the fingerprint, unbiased for inner products), and a folded collection's candidates are
re-ranked against the stored fingerprints, as an approximate collection's are.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from api.errors import ArtifactError, ConfigError, InfluenceError, SearchBackendUnavailable
from indexer import manifest as mf
from indexer.metadata import (
    MetadataStore,
    pack_token_ids,
)

log = logging.getLogger(__name__)

MAX_DIM = 32768
"""Milvus's largest dense vector."""
MAX_TOP_K = 16384
"""Milvus's largest search limit."""
TEXT_CHARS = 65535
"""Milvus's largest VARCHAR; longer texts are cut in the collection (the local metadata
store keeps them whole)."""
VERSION_KEY, CONFIG_KEY, COMPLETE_KEY = (
    "influence.index_version",
    "influence.fingerprint",
    "influence.complete",
)
VECTOR_TYPE_KEY, INDEX_TYPE_KEY = "influence.vector_type", "influence.index_type"
FOLD_KEY = "influence.fold_width"
"""The folded width of a collection's vectors (absent: not folded)."""
FOLD_SEED = 0x5EED_F01D
"""The key of the fold's signs: one fold for every index, so any server folds its queries
as the push folded the fingerprints."""
OFFSET_FIELDS = ("token_start", "token_end", "char_start", "char_end")
RECORD_FIELDS = ("id", "text", "source", "document_id", *OFFSET_FIELDS)
INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_PQ", "HNSW", "GPU_CAGRA", "GPU_IVF_PQ")


@dataclass(frozen=True)
class MilvusTarget:
    """Where an index lives on Milvus: a pymilvus URI (``http://host:19530``) and a
    collection (default ``influence_<index version>``)."""

    uri: str
    collection: str | None = None
    timeout_s: float = 10.0

    def name_for(self, version: str) -> str:
        return self.collection or f"influence_{version}"

    @property
    def lite(self) -> bool:
        """A local file: pymilvus runs Milvus Lite in this process (no server to run)."""
        return "://" not in self.uri


class _LiteUnimplemented(logging.Filter):
    """Milvus Lite, serving in this process, lacks some RPCs that pymilvus calls and falls
    back from (``AllocTimestamp`` while an index is created); grpc logs each as an ERROR
    with a traceback although the call succeeds. Only those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and str(exc) == "Method not implemented!")


_LITE_FILTER = _LiteUnimplemented()


def fold_width(dim: int) -> int:
    """The collection's vector width for ``dim``-dim fingerprints: ``dim`` where Milvus takes
    it, else ``ceil(dim / parts)`` with ``parts = ceil(dim / MAX_DIM)``."""
    parts = -(-dim // MAX_DIM)
    return -(-dim // parts)


def fold(vectors: np.ndarray, width: int) -> np.ndarray:
    """[n, d] -> [n, width] float32: x'_j = sum_r s_rj x_(r width + j) (zero past d), the signs
    s = +-1 from SplitMix64 of ``FOLD_SEED`` and the position. E <x', y'> = <x, y> over the
    signs (the cross terms cancel), with the variance of a CountSketch: an estimate, so a
    folded collection's candidates are re-ranked exactly. ``width >= d``: unchanged."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if width >= d:
        return vectors
    parts = -(-d // width)
    padded = np.zeros((n, parts * width), dtype=np.float32)
    padded[:, :d] = vectors
    return (padded.reshape(n, parts, width) * fold_signs(parts * width).reshape(parts, width)).sum(
        1
    )


def fold_signs(n: int) -> np.ndarray:
    """The fold's sign of each of ``n`` positions; [n] float32 +-1."""
    import torch

    from encoder.projection import splitmix64

    state = torch.arange(1, n + 1, dtype=torch.int64).mul_(0x9E3779B97F4A7C15 - (1 << 64))
    return (1.0 - 2.0 * (splitmix64(state.add_(FOLD_SEED)) < 0).float()).numpy()


def client_for(target: MilvusTarget):
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ConfigError("Milvus needs pymilvus: pip install 'influence-search[milvus]'") from None

    if target.lite:
        logging.getLogger("grpc._server").addFilter(_LITE_FILTER)  # idempotent: one instance
    try:
        return MilvusClient(uri=target.uri, timeout=target.timeout_s)
    except Exception as exc:  # noqa: BLE001 - any connection failure is "unavailable"
        raise SearchBackendUnavailable(f"cannot reach Milvus at {target.uri}: {exc}") from exc


def _fingerprint_identity(manifest: mf.Manifest) -> str:
    return json.dumps(manifest.fingerprint["config"], sort_keys=True)


def _create(
    client,
    name: str,
    dim: int,
    index_type: str,
    index_params: dict[str, Any],
    properties: dict[str, str],
) -> str:
    """Create the collection; float16 vectors where the server takes them. Returns the
    vector type used."""
    from pymilvus import DataType, MilvusException

    for vector_type in (DataType.FLOAT16_VECTOR, DataType.FLOAT_VECTOR):
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("fingerprint", vector_type, dim=dim)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_CHARS)
        schema.add_field("source", DataType.VARCHAR, max_length=4096, nullable=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=4096, nullable=True)
        for offset in OFFSET_FIELDS:
            schema.add_field(offset, DataType.INT64)
        schema.add_field("token_ids", DataType.VARCHAR, max_length=TEXT_CHARS, nullable=True)
        index = client.prepare_index_params()
        index.add_index("fingerprint", index_type=index_type, metric_type="IP", params=index_params)
        rpc_log = logging.getLogger("pymilvus.decorators")  # logs the refusal we handle as an ERROR
        level = rpc_log.level
        if vector_type == DataType.FLOAT16_VECTOR:
            rpc_log.setLevel(logging.CRITICAL)
        try:
            client.create_collection(
                name,
                schema=schema,
                index_params=index,
                properties={
                    **properties,
                    VECTOR_TYPE_KEY: vector_type.name,
                    INDEX_TYPE_KEY: index_type,
                },
            )
            return vector_type.name
        except MilvusException as exc:
            if vector_type == DataType.FLOAT16_VECTOR and "not support" in str(exc):
                log.info("this server has no float16 vectors (%s): pushing float32", exc)
                continue
            raise
        finally:
            rpc_log.setLevel(level)
    raise AssertionError("unreachable")


def push(
    index_dir: Path,
    target: MilvusTarget,
    *,
    index_type: str = "FLAT",
    index_params: dict[str, Any] | None = None,
    batch_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Upload a published index into a Milvus collection (resumable, idempotent).

    Returns:
        ``{"collection", "inserted", "present", "vector_type"}``.
    Raises:
        ArtifactError: ``milvus_mismatch`` when the collection holds another index. SearchBackendUnavailable: Milvus is unreachable.
    """
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"--index-type must be one of {INDEX_TYPES}, got {index_type!r}")
    index_dir = Path(index_dir).resolve()
    manifest = mf.Manifest.read(index_dir)
    mf.verify_checksums(index_dir, manifest)
    version, n, dim = manifest.version, manifest.sequences, int(manifest.counts["dim"])
    width = fold_width(dim)
    if width < dim:
        log.info("%d-dim fingerprints: folded into %d dims for Milvus", dim, width)
    client = client_for(target)
    name = target.name_for(version)
    try:
        if client.has_collection(name):
            props = client.describe_collection(name).get("properties", {})
            check_identity(props, version, manifest, name)
            vector_type = props.get(VECTOR_TYPE_KEY, "FLOAT_VECTOR")
            width = int(props.get(FOLD_KEY, dim))
        else:
            properties = {VERSION_KEY: version, CONFIG_KEY: _fingerprint_identity(manifest)}
            if width < dim:
                properties[FOLD_KEY] = str(width)
            vector_type = _create(client, name, width, index_type, index_params or {}, properties)
        # Queries need it loaded; a collection may be released after a restart.
        client.load_collection(name)
        inserted = _upload(client, name, index_dir, n, (vector_type, width), batch_size, progress)
        client.flush(name)
        client.alter_collection_properties(name, properties={COMPLETE_KEY: "true"})
    except InfluenceError:
        raise
    except Exception as exc:  # noqa: BLE001 - pymilvus / gRPC failures
        raise SearchBackendUnavailable(
            f"Milvus at {target.uri} failed during the push: {exc}"
        ) from exc
    finally:
        client.close()
    log.info(
        "pushed %s to %s/%s: %d inserted, %d already there",
        index_dir,
        target.uri,
        name,
        inserted,
        n - inserted,
    )
    return {
        "collection": name,
        "inserted": inserted,
        "present": n - inserted,
        "vector_type": vector_type,
    }


def _upload(
    client: Any,
    name: str,
    index_dir: Path,
    n: int,
    vectors: tuple[str, int],
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Insert every id of ``[0, n)`` the collection lacks, a batch at a time, its vector of
    type and width ``vectors``; the count inserted."""
    fingerprints = np.load(index_dir / mf.FINGERPRINTS, mmap_mode="r")
    store = MetadataStore(index_dir / mf.METADATA)
    inserted = 0
    try:
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            rows = client.query(
                name,
                filter=f"id >= {lo} and id < {hi}",
                output_fields=["id"],
                limit=hi - lo,
                consistency_level="Strong",
            )
            present = {int(r["id"]) for r in rows}
            missing = [i for i in range(lo, hi) if i not in present]
            if missing:  # upsert: keyed by id, so even a row the check missed is not doubled
                client.upsert(name, _rows(fingerprints, store, missing, *vectors))
                inserted += len(missing)
            if progress is not None:
                progress(hi - lo, n)
    finally:
        store.close()
    return inserted


def _rows(
    fingerprints: np.ndarray, store: MetadataStore, ids: list[int], vector_type: str, width: int
) -> list[dict[str, Any]]:
    vectors = np.asarray(fingerprints[np.asarray(ids)], dtype=np.float16)
    if width < vectors.shape[1]:
        vectors = fold(vectors, width).astype(np.float16)
    if vector_type != "FLOAT16_VECTOR":
        vectors = vectors.astype(np.float32)
    rows, tokens = [], store.token_ids_many(ids)
    for j, r in enumerate(store.get_many(ids)):
        rows.append(
            {
                "id": int(r.id),
                "fingerprint": vectors[j]
                if vector_type == "FLOAT16_VECTOR"
                else vectors[j].tolist(),
                "text": r.text[:TEXT_CHARS],
                "source": r.source,
                "document_id": None if r.document_id is None else str(r.document_id),
                **{f: int(getattr(r, f)) for f in OFFSET_FIELDS},
                "token_ids": _pack(tokens[j]),
            }
        )
    return rows


def _pack(tokens: list[int]) -> str:
    """Token ids as the metadata store keeps them, base64 (any sequence length fits a VARCHAR)."""
    return base64.b64encode(pack_token_ids(tokens)).decode("ascii")


def check_identity(props: dict[str, Any], version: str, manifest: mf.Manifest, name: str) -> None:
    if props.get(VERSION_KEY) != version or props.get(CONFIG_KEY) != _fingerprint_identity(
        manifest
    ):
        raise ArtifactError(
            f"Milvus collection {name} holds index {props.get(VERSION_KEY)!r}, not this index "
            f"({version}) with its fingerprint config",
            code="milvus_mismatch",
        )
