"""The products the encoder's hot path is made of: per-example gradients in memory-bounded
chunks, the factored product A G B^T over tokens, and the precision the device allows (TF32, float32
outputs of bf16 products)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from encoder.modules import TrackedModule

GRADIENT_BUDGET_BYTES = 256 << 20
"""Per-module memory for materialized per-example gradients; larger batches are chunked."""
CUDA_GRADIENT_BUDGET_BYTES = 1 << 30
"""The same on CUDA: fewer, larger products (``encoder.memory`` measures the peak it causes
when it sizes batches)."""


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow TF32 CUDA matmuls inside the block ; restores the flag."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        yield
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


def gradient_chunk(m: TrackedModule, acts: torch.Tensor, element_size: int | None = None) -> int:
    """Examples whose [out, in] gradients fit ``GRADIENT_BUDGET_BYTES`` together."""
    size = element_size or acts.element_size()
    budget = CUDA_GRADIENT_BUDGET_BYTES if acts.device.type == "cuda" else GRADIENT_BUDGET_BYTES
    return max(1, budget // (m.out_features * m.in_features * size))


def example_gradients(
    m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor
) -> Iterator[torch.Tensor]:
    """Per-example gradients [b, out, in] of acts [B, T, in] and grads [B, T, out], in
    chunks that fit ``gradient_chunk``."""
    chunk = gradient_chunk(m, acts)
    for s in range(0, acts.shape[0], chunk):
        yield torch.einsum("bto,bti->boi", grads[s : s + chunk], acts[s : s + chunk])


def thin(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ m^T over the last axis, or x * s for a [1] tensor s standing for s I (a side too
    long to whiten: never made dense)."""
    return x * m.to(x.dtype) if m.numel() == 1 else x @ m.T


def factored_phi(
    acts: torch.Tensor, grads: torch.Tensor, a_mat: torch.Tensor, b_mat: torch.Tensor
) -> torch.Tensor:
    """phi_W = sum_t (A g_t)(B a_t)^T = A G_W B^T per example, without forming any [out, in]
    gradient: acts [B, T, in], grads [B, T, out], A [k_out, out], B [k_in, in] -> [B, k_out*k_in]
    (row-major vec of A G B^T); a [1] side s stands for s I."""
    left = thin(grads, a_mat)  # [B, T, k_out]
    right = thin(acts, b_mat)  # [B, T, k_in]
    return torch.bmm(left.transpose(1, 2), right).flatten(1)


def factored_products(
    acts: torch.Tensor, grads: torch.Tensor, a_mat: torch.Tensor, b_mat: torch.Tensor, lowp: bool
) -> torch.Tensor:
    """``factored_phi``; on the low-precision path the thin projections take the bf16
    tensors directly and write float32 ([B, T, k] each), the rest is float32."""
    if not lowp:
        return factored_phi(acts, grads, a_mat, b_mat)
    bsz, t = acts.shape[:2]

    def narrow(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if m.numel() == 1:
            return (x.float() * m.float()).reshape(bsz * t, -1)
        return torch.mm(x.reshape(bsz * t, -1), m.to(x.dtype).T, out_dtype=torch.float32)

    left, right = narrow(grads, a_mat), narrow(acts, b_mat)
    return torch.bmm(left.view(bsz, t, -1).transpose(1, 2), right.view(bsz, t, -1)).flatten(1)


def out_dtype_products(device: torch.device) -> bool:
    """Whether mm/bmm on this device take bf16 inputs with a float32 ``out_dtype``
    (probed once per device)."""
    return _probe_out_dtype(str(device))


@functools.cache
def _probe_out_dtype(device: str) -> bool:
    try:
        x = torch.ones(1, 2, 2, device=device, dtype=torch.bfloat16)
        torch.bmm(x, x, out_dtype=torch.float32)
        torch.mm(x[0], x[0], out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True
