"""The fact-tracing evaluation end to end: rank, score attribution, tail-patch.

Given a Trainer checkpoint, the corpus it was trained on (one passage = one training
sequence) and fact queries with passage-level ground truth, every method of
``evaluation.methods`` ranks all training sequences for every query; attribution is MRR
and recall@10 against the passages that state the fact (Chang et al. 2024, Section 4.1),
influence is the tail-patch score of the top 1/3/10 (Section 4.2, ``evaluation.tailpatch``).
Progress is reported through an optional callback; the CLI turns it into progress bars.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from api.errors import InputError
from encoder.batching import collate
from encoder.fingerprint import TrackStarEncoder
from encoder.hashing import sha256_file
from encoder.model_loading import model_hash
from encoder.optimizer_state import SecondMoments
from evaluation.inputs import ProgressFactory, Run, load_run, second_moments_for, standard_error
from evaluation.methods import (
    FUSION_DEPTH,
    GradientInputs,
    fit_basis,
    fold_of,
    project_all,
    rank_bm25,
    rank_gradient,
    rank_hybrid,
    rank_random,
)
from evaluation.metrics import attribution_metrics, hit_at, reciprocal_rank
from evaluation.results import SATURATED_LOGP, SATURATED_P, EvalResult
from evaluation.settings import HYBRID_GRADIENT, METHOD_NAMES, METHODS, EvalSettings, Method
from evaluation.stats import paired_tables, strata_rows
from evaluation.tailpatch import (
    TailPatcher,
    completion_logprobs,
    load_trainable_model,
    read_adam_hyper,
)
from indexer.bm25 import BM25Index

log = logging.getLogger(__name__)

TAILPATCH_CUTOFFS = (1, 3, 10)


PhiKey = tuple[bool, str, int | None, bool]
"""(correction, projection family, block cap, whitening): what a method's phi depends on
(``Method.phi_key``)."""


def _hybrid_gradient() -> Method:
    return next(m for m in METHODS if m.name == HYBRID_GRADIENT)


def _projected(
    run: Run, methods: list[Method], second_moments: SecondMoments
) -> dict[PhiKey, GradientInputs]:
    """phi of every training and query example, once per (correction, projection) setting
    (R, whitening and normalization are cheap on top)."""
    settings, phis = run.settings, {}
    keys = {m.phi_key(run.base) for m in methods if m.kind == "gradient"}
    if any(m.kind == "hybrid" for m in methods):
        keys.add(_hybrid_gradient().phi_key(run.base))
    for correction, projection, max_block, whiten in sorted(
        keys, key=lambda k: (k[0], k[1], k[2] or 0, k[3]), reverse=True
    ):
        config = replace(
            run.base,
            correction=correction,
            projection=projection,
            max_block=max_block,
            whiten=whiten,
        )
        enc = TrackStarEncoder(
            run.model, config, second_moments=second_moments if correction else None
        )
        label = ("corrected" if correction else "uncorrected") + (
            "" if projection == run.base.projection else f", {projection}"
        )
        label += "" if max_block == run.base.max_block else f", block {max_block}"
        label += ", whitened" if whiten else ""
        pb = run.bar(f"gradients ({label})", len(run.train_examples) + len(run.query_examples))
        tick = pb.update if pb is not None else None
        start = time.perf_counter()
        fit_basis(
            enc, run.train_examples, pad_id=run.pad_id, batch_size=settings.batch_size
        )  # a pass more (sketch)
        train_phi = project_all(
            enc,
            run.train_examples,
            pad_id=run.pad_id,
            batch_size=settings.batch_size,
            on_batch=tick,
        )
        query_phi = project_all(
            enc,
            run.query_examples,
            pad_id=run.pad_id,
            batch_size=settings.batch_size,
            on_batch=tick,
        )
        if pb is not None:
            pb.close()
        run.timings[f"fingerprints_{label.replace(', ', '_')}_s"] = time.perf_counter() - start
        phis[(correction, projection, max_block, whiten)] = GradientInputs(train_phi, query_phi)
    return phis


def _rankings(
    run: Run,
    methods: list[Method],
    second_moments: SecondMoments,
    phis: dict[PhiKey, GradientInputs],
) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """Each method's ranking [Q, depth] of the training sequences, and each gradient
    method's lambda per fold."""
    folds, chosen = fold_of(len(run.queries), run.settings.seed), set(run.settings.methods)
    depth = max(TAILPATCH_CUTOFFS + (10,))
    rankings: dict[str, np.ndarray] = {}
    lambdas: dict[str, list[float]] = {}
    start = time.perf_counter()
    for m in methods:
        if m.kind == "gradient":
            rankings[m.name], lambdas[m.name] = rank_gradient(
                m, run.base, run.model, second_moments, phis[m.phi_key(run.base)], folds, depth
            )
    if any(m.kind in ("bm25", "hybrid") for m in methods):
        bm25_deep = rank_bm25(
            BM25Index.build(run.texts), [q.prompt + q.completion for q in run.queries], FUSION_DEPTH
        )
        if "bm25" in chosen:
            rankings["bm25"] = bm25_deep[:, :depth]
        if "hybrid" in chosen:
            gradient = _hybrid_gradient()
            deep, _ = rank_gradient(
                gradient,
                run.base,
                run.model,
                second_moments,
                phis[gradient.phi_key(run.base)],
                folds,
                FUSION_DEPTH,
            )
            rankings["hybrid"] = rank_hybrid(bm25_deep, deep, depth)
    for m in methods:
        if m.kind == "shipped":
            from evaluation.shipped import rank_shipped

            start_shipped = time.perf_counter()
            rankings[m.name] = rank_shipped(run, depth, m.projection, m.whiten)
            run.timings[f"{m.name}_s"] = time.perf_counter() - start_shipped
    if "dense" in chosen:
        from evaluation.dense import DenseEncoder, rank_dense

        start_dense = time.perf_counter()
        query_texts = [q.prompt + q.completion for q in run.queries]
        rankings["dense"] = rank_dense(DenseEncoder(), run.texts, query_texts, depth)
        run.timings["dense_s"] = time.perf_counter() - start_dense
    if "random" in chosen:
        rankings["random"] = rank_random(len(run.queries), len(run.texts), depth, run.settings.seed)
    run.timings["ranking_s"] = time.perf_counter() - start
    return rankings, lambdas


