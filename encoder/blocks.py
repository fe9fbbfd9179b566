"""One module's fingerprint block phi_W from its activations and output gradients.

Which block a module gets follows from its projection and its optimizer correction, and is
chosen once, when the encoder's projections or second moments are set:

    Factored  sum_t (A g_t)(B a_t)^T: a projected module without correction, or with the
              rank-1 correction folded into A', B' (encoder/factored.py); no G_W is formed.
    Exact     per-example G_W (memory-bounded chunks), times 1/(sqrt(v_hat) + eps) (Adam's
              second moments) when corrected, then A G B^T when projected.

``Precision`` (how the products run on the device) is chosen once per encoder too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoder import fused
from encoder.modules import TrackedModule
from encoder.products import factored_products, gradient_chunk, out_dtype_products, tf32


@dataclass(frozen=True)
class Precision:
    """How the hot path multiplies.

    Attributes:
        tf32: TF32 per-example gradient products. bf16/fp16 activations and gradients are
            exact in TF32 (<= 10-bit mantissa) and their products exact in float32, so
            this changes nothing but speed (accumulation stays float32).
        low_precision_products: hand the bf16 tensors to the products themselves, which
            write float32 (``out_dtype``): no float32 copies of activations and gradients;
            the factored path's thin projections are then rounded to the model dtype.
        fused_correction: apply the correction while A reads G (``encoder.fused``, Triton).
    """

    tf32: bool = False
    low_precision_products: bool = False
    fused_correction: bool = False

    @classmethod
    def default_for(cls, device: torch.device, dtype: torch.dtype) -> Precision:
        """The fastest exact choice for a model of ``dtype`` on ``device``."""
        half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        fusable = device.type == "cuda" and dtype != torch.float64 and fused.available(device)
        return cls(tf32=half, low_precision_products=half and out_dtype_products(device), fused_correction=fusable)


@dataclass(frozen=True)
class Factored:
    """phi_W = sum_t (A g_t)(B a_t)^T, G_W never formed."""

    a: torch.Tensor
    b: torch.Tensor
    low_precision: bool

    def __call__(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return factored_products(acts, grads, self.a, self.b, self.low_precision)

    def direction(self, u: torch.Tensor) -> torch.Tensor:
        """V_W = A^T U_W B for the block u of a fingerprint-space vector."""
        v: torch.Tensor = self.a.T @ u.view(self.a.shape[0], self.b.shape[0]) @ self.b
        return v


@dataclass(frozen=True)
class Exact:
    """phi_W = vec(A (C o G_W) B^T) per example, C = 1/(sqrt(v_hat) + eps) when corrected
    (``inv``), A, B when projected (``proj``)."""

    module: TrackedModule
    inv: torch.Tensor | None
    proj: tuple[torch.Tensor, torch.Tensor] | None
    precision: Precision

    def __call__(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        lowp = self.precision.low_precision_products
        fuse = self.precision.fused_correction and self.inv is not None and self.proj is not None
        chunk = gradient_chunk(self.module, acts, 4 if lowp else None)
        parts = []
        for s in range(0, acts.shape[0], chunk):
            g = self._gradients(acts[s : s + chunk], grads[s : s + chunk], lowp)
            if fuse and g.dtype == torch.float32:
                assert self.inv is not None and self.proj is not None
                # Correction applied while A reads G (encoder/fused.py): one pass over G.
                parts.append((fused.scale_project(self.proj[0], g, self.inv) @ self.proj[1].T).flatten(1))
                continue
            if self.inv is not None:
                g.mul_(self.inv)
            if self.proj is not None:
                g = self.proj[0] @ g @ self.proj[1].T
            parts.append(g.flatten(1))
        return torch.cat(parts)

    def _gradients(self, acts: torch.Tensor, grads: torch.Tensor, lowp: bool) -> torch.Tensor:
        """Per-example G [b, out, in]: exact bf16 products into float32 on the fast path."""
        if lowp:
            return torch.bmm(grads.transpose(1, 2), acts, out_dtype=torch.float32)
        with tf32(self.precision.tf32):
            return torch.einsum("bto,bti->boi", grads, acts)

    def direction(self, u: torch.Tensor) -> torch.Tensor:
        """V_W = C o (A^T U_W B) (C o U_W without projection)."""
        if self.proj is not None:
            v = self.proj[0].T @ u.view(self.proj[0].shape[0], self.proj[1].shape[0]) @ self.proj[1]
        else:
            v = u.view(self.module.out_features, self.module.in_features)
        return v * self.inv if self.inv is not None else v


Block = Factored | Exact
