"""The attribution methods compared in the fact-tracing evaluation, and their rankings.

Gradient methods are TrackStar and its ablations (Chang et al. 2024, Table 1 / Section 5),
all computed with ``encoder.fingerprint.TrackStarEncoder`` and ranked by exact
(brute-force) dot products over every training sequence:

    trackstar       correction, R = mixed (lambda rule of App. A.1.3), unit norm
    no_correction   no optimizer second-moment correction
    r_train_only    R = R_train (no task-specific mixing)
    no_hessian      no R at all (hessian none)
    no_unit_norm    no final normalization (a whitened dot product)
    grad_dot        plain projected gradient dot product (no correction, no R, no norm)
    grad_cosine     the same with unit norm (TRAK-like, no correction)

Lexical and combined methods: ``bm25`` (bm25s over the sequence texts, query = prompt +
completion) and ``hybrid`` (reciprocal-rank fusion of bm25 and the product's fingerprint,
``settings.HYBRID_GRADIENT``, as the service's hybrid mode fuses them; c = 60, over the
top ``FUSION_DEPTH`` of each). ``random`` is the floor: a seeded random ranking per query.

R_eval for the mixed methods comes from the queries themselves, with a 2-fold split: the
queries of one fold are scored with a whitener whose R_eval was estimated on the other
fold, so no query's own gradient enters the R it is scored with (the paper uses a separate
set of task queries for the same reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoder.batching import Example, collate
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.optimizer_state import SecondMoments
from encoder.whitening import Whitener
from engine.fusion import reciprocal_rank_fusion
from evaluation.settings import Method
from indexer.bm25 import BM25Index

log = logging.getLogger(__name__)

FUSION_DEPTH = 100
N_FOLDS = 2


def _by_length(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def fit_basis(
    encoder: TrackStarEncoder, examples: Sequence[Example], *, pad_id: int, batch_size: int
) -> None:
    """Fit the encoder's family state on ``examples`` if it needs one (the sketch's whitening)."""
    if encoder.needs_fit:
        encoder.fit_basis(
            collate([examples[i] for i in idx], pad_id) for idx in _by_length(examples, batch_size)
        )


def project_all(
    encoder: TrackStarEncoder,
    examples: Sequence[Example],
    *,
    pad_id: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """phi (corrected, projected, not whitened) of every example, batched by length.

    Args:
        encoder: the encoder whose correction setting applies.
        examples: N examples.
        pad_id: padding id.
        batch_size: examples per backward pass.
        on_batch: called with the number of examples done in each batch (progress).
    Returns:
        phi [N, d] float32 on the CPU, in the order of ``examples``.
    """
    out = torch.zeros(len(examples), encoder.dim, dtype=torch.float32)
    for idx in _by_length(examples, batch_size):
        phi = encoder.project(collate([examples[i] for i in idx], pad_id))
        out[idx] = phi.float().cpu()
        if on_batch is not None:
            on_batch(len(idx))
    return out


def fold_of(n_queries: int, seed: int) -> np.ndarray:
    """[Q] fold index in {0, .., N_FOLDS-1}, a seeded balanced assignment."""
    rng = np.random.default_rng(seed)
    folds = np.arange(n_queries) % N_FOLDS
    rng.shuffle(folds)
    return folds


def _topk(scores: torch.Tensor, k: int) -> np.ndarray:
    """Ids of the k highest scores per row of [Q, N]; [Q, min(k, N)] int64."""
    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy().astype(np.int64)


@dataclass
class GradientInputs:
    """phi of training sequences and queries for one correction setting."""

    train: torch.Tensor  # [N, d]
    queries: torch.Tensor  # [Q, d]


def rank_gradient(
    method: Method,
    base: FingerprintConfig,
    model: torch.nn.Module,
    second_moments: SecondMoments | None,
    phi: GradientInputs,
    folds: np.ndarray,
    depth: int,
) -> tuple[np.ndarray, list[float]]:
    """Rank all training sequences for every query with one gradient method.

    Args:
        method: a ``gradient`` method.
        base: the fingerprint config shared by all methods (k, seed, modules, delta).
        model: the frozen model (only used to build the encoder's module blocks).
        second_moments: the checkpoint's Adam state (used when the method corrects).
        phi: training [N, d] and query [Q, d] phi with the method's correction setting.
        folds: [Q] fold of each query (R_eval comes from the other fold).
        depth: ranking length.
    Returns:
        (ids [Q, depth] int64, the lambda of each fold's whitener; [] without R).
    """
    scores, lambdas = gradient_scores(method.config(base), model, second_moments, phi, folds)
    return _topk(scores, depth), lambdas


def gradient_scores(
    config: FingerprintConfig,
    model: torch.nn.Module,
    second_moments: SecondMoments | None,
    phi: GradientInputs,
    folds: np.ndarray,
) -> tuple[torch.Tensor, list[float]]:
    """Scores of every query against every training sequence under one fingerprint config.

    Returns:
        (scores [Q, N], the lambda of each fold's whitener; [] without R).
    """
    encoder = TrackStarEncoder(
        model, config, second_moments=second_moments if config.correction else None
    )
    if config.hessian == "none":
        return encoder.finalize(phi.queries) @ encoder.finalize(phi.train).T, []
    scores = torch.zeros(phi.queries.shape[0], phi.train.shape[0], dtype=phi.train.dtype)
    train_stats = encoder.new_statistics()
    train_stats.update(phi.train)
    lambdas: list[float] = []
    fold_ids = range(N_FOLDS) if config.hessian == "mixed" else [None]
    for fold in fold_ids:
        eval_stats = None
        if fold is not None:
            eval_stats = encoder.new_statistics()
            eval_stats.update(phi.queries[torch.from_numpy(folds != fold)])
        encoder.set_whitener(
            Whitener.from_statistics(
                train_stats,
                eval_stats,
                lambda_=config.lambda_,
                lambda_component=config.lambda_component,
                delta=config.delta,
            )
        )
        lambdas.append(encoder.whitener.lambda_)  # type: ignore[union-attr]
        rows = torch.from_numpy(
            np.arange(len(folds)) if fold is None else np.flatnonzero(folds == fold)
        )
        if rows.numel() == 0:
            continue
        scores[rows] = (encoder.finalize(phi.queries[rows]) @ encoder.finalize(phi.train).T).to(
            scores.dtype
        )
    return scores, lambdas


def rank_bm25(index: BM25Index, query_texts: Sequence[str], depth: int) -> np.ndarray:
    """BM25 rankings [Q, depth] (ids of the index)."""
    return index.search(query_texts, depth)[1]


def rank_hybrid(bm25: np.ndarray, gradient: np.ndarray, depth: int) -> np.ndarray:
    """Reciprocal-rank fusion of two [Q, >=depth] rankings; [Q, depth]."""
    return np.stack(
        [reciprocal_rank_fusion([b, t], depth)[1] for b, t in zip(bm25, gradient, strict=True)]
    )


def rank_random(n_queries: int, n_train: int, depth: int, seed: int) -> np.ndarray:
    """A seeded random ranking (without repetition) per query; [Q, min(depth, N)]."""
    rng = np.random.default_rng(seed + 1)
    return np.stack([rng.permutation(n_train)[: min(depth, n_train)] for _ in range(n_queries)])