def _tailpatch(
    run: Run, rankings: dict[str, np.ndarray], second_moments: SecondMoments
) -> tuple[TailPatcher, dict[tuple[int, int], float]]:
    """Tail-patch every (query, sequence) pair any method put in its top 10, plus the
    passages that state the fact (the oracle reference)."""
    pairs: dict[int, set[int]] = {}
    for ranking in rankings.values():
        for qi, ranked in enumerate(ranking):
            for sid in ranked[: max(TAILPATCH_CUTOFFS)].tolist():
                if sid >= 0:  # -1: a ranking shorter than the cutoff (``shipped``)
                    pairs.setdefault(int(sid), set()).add(qi)
    for qi, rel in enumerate(run.relevant):
        for sid in rel:
            pairs.setdefault(sid, set()).add(qi)
    s = run.settings
    patcher = TailPatcher(
        load_trainable_model(run.model_dir),
        second_moments=second_moments,
        lr=s.tailpatch_lr,
        optimizer=s.tailpatch_optimizer,
        hyper=read_adam_hyper(run.model_dir),
        pad_id=run.pad_id,
    )
    pb = run.bar("tail-patch", len(pairs))
    start = time.perf_counter()
    tp = patcher.scores(
        run.query_examples,
        dict(enumerate(run.sequences)),
        {i: sorted(q) for i, q in pairs.items()},
        on_sequence=pb.update if pb is not None else None,
    )
    if pb is not None:
        pb.close()
    run.timings["tailpatch_s"] = time.perf_counter() - start
    return patcher, tp


