"""A small stand-in with the ``InfluenceIndex`` read interface (docs/architecture.md), for
service tests of batching, auth, errors and metrics that need no model.

Its encoder is deterministic per (prompt, completion), independent of batch mates, so the
batcher's correctness (no mixed results) is checkable; search is exact inner product.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoder.batching import tokenize_query
from encoder.errors import ArtifactError, NotFoundError


@dataclass(frozen=True)
class Record:
    id: int
    text: str
    source: str
    document_id: str
    token_start: int = 0
    token_end: int = 0
    char_start: int = 0
    char_end: int = 0


class CharTokenizer:
    """One token per character; BOS id 0."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + (ord(c) % 97) for c in text]}


class FakeIndex:
    """``n`` random unit fingerprints in ``d`` dims; sources alternate ``a``/``b``.

    Args:
        index_dir: reported directory; ``seed`` makes a different "build".
        encode_delay_s: sleep per encode call (to make batches and queues observable).
    """

    def __init__(
        self,
        index_dir: Path,
        *,
        n: int = 200,
        d: int = 16,
        seed: int = 0,
        encode_delay_s: float = 0.0,
    ) -> None:
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((n, d)).astype(np.float32)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.index_dir = Path(index_dir)
        self.size = n
        self.d = d
        self.version = f"fake{seed:04d}"
        self.manifest = {
            "model": {"id": "fake-model", "hash": "0" * 8},
            "fingerprint": {"k": 0, "seed": seed},
            "faiss": {"factory": "Flat"},
            "counts": {"examples": n},
        }
        self.tokenizer = CharTokenizer()
        self.encode_delay_s = encode_delay_s
        self.encode_calls: list[int] = []
        self.closed = False
        self._lock = threading.Lock()

    def encode_queries(self, pairs, max_tokens=None) -> np.ndarray:
        return self.encode_examples(
            [tokenize_query(self.tokenizer, p, c, max_tokens=max_tokens) for p, c in pairs]
        )

    def encode_examples(self, examples) -> np.ndarray:
        if self.closed:
            raise RuntimeError("encode on a closed index")
        with self._lock:
            self.encode_calls.append(len(examples))
        time.sleep(self.encode_delay_s)
        out = np.empty((len(examples), self.d), dtype=np.float32)
        for i, example in enumerate(examples):
            key = repr((example.input_ids, example.target_mask)).encode()
            digest = hashlib.sha256(key).digest()
            v = np.random.default_rng(list(digest[:8])).standard_normal(self.d)
            out[i] = v / np.linalg.norm(v)
        return out

    def score_sd(self, vector, ids):
        return None  # like a whitened index: no projection-noise model

    def search(self, vectors, k, *, rerank=True):
        if self.closed:
            raise RuntimeError("search on a closed index")
        scores = vectors @ self.vectors.T  # [Q, n]
        kk = min(k, self.size)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        out_s = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(vectors), k), -1, dtype=np.int64)
        out_s[:, :kk] = np.take_along_axis(scores, order, axis=1)
        out_i[:, :kk] = order
        return out_s, out_i

    def _record(self, i: int) -> Record:
        return Record(i, f"training example {i} " * 3, "a" if i % 2 == 0 else "b", f"doc{i // 4}")

    def examples(self, ids):
        return [self._record(int(i)) for i in ids]

    def example(self, i: int) -> Record:
        if not 0 <= int(i) < self.size:
            raise NotFoundError(f"no example with id {i}", id=int(i))
        return self._record(int(i))

    def check_unchanged(self) -> None:
        """A fake index has no files."""

    def close(self) -> None:
        self.closed = True


class FakeOpener:
    """Opens ``FakeIndex`` objects; a directory containing a file ``BAD`` is refused."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.opened: list[FakeIndex] = []

    def __call__(self, index_dir: Path) -> FakeIndex:
        index_dir = Path(index_dir)
        if (index_dir / "BAD").exists():
            raise ArtifactError(f"{index_dir}: checksum mismatch", code="checksum_mismatch")
        seed = int((index_dir / "SEED").read_text()) if (index_dir / "SEED").exists() else 0
        index = FakeIndex(index_dir, seed=seed, **self.kwargs)
        self.opened.append(index)
        return index
