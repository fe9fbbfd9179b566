"""Exact search by brute force with torch, on the GPU(s) when present (placement ``torch``).

FAISS's own GPU indexes need faiss-gpu built for the machine's CUDA; this needs only torch.
Every stored fingerprint is scored, so the answer is exact (recall 1.0) for any query,
including real influence queries, which sit far from every training fingerprint and defeat
IVF cells (README, "Performance and sizing").

On CUDA the float16 fingerprints are split by rows over every visible GPU (``shards``: one
block per device) and scored with float16 inputs and float32 accumulation and output, so
the scores are the exact inner products with the stored float16 values, as FAISS ``Flat``
computes them (it upcasts the same values to float32). On the CPU the block is float32 (a
float16 product there is slow). Memory: N x d x 2 bytes over the GPUs (4 on the CPU).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from api.errors import ConfigError

log = logging.getLogger(__name__)

LOAD_ROWS = 65536
"""Rows copied to a device at a time while loading (bounds the host-side float32 copy)."""


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of float16 inputs, accumulated and returned in float32 (CUDA's ``out_dtype``)."""
    return torch.mm(a, b, out_dtype=torch.float32)


class TorchFlatSearch:
    """Brute-force inner-product top-k over stored fingerprints, on torch devices.

    Args:
        fingerprints: [N, d] float16 (may be memory-mapped).
        devices: where the row blocks go, one block per device, in row order (default: every
            visible CUDA device, else the CPU).
        dtype: storage type of the blocks (default float16 on CUDA, float32 on the CPU).
    """

    def __init__(
        self,
        fingerprints: np.ndarray,
        devices: list[torch.device] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if devices is None:
            n_gpu = torch.cuda.device_count()
            devices = [torch.device(f"cuda:{i}") for i in range(n_gpu)] or [torch.device("cpu")]
        if not devices:
            raise ConfigError("torch search needs at least one device")
        self.n, self.d = int(fingerprints.shape[0]), int(fingerprints.shape[1])
        bounds = np.linspace(0, self.n, len(devices) + 1).round().astype(np.int64)
        self.blocks: list[tuple[int, torch.Tensor]] = []  # (first row id, [n_b, d] tensor)
        for dev, start, stop in zip(devices, bounds[:-1], bounds[1:], strict=True):
            block_dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
            block = torch.empty((int(stop - start), self.d), dtype=block_dtype, device=dev)
            for s in range(int(start), int(stop), LOAD_ROWS):
                e = min(int(stop), s + LOAD_ROWS)
                rows = torch.from_numpy(
                    np.array(fingerprints[s:e], dtype=np.float16)
                )  # a writable copy
                block[s - int(start) : e - int(start)] = rows.to(dev).to(block_dtype)
            self.blocks.append((int(start), block))
        log.info("torch exact search: %d x %d over %s", self.n, self.d, [str(d) for d in devices])

    @property
    def backend(self) -> str:
        return f"torch exact search on {', '.join(str(d) for d in self.devices)}"

    @property
    def devices(self) -> list[torch.device]:
        return [block.device for _, block in self.blocks]

    def _scores(self, q: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """[Q, n_b] float32 inner products, accumulated in float32.

        A float16 block is multiplied in float16 with float32 accumulation and output
        (``out_dtype``, CUDA). The float32 query is split into a float16 head and the
        float16 rounding of its remainder, both multiplied in one product and summed: the
        query then carries ~22 bits instead of 11, so the scores match float32 products with
        the stored values (FAISS Flat's) to ~1e-7 instead of ~1e-4. Where that product is
        missing (the CPU, older torch) the block is upcast LOAD_ROWS rows at a time instead.
        """
        q32 = q.to(block.device)
        if block.dtype == torch.float32:
            return q32 @ block.T
        try:
            head = q32.to(block.dtype)
            tail = (q32 - head.float()).to(block.dtype)
            both = _mm_f32(torch.cat([head, tail]), block.T)  # [2Q, n_b]
            return both[: q32.shape[0]] + both[q32.shape[0] :]
        except (RuntimeError, TypeError, NotImplementedError):
            parts = [
                q32 @ block[s : s + LOAD_ROWS].float().T
                for s in range(0, block.shape[0], LOAD_ROWS)
            ]
            return torch.cat(parts, dim=1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product, best first; ties go to the lower id.

        Args:
            queries: [Q, d] float32.
            k: results per query.
        Returns:
            scores [Q, k] float32 and ids [Q, k] int64; -inf / -1 pad beyond N.
        """
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ConfigError(f"queries must be [Q, {self.d}], got {list(q.shape)}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        n_q = q.shape[0]
        scores = np.full((n_q, k), -np.inf, dtype=np.float32)
        ids = np.full((n_q, k), -1, dtype=np.int64)
        if self.n == 0 or n_q == 0:
            return scores, ids
        part_s, part_i = [], []
        for start, block in self.blocks:
            if block.shape[0] == 0:
                continue
            sc = self._scores(q, block)  # [Q, n_b]
            # Take a few more than k so that ties at the cut are decided by id below.
            top_s, top_i = torch.topk(sc, min(block.shape[0], k + 8), dim=1)
            part_s.append(top_s.float().cpu().numpy())
            part_i.append(top_i.cpu().numpy().astype(np.int64) + start)
        all_s, all_i = np.concatenate(part_s, axis=1), np.concatenate(part_i, axis=1)
        order = np.lexsort((all_i, -all_s), axis=1)[:, :k] if n_q else all_i[:, :0]
        kk = order.shape[1]
        scores[:, :kk] = np.take_along_axis(all_s, order, axis=1)
        ids[:, :kk] = np.take_along_axis(all_i, order, axis=1)
        return scores, ids

    def check_ready(self) -> None:
        """Always ready: the blocks are in memory."""

    def close(self) -> None:
        self.blocks = []  # frees the device memory
