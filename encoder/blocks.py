"""One module's fingerprint block phi_W from its activations and output gradients.

The fingerprint family (``encoder.families``) picks each module's block once its state is
set; ``dense_block`` picks between the first two:

    Factored  sum_t (A g_t)(B a_t)^T: a module without correction (A, B a projection or a
              whitening, its two sides); no G_W is formed.
    Exact     per-example G_W (memory-bounded chunks), times 1/(sqrt(v_hat) + eps) (Adam's
              second moments) when corrected, then A G B^T when projected.
    Sketched  per-example K-FAC-whitened W_out G~_W W_in (``encoder.families.sketch``), hashed
              into d_W buckets by a CountSketch (``encoder.projection.sketch_hash``).

``Precision`` (how the products run on the device) is chosen once per encoder too.

Every block takes an optional ``sq`` [B] to which it adds each example's squared norm of its
unsketched block (Factored, Exact: of phi_W itself; Sketched: of the whitened gradient before
the hash): where the pair is the family's whitening, the exact second stage's norm
(``encoder.rescoring``), which a build stores so that the second stage never recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoder.modules import TrackedModule
from encoder.products import factored_products, gradient_chunk, out_dtype_products, tf32, thin
from encoder.projection import sketch_hash


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
    """

    tf32: bool = False
    low_precision_products: bool = False

    @classmethod
    def default_for(cls, device: torch.device, dtype: torch.dtype) -> Precision:
        """The fastest exact choice for a model of ``dtype`` on ``device``."""
        half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        return cls(tf32=half, low_precision_products=half and out_dtype_products(device))


