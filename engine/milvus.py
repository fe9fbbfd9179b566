"""Searching a published index on Milvus (``influence serve --milvus``): the vector search and
the results' metadata of a collection that ``indexer.milvus.push`` filled.

A collection of another index (version or fingerprint config) is refused at open; Milvus
down or slower than the target's timeout is ``SearchBackendUnavailable`` (503). An
approximate collection's candidates are re-ranked exactly against the stored fingerprints.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from api.errors import ArtifactError, InfluenceError
from indexer import manifest as mf
from indexer.metadata import ExampleRecord, in_order, records_in_order, unpack_token_ids
from indexer.milvus import (
    COMPLETE_KEY,
    FOLD_KEY,
    INDEX_TYPE_KEY,
    MAX_TOP_K,
    RECORD_FIELDS,
    VECTOR_TYPE_KEY,
    MilvusTarget,
    SearchBackendUnavailable,
    check_identity,
    client_for,
    fold,
)


class MilvusSearch:
    """Inner-product top-k through a Milvus collection pushed from the served index: the
    vector-search interface of ``TorchFlatSearch`` (``search(vectors, k)``).

    Opening checks that the collection records this index's version and fingerprint
    config, holds all ``n`` vectors and was pushed to the end, then loads it.
    """

    def __init__(
        self,
        target: MilvusTarget,
        version: str,
        manifest: mf.Manifest,
        fingerprints: np.ndarray | None = None,
        candidates: int | None = None,
    ) -> None:
        self.target = target
        self.name = target.name_for(version)
        self.n = manifest.sequences
        self.fingerprints = fingerprints
        """The stored fingerprints: an approximate collection's candidates are re-ranked
        exactly against them (``indexer.exact.rerank_exact``), as a local approximate index's are."""
        self.candidates = candidates
        """Candidates re-ranked per query for an approximate collection (default 10 x k)."""
        self.index_type = "FLAT"
        self._client = client_for(target)
        try:
            if not self._client.has_collection(self.name):
                raise ArtifactError(
                    f"Milvus at {target.uri} has no collection {self.name}: run "
                    f"`influence index push` first",
                    code="milvus_mismatch",
                )
            props = self._client.describe_collection(self.name).get("properties", {})
            check_identity(props, version, manifest, self.name)
            if props.get(COMPLETE_KEY) != "true":
                raise ArtifactError(
                    f"the push to Milvus collection {self.name} did not finish: rerun "
                    f"`influence index push`",
                    code="milvus_mismatch",
                )
            self.vector_type = props.get(VECTOR_TYPE_KEY, "FLOAT_VECTOR")
            self.index_type = props.get(INDEX_TYPE_KEY, "FLAT")
            self.fold_width = int(props.get(FOLD_KEY, 0))
            self._client.load_collection(self.name)
        except InfluenceError:
            self._client.close()
            raise
        except Exception as exc:  # noqa: BLE001
            self._client.close()
            raise SearchBackendUnavailable(f"Milvus at {target.uri}: {exc}") from exc

    @classmethod
    def attach(
        cls, target: MilvusTarget, name: str, n: int, vector_type: str = "FLOAT_VECTOR"
    ) -> MilvusSearch:
        """The search of a loaded collection not pushed from an index (no identity to
        check): benchmarks on synthetic vectors."""
        self = cls.__new__(cls)
        self.target, self.name, self.n, self.vector_type = target, name, n, vector_type
        self.fingerprints, self.candidates, self.index_type = None, None, "FLAT"
        self.fold_width = 0
        self._client = client_for(target)
        return self

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """scores [Q, k] float32 descending, ids [Q, k] int64 (-1 and -inf pad). An
        approximate or folded collection's top ``candidates`` are re-ranked exactly."""
        from indexer.exact import rerank_exact

        q = np.asarray(vectors, dtype=np.float32)
        exact = self.index_type == "FLAT" and not self.fold_width
        stored = None if exact else self.fingerprints
        wanted = (
            max(k, self.candidates if self.candidates is not None else 10 * k)
            if stored is not None
            else k
        )
        limit = min(wanted, self.n, MAX_TOP_K)
        folded = fold(q, self.fold_width) if self.fold_width else q
        if stored is not None and (self.candidates is None or self.candidates > 0):
            return rerank_exact(q, self._top(folded, limit, limit)[1], stored, k)
        return self._top(folded, min(limit, k), k)

    def _top(self, q: np.ndarray, limit: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Milvus's top ``limit`` per query, in arrays ``width`` wide (-1 / -inf padded)."""
        data = (
            [row.astype(np.float16) for row in q]
            if self.vector_type == "FLOAT16_VECTOR"
            else q.tolist()
        )
        params = {"metric_type": "IP", "params": {"nprobe": 16, "ef": max(128, limit)}}
        try:
            hits = self._client.search(
                self.name,
                data=data,
                anns_field="fingerprint",
                limit=limit,
                output_fields=["id"],
                search_params=params,
                timeout=self.target.timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - down, slow, or refusing: retry later
            raise SearchBackendUnavailable(f"Milvus search failed: {exc}") from exc
        scores = np.full((len(q), width), -np.inf, dtype=np.float32)
        ids = np.full((len(q), width), -1, dtype=np.int64)
        for r, row in enumerate(hits):
            for c, hit in enumerate(row[:limit]):
                scores[r, c], ids[r, c] = float(hit["distance"]), int(hit["id"])
        return scores, ids

    def metadata(self) -> MilvusMetadata:
        """The collection's metadata reads, on this search's client."""
        return MilvusMetadata(self)

    @property
    def backend(self) -> str:
        where = (
            f"Milvus Lite in this process ({self.target.uri})"
            if self.target.lite
            else f"Milvus at {self.target.uri}"
        )
        return f"{where}, collection {self.name} ({self.index_type}, {self.vector_type})"

    def check_ready(self) -> None:
        """Raise ``SearchBackendUnavailable`` when the collection cannot be searched now."""
        try:
            self._client.get_load_state(self.name, timeout=min(2.0, self.target.timeout_s))
        except Exception as exc:  # noqa: BLE001
            raise SearchBackendUnavailable(
                f"Milvus at {self.target.uri} is not answering: {exc}"
            ) from exc

    def close(self) -> None:
        self._client.close()


class MilvusMetadata:
    """The metadata store's reads (``get_many``, ``token_ids``) from the collection: what a
    served result shows comes from Milvus with its vector."""

    def __init__(self, search: MilvusSearch) -> None:
        self._search = search

    def _query(self, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        s = self._search
        try:
            return list(
                s._client.query(s.name, ids=ids, output_fields=fields, timeout=s.target.timeout_s)
            )
        except Exception as exc:  # noqa: BLE001
            raise SearchBackendUnavailable(f"Milvus query failed: {exc}") from exc

    def get_many(self, ids: list[int]) -> list[ExampleRecord]:
        """Records for ``ids`` in the given order (``NotFoundError`` for an unknown id)."""

        def fetch(chunk: list[int]) -> list[ExampleRecord]:
            return [
                ExampleRecord(*(row[f] for f in RECORD_FIELDS))
                for row in self._query(chunk, list(RECORD_FIELDS))
            ]

        return records_in_order(ids, fetch, chunk=1000)

    def token_ids(self, id: int) -> list[int]:  # noqa: A002 - the store's key
        return self.token_ids_many([id])[0]

    def token_ids_many(self, ids: list[int]) -> list[list[int]]:
        """Token ids of sequences ``ids``, in order, one query per 1000 ids."""

        def fetch(chunk: list[int]) -> list[tuple[int, list[int]]]:
            out = []
            for row in self._query(chunk, ["id", "token_ids"]):
                if row.get("token_ids") is None:
                    raise ArtifactError(
                        f"the Milvus collection holds no token ids for sequence {row['id']}: push "
                        "the index again",
                        code="milvus_mismatch",
                    )
                out.append((int(row["id"]), unpack_token_ids(base64.b64decode(row["token_ids"]))))
            return out

        return in_order(ids, fetch, chunk=1000)

    def count(self) -> int:
        return self._search.n

    def close(self) -> None:
        """Nothing of its own to close: the search's client is closed with the search."""
