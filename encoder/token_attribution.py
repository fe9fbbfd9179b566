"""Per-token attribution of an influence score: which tokens of a training example matter.

Decomposition (chosen over loss terms, not input positions). The loss of an example is a
sum of per-target NLL terms, L = sum_t l_t (DESIGN.md). The gradient, the optimizer
correction (elementwise division by a constant), the projection and the whitening are all
linear, so the projected gradient splits exactly:

    phi = sum_t phi^(t),   phi^(t) = A (dl_t/dW / (sqrt(v_hat) + eps)) B^T   (per module)

and with the fingerprint e = R^-1/2 phi / ||R^-1/2 phi|| the score against a query
fingerprint e_q splits into

    score = e_q . e = sum_t c_t,   c_t = e_q . (R^-1/2 phi^(t)) / ||R^-1/2 phi||.

c_t answers "how much does predicting token t push the score"; it is signed, and the
tokens' contributions sum exactly (up to float rounding) to the score. Token 0 is never a
target and gets 0. Without whitening (hessian none) R^-1/2 = I; without unit norm
(ablation) the denominator is 1.

Since everything after the gradient is linear, c_t is a directional derivative:
c_t = <V, dl_t/dW> / ||R^-1/2 phi|| with V the weight-space direction of R^-1/2 e_q
(``TrackStarEncoder.weight_directions``). One forward-mode pass (``torch.func.jvp``) along V
gives it for every target at once, so an explanation costs one encode pass plus one JVP.
The reference (and the fallback where an op lacks forward-mode AD) computes each phi^(t)
with the encoder itself: copies of the example, copy j with only target t_j in its mask,
one backward pass per chunk of copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from api.errors import ConfigError, InputError
from encoder.batching import Example, collate
from encoder.fingerprint import TrackStarEncoder

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 32
"""Copies of the example projected per backward pass."""


@dataclass(frozen=True)
class TokenAttribution:
    """Per-token contributions to one (query, example) influence score.

    Attributes:
        input_ids: the example's token ids x_1..x_T.
        contributions: [T] float64; contributions[t] is c_t for target tokens, 0 elsewhere.
        score: sum of the contributions = e_q . e (the influence score).
        fingerprint: [d] the example's fingerprint e, rebuilt from its parts.
    """

    input_ids: tuple[int, ...]
    contributions: torch.Tensor
    score: float
    fingerprint: torch.Tensor


def target_projections(
    encoder: TrackStarEncoder,
    example: Example,
    *,
    chunk: int = DEFAULT_CHUNK,
    hold: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> tuple[list[int], torch.Tensor]:
    """phi^(t) for each target token t of an example (corrected, projected, not whitened).

    Args:
        encoder: the encoder that built the index.
        example: the example; its targets are decomposed one by one.
        chunk: copies per backward pass (bounds memory).
        hold: entered around each backward pass (a server passes its model lock, so
            other queries run between the passes of a long explanation).
    Returns:
        (positions, phi_parts): the target positions t (ascending) and phi_parts
        [n_targets, d] in the encoder's accumulation dtype, summing to ``encoder.project``
        of the whole example.
    """
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    positions = [t for t, on in enumerate(example.target_mask) if on]
    if not positions:
        raise InputError("the example has no target tokens to attribute", code="no_targets")
    n = len(example.input_ids)
    parts = []
    for s in range(0, len(positions), chunk):
        copies = [
            Example(example.input_ids, tuple(i == t for i in range(n)))
            for t in positions[s : s + chunk]
        ]
        with hold():
            parts.append(encoder.project(collate(copies)))
    return positions, torch.cat(parts)


def target_derivatives(
    model: torch.nn.Module, example: Example, directions: dict[str, torch.Tensor]
) -> torch.Tensor:
    """d NLL(x_t) / d eps along W + eps V for every position t, in one forward-mode pass.

    The tracked weights are swapped for dual tensors (weight, V) for the pass and restored
    after it: the caller holds the model, as for any pass.

    Args:
        model: the causal LM (its weights are not changed).
        example: the sequence x_1..x_T.
        directions: parameter name -> V (stored orientation).
    Returns:
        [T - 1] float64: entry t - 1 belongs to the target token at position t.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([example.input_ids], device=device)
    owners = {}
    for name in directions:
        path, _, attr = name.rpartition(".")
        owners[name] = (model.get_submodule(path), attr)
    saved = {name: getattr(mod, attr) for name, (mod, attr) in owners.items()}
    # The fused SDPA kernels have no forward-mode derivative; the math kernel does.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), forward_ad.dual_level():
        try:
            for name, (mod, attr) in owners.items():
                delattr(mod, attr)
                setattr(mod, attr, forward_ad.make_dual(saved[name].detach(), directions[name]))
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            tangent = forward_ad.unpack_dual(nll).tangent
        finally:
            for name, (mod, attr) in owners.items():
                if attr in mod.__dict__:
                    delattr(mod, attr)
                setattr(mod, attr, saved[name])
    if tangent is None:  # no tracked weight reaches the loss
        return torch.zeros(len(example.input_ids) - 1, dtype=torch.float64)
    derivatives: torch.Tensor = tangent.double()
    return derivatives