def _pull_back(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A^T U B: the weight-space direction of a block U [k_out, k_in] of a pair (A, B), a [1]
    side s standing for s I."""
    left = u * a.to(u.dtype) if a.numel() == 1 else a.T @ u
    return _side(b, left, left=False)


def _pair_dims(m: TrackedModule, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
    """(k_out, k_in) of a pair whose [1] sides keep the module's own size."""
    a, b = pair
    return (
        m.out_features if a.numel() == 1 else a.shape[0],
        m.in_features if b.numel() == 1 else b.shape[0],
    )


@dataclass(frozen=True)
class Factored:
    """phi_W = sum_t (A g_t)(B a_t)^T, G_W never formed; a [1] side s stands for s I."""

    a: torch.Tensor
    b: torch.Tensor
    dims: tuple[int, int]
    low_precision: bool

    def __call__(
        self, acts: torch.Tensor, grads: torch.Tensor, sq: torch.Tensor | None = None
    ) -> torch.Tensor:
        phi = factored_products(acts, grads, self.a, self.b, self.low_precision)
        return _add_norms(phi, sq)

    def direction(self, u: torch.Tensor) -> torch.Tensor:
        """V_W = A^T U_W B for the block u of a fingerprint-space vector."""
        return _pull_back(self.a, self.b, u.view(self.dims))


@dataclass(frozen=True)
class Exact:
    """phi_W = vec(A (C o G_W) B^T) per example, C = 1/(sqrt(v_hat) + eps) when corrected
    (``inv``), A, B when projected (``proj``)."""

    module: TrackedModule
    inv: torch.Tensor | None
    proj: tuple[torch.Tensor, torch.Tensor] | None
    precision: Precision

    def __call__(
        self, acts: torch.Tensor, grads: torch.Tensor, sq: torch.Tensor | None = None
    ) -> torch.Tensor:
        lowp = self.precision.low_precision_products
        chunk = gradient_chunk(self.module, acts, 4 if lowp else None)
        parts = []
        for s in range(0, acts.shape[0], chunk):
            g = self._gradients(acts[s : s + chunk], grads[s : s + chunk], lowp)
            if self.inv is not None:
                g.mul_(self.inv)
            if self.proj is not None:
                g = thin(_side(self.proj[0], g, left=True), self.proj[1])  # A G B^T
            parts.append(g.flatten(1))
        return _add_norms(torch.cat(parts), sq)

    def _gradients(self, acts: torch.Tensor, grads: torch.Tensor, lowp: bool) -> torch.Tensor:
        """Per-example G [b, out, in]: exact bf16 products into float32 on the fast path."""
        if lowp:
            return torch.bmm(grads.transpose(1, 2), acts, out_dtype=torch.float32)
        with tf32(self.precision.tf32):
            return torch.einsum("bto,bti->boi", grads, acts)

    def direction(self, u: torch.Tensor) -> torch.Tensor:
        """V_W = C o (A^T U_W B) (C o U_W without projection)."""
        if self.proj is not None:
            a, b = self.proj
            dims = _pair_dims(self.module, self.proj)
            v = _pull_back(a, b, u.view(dims))
        else:
            v = u.view(self.module.out_features, self.module.in_features)
        return v * self.inv if self.inv is not None else v


def _add_norms(phi: torch.Tensor, sq: torch.Tensor | None) -> torch.Tensor:
    """phi [B, d_W], its rows' squared norms added to ``sq`` [B] when given."""
    if sq is not None:
        sq += phi.square().sum(1).to(sq.dtype)
    return phi


def _side(w: torch.Tensor, x: torch.Tensor, left: bool) -> torch.Tensor:
    """w x (left) or x w for a whitening side w: a symmetric matrix, or the [1] tensor s
    standing for s I (never made dense)."""
    if w.numel() == 1:
        return x * w.to(x.dtype)
    return w.to(x.dtype) @ x if left else x @ w.to(x.dtype)


@dataclass(frozen=True)
class Sketched:
    """phi_W = S vec(W_out G~_W W_in): the K-FAC-whitened (optionally corrected) per-example
    gradient, CountSketched into ``dims`` buckets by ``sketch_hash(seed, module, dims)``:
    ``resident`` (idx, sign) where the family keeps it, else made where it is used.

    Without correction the whitening is applied to the factors (W_out g_t, W_in a_t) before
    G is formed (T (out^2 + in^2) per example instead of out in (out + in)); with it, C o G
    comes first and is whitened on both sides.
    """

    module: TrackedModule
    w_out: torch.Tensor
    w_in: torch.Tensor
    seed: int
    resident: tuple[torch.Tensor, torch.Tensor] | None
    dims: int
    inv: torch.Tensor | None
    precision: Precision

    def _hash(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resident is not None:
            return self.resident
        return sketch_hash(self.seed, self.module, self.dims, device)

    def __call__(
        self, acts: torch.Tensor, grads: torch.Tensor, sq: torch.Tensor | None = None
    ) -> torch.Tensor:
        acc = self.w_out.dtype
        acts, grads = acts.to(acc), grads.to(acc)
        if self.inv is None:  # W_out (sum_t g_t a_t^T) W_in = sum_t (W_out g_t)(W_in a_t)^T
            grads, acts = _side(self.w_out, grads, left=False), _side(self.w_in, acts, left=False)
        chunk = gradient_chunk(self.module, acts)
        out = torch.zeros(acts.shape[0], self.dims, dtype=acc, device=acts.device)
        idx, sign = self._hash(acts.device)
        signs = sign.view(self.module.out_features, self.module.in_features)
        for s in range(0, acts.shape[0], chunk):
            with tf32(self.precision.tf32):
                g = torch.einsum("bto,bti->boi", grads[s : s + chunk], acts[s : s + chunk])
            if self.inv is not None:
                g = _side(self.w_in, _side(self.w_out, g.mul_(self.inv), left=True), left=False)
            if sq is not None:
                sq[s : s + chunk] += g.square().sum((1, 2)).to(sq.dtype)
            out[s : s + chunk].index_add_(1, idx, g.mul_(signs).flatten(1))  # g is ours
        return out

    def direction(self, u: torch.Tensor) -> torch.Tensor:
        """V_W = C o (W_out U' W_in), U' = S^T u as [out, in] (u . S x = S^T u . x)."""
        idx, sign = self._hash(u.device)
        back = (u[idx] * sign).view(self.module.out_features, self.module.in_features)
        v = _side(self.w_in, _side(self.w_out, back, left=True), left=False)
        return v * self.inv if self.inv is not None else v


Block = Factored | Exact | Sketched


def dense_block(
    m: TrackedModule,
    inv: torch.Tensor | None,
    pair: tuple[torch.Tensor, torch.Tensor] | None,
    precision: Precision,
) -> Factored | Exact:
    """The block of A (C o G_W) B^T, C = ``inv`` (None: no correction), (A, B) = ``pair`` (None:
    the gradient itself): factored over tokens when nothing breaks G_W = sum_t g_t a_t^T."""
    if inv is None and pair is not None:
        return Factored(*pair, _pair_dims(m, pair), precision.low_precision_products)
    return Exact(m, inv, pair, precision)
