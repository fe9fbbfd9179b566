"""Exact inner products with the stored float16 fingerprints: the re-rank of an approximate
index's candidates and brute-force top-k (the reference for recall)."""

from __future__ import annotations

import numpy as np

RERANK_GATHER_BYTES = 64 << 20
"""Re-rank block size: queries per block x candidates x d x 4 bytes stays under this."""
RERANK_BLOCK_ROWS = 256
"""Candidate rows widened to float32 at a time in the re-rank (256 x 4096 x 4 B = 4 MiB)."""


def dot_rows(queries: np.ndarray, fingerprints: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """queries [Q, d] float32 times fingerprints[ids] [U, d] -> [Q, U] float32.

    Rows are read (one read per id, ``ids`` ascending for sequential access) and widened
    to float32 in blocks of ``RERANK_BLOCK_ROWS`` that stay in cache, with torch: numpy's
    float16 -> float32 conversion is a scalar loop (slower than the PQ scan that found the
    candidates), torch's is vectorized; widening all U rows at once page-faults a fresh
    U x d x 4 buffer instead.
    """
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    out = torch.empty((q.shape[0], len(ids)), dtype=torch.float32)
    for s in range(0, len(ids), RERANK_BLOCK_ROWS):
        rows = torch.from_numpy(np.ascontiguousarray(fingerprints[ids[s : s + RERANK_BLOCK_ROWS]]))
        out[:, s : s + RERANK_BLOCK_ROWS] = q @ rows.to(torch.float32).T
    return out.numpy()


def rerank_exact(
    queries: np.ndarray, candidate_ids: np.ndarray, fingerprints: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact e_q . e_t over each query's candidates, all queries at once; the top k.

    The union of all candidates is read once, in id order (sequential reads from the
    memory map); duplicate candidates of a query count once; ties go to the lower id.

    Args:
        queries: [Q, d] float32 unit vectors.
        candidate_ids: [Q, C] int64 ids from the approximate index (-1 = none).
        fingerprints: [N, d] float16 stored fingerprints (may be memory-mapped).
        k: results per query.
    Returns:
        scores [Q, k] float32 (descending), ids [Q, k] int64 (-1 / -inf padded).
    """
    n_q, n_c = candidate_ids.shape
    scores = np.full((n_q, k), -np.inf, dtype=np.float32)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    if n_q == 0 or n_c == 0:
        return scores, ids
    cand = np.sort(candidate_ids, axis=1)  # -1 first; duplicates become neighbours
    valid = cand >= 0
    valid[:, 1:] &= cand[:, 1:] != cand[:, :-1]
    exact = np.full((n_q, n_c), -np.inf, dtype=np.float32)
    step = max(1, RERANK_GATHER_BYTES // (n_c * fingerprints.shape[1] * 4))
    for s in range(0, n_q, step):  # bounded memory; one block for typical batches
        block, ok = cand[s : s + step], valid[s : s + step]
        if not ok.any():
            continue
        uniq, pos = np.unique(block[ok], return_inverse=True)  # [U], [V]
        slot = np.zeros(block.shape, dtype=np.int64)
        slot[ok] = pos
        # All products [q, U], then each query keeps its own candidates' columns.
        every = dot_rows(queries[s : s + step], fingerprints, uniq)
        exact[s : s + step] = np.where(ok, np.take_along_axis(every, slot, axis=1), -np.inf)
    top = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # [Q, k'] with k' = min(k, C)
    top_s = np.take_along_axis(exact, top, axis=1)
    top_i = np.where(np.isfinite(top_s), np.take_along_axis(cand, top, axis=1), -1)
    scores[:, : top.shape[1]], ids[:, : top.shape[1]] = top_s, top_i
    return scores, ids


def exact_top_k(
    fingerprints: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536
) -> np.ndarray:
    """Brute-force top-k ids [Q, k] over float16 fingerprints [N, d], in row chunks."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for s in range(0, fingerprints.shape[0], chunk):
        sc = queries @ np.asarray(fingerprints[s : s + chunk], dtype=np.float32).T
        all_s = np.concatenate([best_s, sc], axis=1)
        all_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(s, s + sc.shape[1]), sc.shape)], axis=1
        )
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(all_s, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    return best_i
