"""Fused optimizer correction + left projection for the exact path on CUDA (Triton).

The exact path forms each example's weight gradient G [out, in] (float32), scales it by the
optimizer correction S = 1 / (sqrt(v_hat) + eps) and projects it: A (G o S) B^T. In plain
torch that is three passes over G: the product that writes it, an in-place multiply that
reads and writes it, and A @ G that reads it (16 bytes per entry). This kernel applies S
while it reads G for A @ (G o S), so G is read once (8 bytes per entry with the write):
the pass is memory-bound, so the traffic saved is the time saved.

    C[c] = A @ (G[c] o S)     A [k, out], G [n, out, in], S [out, in]  ->  C [n, k, in]

Arithmetic is float32 throughout (``input_precision="ieee"``: no TF32 rounding).
Selected by ``available()``, which checks the kernel against torch on first use and falls
back to torch (with a warning) if Triton is missing or disagrees.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch; CPU-only installs do without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

_CHECKED: dict[str, bool] = {}

if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]  # triton's decorator is untyped
    def _scale_project_kernel(  # type: ignore[no-untyped-def]  # triton types its arguments itself
        a_ptr, g_ptr, s_ptr, c_ptr,
        out_dim, in_dim,
        stride_ak, stride_ao,
        stride_gn, stride_go, stride_gi,
        stride_so, stride_si,
        stride_cn, stride_ck, stride_ci,
        K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        pid_i = tl.program_id(0)
        n = tl.program_id(1)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_k = tl.arange(0, K)
        mask_i = offs_i < in_dim
        acc = tl.zeros((K, BLOCK_I), dtype=tl.float32)
        for o0 in range(0, out_dim, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            mask_o = offs_o < out_dim
            gs_mask = mask_o[:, None] & mask_i[None, :]
            g = tl.load(g_ptr + n * stride_gn + offs_o[:, None] * stride_go + offs_i[None, :] * stride_gi,
                        mask=gs_mask, other=0.0)  # fmt: skip
            s = tl.load(s_ptr + offs_o[:, None] * stride_so + offs_i[None, :] * stride_si, mask=gs_mask, other=0.0)
            a = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_o[None, :] * stride_ao,
                        mask=mask_o[None, :], other=0.0)  # fmt: skip
            acc += tl.dot(a, g * s, input_precision="ieee")
        tl.store(c_ptr + n * stride_cn + offs_k[:, None] * stride_ck + offs_i[None, :] * stride_ci,
                 acc, mask=mask_i[None, :])  # fmt: skip


def _launch(a: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    k, out_dim = a.shape
    n, _, in_dim = g.shape
    k_pad = max(16, triton.next_power_of_2(k))
    if k_pad != k:
        a = torch.cat([a, a.new_zeros(k_pad - k, out_dim)])
    c = torch.empty(n, k_pad, in_dim, device=g.device, dtype=torch.float32)
    block_i, block_o = 128, 32
    grid = (triton.cdiv(in_dim, block_i), n)
    _scale_project_kernel[grid](
        a, g, s, c, out_dim, in_dim,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), g.stride(2),
        s.stride(0), s.stride(1), c.stride(0), c.stride(1), c.stride(2),
        K=k_pad, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=4,
    )  # fmt: skip
    return c[:, :k]


def scale_project(a: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``A @ (G o S)``: a [k, out], g [n, out, in], s [out, in] float32 -> [n, k, in].

    A kernel that fails here (Triton compiles a variant per new shape and stride pattern)
    is switched off for the device with a warning and torch answers instead: a fast path
    must never fail a request.
    """
    if available(g.device):
        try:
            return _launch(a, g, s)
        except Exception as exc:  # noqa: BLE001 - compile/launch failure: fall back
            log.warning("fused scale+project kernel failed (%s); torch is used from now on", exc)
            _CHECKED[str(g.device)] = False
    return a @ (g * s)


def available(device: torch.device) -> bool:
    """Triton present, a CUDA device, and the kernel agrees with torch (checked once)."""
    if triton is None or device.type != "cuda":
        return False
    key = str(device)
    if key not in _CHECKED:
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(12, 200, generator=gen, device=device)
            g = torch.randn(3, 200, 333, generator=gen, device=device)
            s = torch.rand(200, 333, generator=gen, device=device)
            ref = torch.einsum("ko,noi->nki", a.double(), g.double() * s.double())
            got = _launch(a, g, s).double()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            _CHECKED[key] = err < 1e-5
            if not _CHECKED[key]:
                log.warning("fused scale+project kernel disagrees with torch (rel %.2e): not used", err)
        except Exception as exc:  # noqa: BLE001 - any compile/launch failure means "use torch"
            log.warning("fused scale+project kernel unavailable (%s): torch is used", exc)
            _CHECKED[key] = False
    return _CHECKED[key]
