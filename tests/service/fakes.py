"""A small stand-in implementing ``engine.protocols.Index`` (mypy checks it), for service
tests of batching, auth, errors and metrics that need no model.

Its encoder is deterministic per (prompt, completion), independent of batch mates, so the
batcher's correctness (no mixed results) is checkable; search is exact inner product.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from api.errors import ArtifactError, InputError, NotFoundError
from encoder.batching import Example, tokenize_query
from encoder.generation import Generated, Generation
from engine.protocols import Attribution, Index, Summary
from indexer.bm25 import BM25Index


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
    """One token per character; BOS id 0, no pad or EOS."""

    bos_token_id: int | None = 0
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __call__(
        self, text: str, add_special_tokens: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        return {"input_ids": [1 + (ord(c) % 97) for c in text]}

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        return "".join(chr(96 + int(i)) for i in token_ids)


class FakeIndex:
    """``n`` random unit fingerprints in ``d`` dims; sources alternate ``a``/``b``.

    Args:
        index_dir: reported directory; ``seed`` makes a different "build".
        encode_delay_s: sleep per encode call (to make batches and queues observable).
        encode_gate: called with the call's batch size inside each encode call, before it
            returns (a test blocks there on an event to order what happens meanwhile).
    """

    def __init__(
        self,
        index_dir: Path,
        *,
        n: int = 200,
        d: int = 16,
        seed: int = 0,
        encode_delay_s: float = 0.0,
        encode_gate: Callable[[int], None] | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((n, d)).astype(np.float32)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self._index_dir = Path(index_dir)
        self._size = n
        self.d = d
        self._version = f"fake{seed:04d}"
        self.seed = seed
        self._tokenizer = CharTokenizer()
        self._lexical = BM25Index.build([self._record(i).text for i in range(n)])
        self.encode_delay_s = encode_delay_s
        self.encode_gate = encode_gate
        self.encode_calls: list[int] = []
        self.closed = False
        self._lock = threading.Lock()

    @property
    def index_dir(self) -> Path:
        return self._index_dir

    @property
    def version(self) -> str:
        return self._version

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_tokens(self) -> int | None:
        return None

    @property
    def tokenizer(self) -> CharTokenizer:
        return self._tokenizer

    @property
    def lexical(self) -> BM25Index:
        return self._lexical

    @property
    def idle_s(self) -> float:
        return float("inf")

    def summary(self) -> Summary:
        return Summary(
            model="fake-model",
            model_hash="0" * 8,
            index_version=self.version,
            index_dir=self.index_dir,
            size=self.size,
            counts={"sequences": self.size},
            fingerprint={"k": 0, "seed": self.seed},
            faiss="Flat",
            built_at=None,
            backend="fake exact inner product",
        )

    def encode_queries(
        self, pairs: list[tuple[str, str]], max_tokens: int | None = None
    ) -> np.ndarray:
        return self.encode_examples(
            [tokenize_query(self.tokenizer, p, c, max_tokens=max_tokens) for p, c in pairs]
        )

    def encode_examples(self, examples: list[Example]) -> np.ndarray:
        if self.closed:
            raise RuntimeError("encode on a closed index")
        with self._lock:
            self.encode_calls.append(len(examples))
        time.sleep(self.encode_delay_s)
        if self.encode_gate is not None:
            self.encode_gate(len(examples))
        out = np.empty((len(examples), self.d), dtype=np.float32)
        for i, example in enumerate(examples):
            key = repr((example.input_ids, example.target_mask)).encode()
            digest = hashlib.sha256(key).digest()
            v = np.random.default_rng(list(digest[:8])).standard_normal(self.d)
            out[i] = v / np.linalg.norm(v)
        return out

    def generate(self, prompt_ids: list[int], options: Generation) -> Generated:
        """Deterministic "generation": tokens 1, 2, 3, ... up to ``max_new_tokens``."""
        ids = tuple(1 + t % 26 for t in range(options.max_new_tokens))
        return Generated(
            ids=ids, finish_reason="length", seed=options.seed, prompt_ids=tuple(prompt_ids)
        )

    @property
    def default_rescore(self) -> int:
        return 0  # like a whitened index

    def rescore(self, example: Example, ids: list[int]) -> np.ndarray:
        """Exact scores are the stored ones (a fake has no projection noise)."""
        vector = self.encode_examples([example])[0]
        return self.vectors[np.asarray(ids, dtype=np.int64)] @ vector

    def exact_scorer(self, example: Example) -> Callable[[list[int]], np.ndarray]:
        vector = self.encode_examples([example])[0]
        return lambda ids: self.vectors[np.asarray(ids, dtype=np.int64)] @ vector

    def exact_scorers(
        self, examples: list[Example], pools: Sequence[Collection[int] | None]
    ) -> list[Callable[[list[int]], np.ndarray]]:
        return [self.exact_scorer(e) for e in examples]  # nothing to share: no passes

    def score_sd(self, vector: np.ndarray, ids: list[int]) -> np.ndarray | None:
        return None  # like a whitened index: no projection-noise model

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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

    def examples(self, ids: list[int]) -> list[Record]:
        return [self.example(int(i)) for i in ids]

    def example(self, id: int) -> Record:  # noqa: A002 - the contract's name
        if not 0 <= int(id) < self.size:
            raise NotFoundError(f"no example with id {id}", id=int(id))
        return self._record(int(id))

    def token_ids(self, id: int) -> list[int]:  # noqa: A002 - the contract's name
        return list(self.tokenizer(self.example(id).text)["input_ids"])

    def attribute(
        self,
        query: Example,
        id: int,
        input_ids: list[int],
        *,
        busy: bool,
        exact: bool = False,  # noqa: A002
    ) -> Attribution:
        raise InputError("the fake index has no model to explain with", code="explain_unavailable")

    def check_unchanged(self) -> None:
        """A fake index has no files."""

    def close(self) -> None:
        self.closed = True


def _conforms(fake: FakeIndex) -> Index:
    return fake  # mypy: FakeIndex implements the Protocol


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
