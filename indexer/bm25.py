"""BM25 over the training sequences' texts (a lexical baseline and the hybrid's other half).

Built with ``bm25s`` (Lucene-style BM25, k1=1.5, b=0.75; lower-cased word tokens, English
stopwords removed, no stemming). Stored in an index directory's ``bm25/`` subfolder next
to the FAISS index, with the sequence ids the rows stand for, so the service can answer
``mode: bm25`` and ``mode: hybrid`` from the same artifacts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np

from api.errors import ArtifactError, InputError
from indexer import manifest as mf

log = logging.getLogger(__name__)

SUBDIR = mf.BM25_DIR
IDS_FILE = mf.BM25_IDS
STOPWORDS = "en"


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


class BM25Index:
    """A bm25s index over sequence texts, addressed by the sequences' integer ids.

    Args:
        retriever: a fitted ``bm25s.BM25``.
        ids: [N] int64, ids[row] is the sequence id of bm25s document ``row``.
    """

    def __init__(self, retriever: bm25s.BM25, ids: np.ndarray) -> None:
        self.retriever = retriever
        self.ids = np.asarray(ids, dtype=np.int64)

    @classmethod
    def build(
        cls, texts: Sequence[str], ids: Sequence[int] | np.ndarray | None = None
    ) -> BM25Index:
        """Index texts.

        Args:
            texts: N sequence texts.
            ids: N sequence ids (default 0..N-1).
        Returns:
            The fitted index.
        Raises:
            InputError: no texts, or ids of another length.
        """
        if len(texts) == 0:
            raise InputError("BM25 needs at least one text to index")
        id_arr = np.arange(len(texts), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if id_arr.shape != (len(texts),):
            raise InputError(f"{len(texts)} texts but {id_arr.shape[0]} ids")
        retriever = bm25s.BM25()
        retriever.index(
            bm25s.tokenize(list(texts), stopwords=STOPWORDS, show_progress=False),
            show_progress=False,
        )
        log.info("BM25 index over %d texts", len(texts))
        return cls(retriever, id_arr)

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def save(self, index_dir: Path) -> Path:
        """Write into ``index_dir/bm25/``; returns that folder."""
        out = Path(index_dir) / SUBDIR
        out.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(out), show_progress=False)
        np.save(out / IDS_FILE, self.ids)
        (out / "info.json").write_text(
            json.dumps(
                {"n": self.size, "stopwords": STOPWORDS, "library": f"bm25s {bm25s.__version__}"}
            )
        )
        return out

    @classmethod
    def load(cls, index_dir: Path) -> BM25Index:
        """Read ``index_dir/bm25/`` (``index_dir`` may also be the bm25 folder itself).

        Raises:
            ArtifactError: the folder holds no BM25 index.
        """
        d = Path(index_dir)
        if (d / SUBDIR / IDS_FILE).is_file():
            d = d / SUBDIR
        if not (d / IDS_FILE).is_file():
            raise ArtifactError(f"{index_dir} holds no BM25 index ({SUBDIR}/{IDS_FILE} missing)")
        try:
            retriever = bm25s.BM25.load(str(d), show_progress=False)
        except Exception as exc:  # noqa: BLE001 - any failure here is a broken artifact
            raise ArtifactError(f"cannot load the BM25 index in {d}: {exc}") from exc
        return cls(retriever, np.load(d / IDS_FILE))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every indexed row for one query text; [N] float32."""
        tokens = _tokenize([query])[0]
        if not tokens:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows per query text, best first (ties broken by the lower row).

        Args:
            queries: Q query texts (for fact tracing: prompt + completion).
            k: results per query.
        Returns:
            (scores [Q, k] float32, ids [Q, k] int64); ids -1 and score -inf pad when the
            index has fewer than k rows.
        """
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        n = min(k, self.size)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        for i, query in enumerate(queries):
            s = self.scores(query)
            top = np.argpartition(-s, n - 1)[:n] if n < self.size else np.arange(self.size)
            order = top[np.lexsort((top, -s[top]))]
            out_scores[i, :n] = s[order]
            out_ids[i, :n] = self.ids[order]
        return out_scores, out_ids


def open_for_index(index_dir: Path, n: int) -> BM25Index:
    """The lexical index of a published index (``index_dir/bm25/``, checksummed with the
    rest), opened with it.

    Raises:
        ArtifactError: the bm25 folder is broken, or covers other rows than the index's n.
    """
    bm25 = BM25Index.load(index_dir)
    if bm25.size != n or not np.array_equal(bm25.ids, np.arange(n)):
        raise ArtifactError(f"{index_dir}/{SUBDIR} covers {bm25.size} rows, the index {n}")
    return bm25
