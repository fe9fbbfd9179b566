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

phi^(t) is computed by the encoder itself: a batch of copies of the example, copy j with
only target t_j in its mask, is projected in one backward pass per chunk (the encoder keeps
examples of a batch separate). Cost: n_targets forward/backward passes of the example,
fine for one example of a few hundred tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from encoder.batching import Example, collate
from encoder.errors import ConfigError, InputError
from encoder.fingerprint import TrackStarEncoder

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


def attribute_tokens(
    encoder: TrackStarEncoder,
    example: Example,
    query_fingerprint: torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK,
    hold: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> TokenAttribution:
    """Split the influence score e_q . e of an example into per-token contributions.

    Args:
        encoder: the encoder that built the index (with its whitener, if any).
        example: the training example (usually ``sequence_example(ids)``).
        query_fingerprint: e_q [d] (or [1, d]), the query's finalized fingerprint.
        chunk: copies per backward pass.
        hold: entered around each backward pass (see ``target_projections``).
    Returns:
        TokenAttribution with contributions [T] summing to the score.
    """
    e_q = query_fingerprint.reshape(-1)
    if e_q.numel() != encoder.dim:
        raise ConfigError(f"query fingerprint has {e_q.numel()} dims, expected {encoder.dim}")
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