def _scored(
    run: Run,
    methods: list[Method],
    rankings: dict[str, np.ndarray],
    tp: dict[tuple[int, int], float],
    unsaturated: np.ndarray,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """One row per method (attribution and tail-patch metrics) and its per-query values."""
    rows, per_query = [], {}
    for m in methods:
        ranking = rankings[m.name]
        row: dict[str, Any] = {"method": m.name, "description": m.description}
        row.update(attribution_metrics(ranking, run.relevant))
        values: dict[str, Any] = {
            "top10": ranking[:, :10].tolist(),
            "rr_at_10": [
                reciprocal_rank(r, rel, 10) for r, rel in zip(ranking, run.relevant, strict=True)
            ],
            "hit_at_10": [hit_at(r, rel, 10) for r, rel in zip(ranking, run.relevant, strict=True)],
        }
        for c in TAILPATCH_CUTOFFS:
            tps = [
                float(np.mean([tp[(qi, int(s))] if s >= 0 else 0.0 for s in r[:c]]))
                for qi, r in enumerate(ranking)
            ]
            values[f"tailpatch_top{c}"] = tps
            row[f"tailpatch_top{c}"] = float(np.mean(tps))
            row[f"tailpatch_top{c}_se"] = standard_error(tps)
            row[f"tailpatch_top{c}_unsaturated"] = (
                float(np.mean([tps[i] for i in unsaturated])) if unsaturated.size else float("nan")
            )
        per_query[m.name] = values
        rows.append(row)
    return rows, per_query


def _context(
    run: Run,
    model_dir: Path,
    second_moments: SecondMoments,
    method_dims: dict[str, int],
    unsaturated: np.ndarray,
    base_logp: np.ndarray,
    n_pairs: int,
    lambdas: dict[str, list[float]],
) -> dict[str, Any]:
    """What the report states about the run beside the rows."""
    from evaluation.train import fact_accuracy

    return {
        "model_dir": str(model_dir),
        "model_hash": model_hash(model_dir),
        "n_train_sequences": len(run.texts),
        "n_queries": len(run.queries),
        "fingerprint_dim": TrackStarEncoder(run.model, run.base, second_moments=second_moments).dim,
        "method_dims": method_dims,
        "second_moments_source": second_moments.source,
        "fact_accuracy": fact_accuracy(run.model, run.tokenizer, run.queries),
        "saturated_fraction": float(1.0 - unsaturated.size / len(run.queries)),
        "saturated_threshold": f"p(completion | prompt) >= {SATURATED_P}",
        "base_logprob": base_logp.tolist(),
        "n_tailpatch_pairs": n_pairs,
        "lambdas_by_fold": lambdas,
        "timings": run.timings,
    }


def run_evaluation(
    model_dir: Path,
    corpus_path: Path,
    queries_path: Path,
    settings: EvalSettings,
    progress: ProgressFactory | None = None,
) -> EvalResult:
    """Run every selected method on every query and score it.

    Args:
        model_dir: Trainer checkpoint (weights, tokenizer, optimizer.pt).
        corpus_path: corpus.jsonl the model was trained on.
        queries_path: queries.jsonl (fact_id, prompt, completion, relevant_ids).
        settings: the run's settings.
        progress: factory of progress bars (description, total) or None.
    Returns:
        EvalResult with rows {method, description, mrr, recall_at_10, tailpatch_top1/3/10}.
    """
    unknown = set(settings.methods) - set(METHOD_NAMES)
    if unknown:
        raise InputError(f"unknown methods {sorted(unknown)}; choose from {list(METHOD_NAMES)}")
    methods = [m for m in METHODS if m.name in settings.methods]
    t0 = time.perf_counter()
    run = load_run(model_dir, corpus_path, queries_path, settings, progress)

    def estimate() -> SecondMoments:
        enc = TrackStarEncoder(run.model, run.base, second_moments=None)
        batches = [
            collate(run.train_examples[i : i + settings.batch_size], run.pad_id)
            for i in range(0, len(run.train_examples), settings.batch_size)
        ]
        return enc.estimate_second_moments(batches)

    second_moments = second_moments_for(Path(model_dir), run.model, estimate)
    phis = _projected(run, methods, second_moments)
    rankings, lambdas = _rankings(run, methods, second_moments, phis)
    method_dims = {
        m.name: int(phis[m.phi_key(run.base)].train.shape[1])
        for m in methods
        if m.kind == "gradient"
    }
    patcher, tp = _tailpatch(run, rankings, second_moments)
    # Saturation: a completion already certain before the step cannot gain log-probability.
    base_logp = completion_logprobs(patcher.model, run.query_examples, run.pad_id)
    unsaturated = np.flatnonzero(base_logp < SATURATED_LOGP)
    rows, per_query = _scored(run, methods, rankings, tp, unsaturated)
    from evaluation.train import facts_learned

    learned = np.flatnonzero(facts_learned(run.model, run.tokenizer, run.queries)).tolist()
    strata_rows(rows, per_query, learned)
    subsets = {"all": None, "unsaturated": unsaturated.tolist(), "learned": learned}
    paired = paired_tables(per_query, subsets, settings.seed)
    oracle = float(
        np.mean([np.mean([tp[(qi, s)] for s in rel]) for qi, rel in enumerate(run.relevant)])
    )
    run.timings["total_s"] = time.perf_counter() - t0

    context = _context(
        run, model_dir, second_moments, method_dims, unsaturated, base_logp, len(tp), lambdas
    )
    context["oracle_tailpatch_relevant"] = oracle
    context["learned_queries"] = learned
    # The inputs by content: a result names exactly what it was computed from.
    context["corpus_sha256"] = sha256_file(corpus_path)
    context["queries_sha256"] = sha256_file(queries_path)
    log.info(
        "evaluated %d methods on %d queries in %.1fs",
        len(methods),
        len(run.queries),
        run.timings["total_s"],
    )
    return EvalResult(
        rows=rows, settings=asdict(settings), context=context, per_query=per_query, paired=paired
    )