def attribute_tokens(
    encoder: TrackStarEncoder,
    example: Example,
    query_fingerprint: torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK,
    hold: Callable[[], AbstractContextManager[object]] = nullcontext,
    method: str = "jvp",
) -> TokenAttribution:
    """Split the influence score e_q . e of an example into per-token contributions.

    ``method="jvp"`` (default): c_t = d NLL(x_t) along the weight direction of R^-1/2 e_q
    (``TrackStarEncoder.weight_directions``), all targets in one forward-mode pass, plus
    one encode pass for the norm; ``"copies"``: phi of each target's loss from its own
    backward pass (``target_projections``), the reference. Both give the same numbers.

    Args:
        encoder: the encoder that built the index (with its whitener, if any).
        example: the training example (usually ``sequence_example(ids)``).
        query_fingerprint: e_q [d] (or [1, d]), the query's finalized fingerprint.
        chunk: copies per backward pass.
        hold: entered around each pass over the model (see ``target_projections``).
        method: ``jvp`` or ``copies``.
    Returns:
        TokenAttribution with contributions [T] summing to the score.
    """
    e_q = query_fingerprint.reshape(-1)
    if e_q.numel() != encoder.dim:
        raise ConfigError(f"query fingerprint has {e_q.numel()} dims, expected {encoder.dim}")
    if method == "jvp":
        try:
            return _attribute_by_jvp(encoder, example, e_q, hold)
        except (NotImplementedError, RuntimeError) as exc:  # an op without forward-mode AD
            log.info("forward-mode attribution unavailable (%s); one pass per target instead", exc)
    positions, phi_parts = target_projections(encoder, example, chunk=chunk, hold=hold)
    white_parts = phi_parts.double()
    if encoder.config.hessian != "none":
        if encoder.whitener is None:
            raise ConfigError("hessian is on but the encoder has no whitener")
        white_parts = encoder.whitener.apply(white_parts)
    total = white_parts.sum(0)  # R^-1/2 phi [d]
    norm = total.norm() if encoder.config.unit_norm else torch.ones((), dtype=total.dtype)
    norm = norm.clamp_min(torch.finfo(total.dtype).tiny)
    per_target = (white_parts @ e_q.to(white_parts)) / norm  # [n_targets]
    contributions = torch.zeros(len(example.input_ids), dtype=torch.float64)
    contributions[torch.tensor(positions)] = per_target.cpu()
    return TokenAttribution(
        input_ids=tuple(example.input_ids),
        contributions=contributions,
        score=float(contributions.sum()),
        fingerprint=(total / norm).cpu(),
    )


def _attribute_by_jvp(
    encoder: TrackStarEncoder,
    example: Example,
    e_q: torch.Tensor,
    hold: Callable[[], AbstractContextManager[object]],
) -> TokenAttribution:
    """``attribute_tokens`` with c_t from one forward-mode pass (see there)."""
    mask = torch.tensor(example.target_mask[1:], dtype=torch.bool)
    if not mask.any():
        raise InputError("the example has no target tokens to attribute", code="no_targets")
    whitener = encoder.whitener if encoder.config.hessian != "none" else None
    if encoder.config.hessian != "none" and whitener is None:
        raise ConfigError("hessian is on but the encoder has no whitener")
    with hold():
        phi = encoder.project(collate([example]))[0].double()
    total = whitener.apply(phi[None])[0] if whitener is not None else phi
    norm = total.norm() if encoder.config.unit_norm else torch.ones((), dtype=total.dtype)
    norm = norm.clamp_min(torch.finfo(total.dtype).tiny)
    # c_t = (R^-1/2 phi_t) . e_q / norm = phi_t . (R^-1/2 e_q) / norm: R^-1/2 is symmetric.
    u = e_q.double().to(total.device)
    if whitener is not None:
        u = whitener.apply(u[None])[0]
    directions = encoder.weight_directions(u)
    with hold():
        derivatives = target_derivatives(encoder.model, example, directions)
    contributions = torch.zeros(len(example.input_ids), dtype=torch.float64)
    contributions[1:] = torch.where(
        mask, derivatives.cpu(), torch.zeros((), dtype=torch.float64)
    ) / float(norm)
    return TokenAttribution(
        input_ids=tuple(example.input_ids),
        contributions=contributions,
        score=float(contributions.sum()),
        fingerprint=(total / norm).cpu(),
    )
