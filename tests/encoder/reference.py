"""A slow, obviously-correct TrackStar reference for tiny models.

Independent of the encoder's fast path: per-example gradients by ``torch.func.grad`` over
``functional_call`` on each example alone (no padding, no hooks), the optimizer correction
on the stored parameter, dense Kronecker projection matrices ``kron(A, B)``, the fitted
basis by numpy's eigh of the summed gradient covariances, the K-FAC pairs and the whitening
by scipy's fractional matrix power.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch.func import functional_call, grad

from encoder.batching import Example
from encoder.projection import projection_pair, sketch_hash


def per_example_grads(model, param_names: list[str], example: Example) -> dict[str, torch.Tensor]:
    """dL/dW for the named parameters, for one example on its own (stored orientation)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids = torch.tensor(example.input_ids)
    mask = torch.tensor(example.target_mask, dtype=torch.float64)

    def loss_fn(tracked: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(
            model, {**params, **tracked}, args=(), kwargs={"input_ids": ids[None]}
        ).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")
        return (nll * mask[1:]).sum()

    return grad(loss_fn)({n: params[n] for n in param_names})


def corrected_grads(model, modules, example, v_hat=None, eps=1e-8) -> dict[str, torch.Tensor]:
    """G~_W [out, in] float64 per module name, for one example on its own."""
    grads = per_example_grads(model, [m.param_name for m in modules], example)
    out = {}
    for m in modules:
        g = grads[m.param_name].double()
        if v_hat is not None:
            g = g / (v_hat[m.param_name].double().sqrt() + eps)
        out[m.name] = g.T if m.transposed else g  # Conv1D stores [in, out]
    return out


def whole_side(w: torch.Tensor, n: int) -> torch.Tensor:
    """A whitening side as its dense [n, n] matrix (a [1] tensor s stands for s I)."""
    return torch.eye(n, dtype=w.dtype, device=w.device) * w if w.numel() == 1 else w


def reference_kfac_roots(model, modules, examples, delta, v_hat=None, eps=1e-8, rel=1e-9) -> dict:
    """Per module (W_out, W_in, bound of W_out, bound of W_in) of the sketch's whitening, by
    numpy/scipy in float64: L = (C / n + delta mean_eig I)^-1/2 (scipy's fractional power) of
    C_out = sum G~ G~^T and C_in = sum G~^T G~; W_out = s L_out, W_in = L_in,
    s = sqrt(tr C_out / n).

    Bounds on |implementation - reference| per entry, when the implementation's C agrees to
    a relative ``rel`` (two float64 gradient paths): x^-1/2 moves by at most
    |f'(lam_min)| ||dC|| = rel ||C|| / (2 lam_min^1.5) (Daleckii-Krein); s by a relative rel;
    plus the float32 storage and scaling (2 u |W|)."""
    grads = [corrected_grads(model, modules, e, v_hat, eps) for e in examples]
    n, out = len(examples), {}
    u = 2.0**-24
    for m in modules:
        gs = [g[m.name].numpy() for g in grads]
        c_out, c_in = sum(g @ g.T for g in gs) / n, sum(g.T @ g for g in gs) / n
        scale = np.sqrt(np.trace(c_out))
        pair = []
        for c, s in ((c_out, scale), (c_in, 1.0)):
            side = c.shape[0]
            damped = c + delta * np.trace(c) / side * np.eye(side)
            vals = np.linalg.eigvalsh(damped)
            mat = s * np.real(scipy.linalg.fractional_matrix_power(damped, -0.5))
            d_root = rel * vals[-1] / (2 * vals[0] ** 1.5)
            pair.append((mat, s * d_root + rel * np.abs(mat).max() + 2 * u * np.abs(mat).max()))
        out[m.name] = (pair[0][0], pair[1][0], pair[0][1], pair[1][1])
    return out


def reference_phi(
    model, modules, example, *, k, seed, v_hat=None, eps=1e-8, plan=None, pairs=None
) -> np.ndarray:
    """phi = concat_W kron(A_W, B_W) vec(G~_W) (or vec(G~_W) for k = 0), float64.

    ``plan`` (module name -> (k_out, k_in) or None = exact) overrides k per module; ``pairs``
    (module name -> (A, B)) gives the projection matrices instead of the seeded Gaussians."""
    grads = corrected_grads(model, modules, example, v_hat, eps)
    parts = []
    for m in modules:
        g = grads[m.name]
        sizes = (k, k) if plan is None else plan[m.name]
        if sizes is None or sizes == (0, 0):
            parts.append(g.reshape(-1).numpy())
        else:
            a, b = projection_pair(seed, m, *sizes) if pairs is None else pairs[m.name]
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            dense = torch.kron(a.double(), b.double())  # [k*k, out*in]
            parts.append((dense @ g.reshape(-1)).numpy())
    return np.concatenate(parts)


def reference_sketch_phi(
    model, modules, example, *, plan, roots, seed, v_hat=None, eps=1e-8
) -> np.ndarray:
    """``projection: sketch``: phi = concat_W S_W vec(W_out G~_W W_in), float64, with S_W the
    dense [d_W, out*in] 0/+-1 matrix of the seeded hash (one nonzero per column) and W the
    whitening sides (a [1] side s = s I); a module kept whole (plan = (out, in)) is
    vec(W_out G~ W_in) itself."""
    grads = corrected_grads(model, modules, example, v_hat, eps)
    parts = []
    for m in modules:
        w_out, w_in = (
            whole_side(w.double(), n)
            for w, n in zip(roots[m.name], (m.out_features, m.in_features), strict=True)
        )
        white = (w_out @ grads[m.name] @ w_in).reshape(-1)
        k_out, k_in = plan[m.name]
        if (k_out, k_in) == (m.out_features, m.in_features):
            parts.append(white.numpy())
            continue
        idx, sign = sketch_hash(seed, m, k_out * k_in)
        dense = torch.zeros(k_out * k_in, white.numel(), dtype=torch.float64)
        dense[idx, torch.arange(white.numel())] = sign.double()
        parts.append((dense @ white).numpy())
    return np.concatenate(parts)


def reference_lambda(
    r_train: list[np.ndarray], r_eval: list[np.ndarray], component: float
) -> float:
    s_t = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in r_train]))[::-1]
    s_e = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in r_eval]))[::-1]
    c = int(component * s_t.size)
    t, e = max(s_t[c], 0.0), max(s_e[c], 0.0)
    return t / (t + e)


def reference_whiten(blocks_train, blocks_eval, lam, delta):
    """Per-block (R + delta mean_eig I)^-1/2 with R = lam R_eval + (1 - lam) R_train."""
    out = []
    for i, t in enumerate(blocks_train):
        r = t if blocks_eval is None else lam * blocks_eval[i] + (1 - lam) * t
        damp = delta * np.trace(r) / r.shape[0]
        out.append(
            np.real(scipy.linalg.fractional_matrix_power(r + damp * np.eye(r.shape[0]), -0.5))
        )
    return out


def block_moments(phis: np.ndarray, dims: list[int]) -> list[np.ndarray]:
    out, s = [], 0
    for d in dims:
        blk = phis[:, s : s + d]
        out.append(blk.T @ blk / phis.shape[0])
        s += d
    return out


def reference_fingerprints(phis: np.ndarray, whiteners, dims, unit_norm=True) -> np.ndarray:
    if whiteners is not None:
        parts, s = [], 0
        for w, d in zip(whiteners, dims, strict=True):
            parts.append(phis[:, s : s + d] @ w)
            s += d
        phis = np.concatenate(parts, axis=1)
    if unit_norm:
        phis = phis / np.linalg.norm(phis, axis=1, keepdims=True)
    return phis
