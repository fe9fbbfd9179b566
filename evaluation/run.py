"""The fact-tracing evaluation end to end: rank, score attribution, tail-patch.

Given a Trainer checkpoint, the corpus it was trained on (one passage = one training
sequence) and fact queries with passage-level ground truth, every method of
``evaluation.methods`` ranks all training sequences for every query; attribution is MRR
and recall@10 against the passages that state the fact (Chang et al. 2024, Section 4.1),
influence is the tail-patch score of the top 1/3/10 (Section 4.2, ``evaluation.tailpatch``).
Progress is reported through an optional callback; the CLI turns it into progress bars.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from encoder.batching import Example, Tokenizer, collate, sequence_example, tokenize_query
from encoder.config import FingerprintConfig
from encoder.errors import InputError, OptimizerStateError
from encoder.fingerprint import TrackStarEncoder
from encoder.model_loading import load_model, load_tokenizer, model_hash
from encoder.optimizer_state import SecondMoments, load_second_moments
from evaluation.corpus import FactQuery, load_queries
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
from evaluation.settings import METHOD_NAMES, METHODS, EvalSettings, Method
from evaluation.stats import PER_QUERY_METRICS, across_seeds, paired_table
from evaluation.tailpatch import (
    TailPatcher,
    completion_logprobs,
    load_trainable_model,
    read_adam_hyper,
)
from indexer.bm25 import BM25Index

log = logging.getLogger(__name__)

TAILPATCH_CUTOFFS = (1, 3, 10)
SATURATED_P = 0.99
SATURATED_LOGP = float(np.log(SATURATED_P))
"""A query whose completion has p >= 0.99 before the tail-patch step is saturated."""


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


ProgressFactory = Callable[[str, int], Progress]


@dataclass
class EvalResult:
    """Everything the report writes: one row per method plus the run's context."""

    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    context: dict[str, Any] = field(default_factory=dict)
    per_query: dict[str, dict[str, Any]] = field(default_factory=dict)
    """method -> {top10, rr_at_10, hit_at_10, tailpatch_top1/3/10}: [Q] values, query order."""
    paired: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """``all`` / ``unsaturated`` queries -> trackstar minus each method (``evaluation.stats``)."""

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows, "settings": self.settings, "context": self.context,
                           "paired": self.paired, "per_query": self.per_query}, indent=2)  # fmt: skip


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    """(passage ids, texts) of a corpus.jsonl ({"id", "text", ...} per line), in file order."""
    ids, texts = [], []
    if not Path(path).is_file():
        raise InputError(f"corpus {path} does not exist", code="corpus_not_found")
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}, line {lineno}: not valid JSON ({exc})", code="invalid_corpus") from None
            if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("text"), str):
                raise InputError(f'{path}, line {lineno}: expected {{"id": ..., "text": str}}', code="invalid_corpus")
            ids.append(str(record["id"]))
            texts.append(record["text"])
    if not ids:
        raise InputError(f"{path} holds no passages")
    return ids, texts


def training_sequences(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each passage as it was trained (evaluation.train): text[:max_len-1] + eos."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(ids[: max_len - 1]) + [tokenizer.eos_token_id] for ids in encoded]


def _second_moments(model_dir: Path, model: torch.nn.Module, estimate: Callable[[], SecondMoments]) -> SecondMoments:
    try:
        return load_second_moments(model_dir, model)
    except OptimizerStateError as exc:
        log.warning("%s; estimating the second moments from the training sequences", exc)
        return estimate()


def _standard_error(values: list[float]) -> float:
    """Standard error of the mean over queries (0.0 for fewer than two)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


@dataclass
class _Run:
    """One evaluation's loaded inputs, shared by its phases."""

    settings: EvalSettings
    model_dir: Path
    model: torch.nn.Module
    tokenizer: Tokenizer
    pad_id: int
    texts: list[str]
    queries: list[FactQuery]
    relevant: list[set[int]]
    sequences: list[list[int]]
    train_examples: list[Example]
    query_examples: list[Example]
    base: FingerprintConfig
    progress: ProgressFactory | None
    timings: dict[str, float] = field(default_factory=dict)

    def bar(self, desc: str, total: int) -> Progress | None:
        return self.progress(desc, total) if self.progress is not None else None


def _load(model_dir: Path, corpus_path: Path, queries_path: Path, settings: EvalSettings,
          progress: ProgressFactory | None) -> _Run:  # fmt: skip
    """Read and check the inputs (a malformed file is reported before the model loads),
    then the model and every example tokenized."""
    passage_ids, texts = read_corpus(corpus_path)
    queries = load_queries(queries_path)[: settings.max_queries]
    if not queries:
        raise InputError(f"{queries_path} holds no queries")
    row_of = {pid: i for i, pid in enumerate(passage_ids)}
    missing = {r for q in queries for r in q.relevant_ids if r not in row_of}
    if missing:
        raise InputError(f"queries name {len(missing)} passages absent from the corpus, e.g. {sorted(missing)[:3]}")
    model = load_model(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    sequences = training_sequences(tokenizer, texts, int(getattr(model.config, "n_positions", 1024)))
    return _Run(settings=settings, model_dir=Path(model_dir), model=model, tokenizer=tokenizer,
                pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, texts=texts,
                queries=queries, relevant=[{row_of[r] for r in q.relevant_ids} for q in queries],
                sequences=sequences, train_examples=[sequence_example(s) for s in sequences],
                query_examples=[tokenize_query(tokenizer, q.prompt, q.completion) for q in queries],
                base=FingerprintConfig(k=settings.k, seed=settings.seed, projection=settings.projection),
                progress=progress)  # fmt: skip


PhiKey = tuple[bool, str, int | None]
"""(correction, projection family, block cap): what a method's phi depends on (``Method.phi_key``)."""


def _projected(run: _Run, methods: list[Method], second_moments: SecondMoments) -> dict[PhiKey, GradientInputs]:
    """phi of every training and query example, once per (correction, projection) setting
    (R, whitening and normalization are cheap on top)."""
    settings, phis = run.settings, {}
    keys = {m.phi_key(run.base) for m in methods if m.kind == "gradient"}
    keys |= {(True, run.base.projection, run.base.max_block)} if any(m.kind == "hybrid" for m in methods) else set()
    for correction, projection, max_block in sorted(keys, key=lambda k: (k[0], k[1], k[2] or 0), reverse=True):
        config = replace(run.base, correction=correction, projection=projection, max_block=max_block)  # type: ignore[arg-type]
        enc = TrackStarEncoder(run.model, config, second_moments=second_moments if correction else None)
        label = ("corrected" if correction else "uncorrected") + ("" if projection == run.base.projection else f", {projection}")
        label += "" if max_block == run.base.max_block else f", block {max_block}"
        pb = run.bar(f"gradients ({label})", len(run.train_examples) + len(run.query_examples))
        tick = pb.update if pb is not None else None
        start = time.perf_counter()
        fit_basis(enc, run.train_examples, pad_id=run.pad_id, batch_size=settings.batch_size)  # a pass more (sketch)
        train_phi = project_all(enc, run.train_examples, pad_id=run.pad_id, batch_size=settings.batch_size, on_batch=tick)
        query_phi = project_all(enc, run.query_examples, pad_id=run.pad_id, batch_size=settings.batch_size, on_batch=tick)
        if pb is not None:
            pb.close()
        run.timings[f"fingerprints_{label.replace(', ', '_')}_s"] = time.perf_counter() - start
        phis[(correction, projection, max_block)] = GradientInputs(train_phi, query_phi)
    return phis


def _rankings(run: _Run, methods: list[Method], second_moments: SecondMoments,
              phis: dict[PhiKey, GradientInputs]) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:  # fmt: skip
    """Each method's ranking [Q, depth] of the training sequences, and each gradient
    method's lambda per fold."""
    folds, chosen = fold_of(len(run.queries), run.settings.seed), set(run.settings.methods)
    depth = max(TAILPATCH_CUTOFFS + (10,))
    rankings: dict[str, np.ndarray] = {}
    lambdas: dict[str, list[float]] = {}
    start = time.perf_counter()
    for m in methods:
        if m.kind == "gradient":
            rankings[m.name], lambdas[m.name] = rank_gradient(m, run.base, run.model, second_moments,
                                                              phis[m.phi_key(run.base)], folds, depth)  # fmt: skip
    if any(m.kind in ("bm25", "hybrid") for m in methods):
        bm25_deep = rank_bm25(BM25Index.build(run.texts), [q.prompt + q.completion for q in run.queries], FUSION_DEPTH)
        if "bm25" in chosen:
            rankings["bm25"] = bm25_deep[:, :depth]
        if "hybrid" in chosen:
            trackstar = next(m for m in METHODS if m.name == "trackstar")
            ts_deep, _ = rank_gradient(trackstar, run.base, run.model, second_moments, phis[trackstar.phi_key(run.base)],
                                       folds, FUSION_DEPTH)  # fmt: skip
            rankings["hybrid"] = rank_hybrid(bm25_deep, ts_deep, depth)
    if "random" in chosen:
        rankings["random"] = rank_random(len(run.queries), len(run.texts), depth, run.settings.seed)
    run.timings["ranking_s"] = time.perf_counter() - start
    return rankings, lambdas


def _tailpatch(run: _Run, rankings: dict[str, np.ndarray], second_moments: SecondMoments) -> tuple[TailPatcher, dict[tuple[int, int], float]]:
    """Tail-patch every (query, sequence) pair any method put in its top 10, plus the
    passages that state the fact (the oracle reference)."""
    pairs: dict[int, set[int]] = {}
    for ranking in rankings.values():
        for qi, ranked in enumerate(ranking):
            for sid in ranked[: max(TAILPATCH_CUTOFFS)].tolist():
                pairs.setdefault(int(sid), set()).add(qi)
    for qi, rel in enumerate(run.relevant):
        for sid in rel:
            pairs.setdefault(sid, set()).add(qi)
    s = run.settings
    patcher = TailPatcher(load_trainable_model(run.model_dir), second_moments=second_moments, lr=s.tailpatch_lr,
                          optimizer=s.tailpatch_optimizer, hyper=read_adam_hyper(run.model_dir), pad_id=run.pad_id)  # fmt: skip
    pb = run.bar("tail-patch", len(pairs))
    start = time.perf_counter()
    tp = patcher.scores(run.query_examples, dict(enumerate(run.sequences)), {i: sorted(q) for i, q in pairs.items()},
                        on_sequence=pb.update if pb is not None else None)  # fmt: skip
    if pb is not None:
        pb.close()
    run.timings["tailpatch_s"] = time.perf_counter() - start
    return patcher, tp


def _scored(run: _Run, methods: list[Method], rankings: dict[str, np.ndarray], tp: dict[tuple[int, int], float],
            unsaturated: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:  # fmt: skip
    """One row per method (attribution and tail-patch metrics) and its per-query values."""
    rows, per_query = [], {}
    for m in methods:
        ranking = rankings[m.name]
        row: dict[str, Any] = {"method": m.name, "description": m.description}
        row.update(attribution_metrics(ranking, run.relevant))
        values: dict[str, Any] = {
            "top10": ranking[:, :10].tolist(),
            "rr_at_10": [reciprocal_rank(r, rel, 10) for r, rel in zip(ranking, run.relevant, strict=True)],
            "hit_at_10": [hit_at(r, rel, 10) for r, rel in zip(ranking, run.relevant, strict=True)],
        }
        for c in TAILPATCH_CUTOFFS:
            tps = [float(np.mean([tp[(qi, int(s))] for s in r[:c]])) for qi, r in enumerate(ranking)]
            values[f"tailpatch_top{c}"] = tps
            row[f"tailpatch_top{c}"] = float(np.mean(tps))
            row[f"tailpatch_top{c}_se"] = _standard_error(tps)
            row[f"tailpatch_top{c}_unsaturated"] = float(np.mean([tps[i] for i in unsaturated])) if unsaturated.size else float("nan")
        per_query[m.name] = values
        rows.append(row)
    return rows, per_query


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
    run = _load(model_dir, corpus_path, queries_path, settings, progress)

    def estimate() -> SecondMoments:
        enc = TrackStarEncoder(run.model, run.base, second_moments=None)
        batches = [collate(run.train_examples[i : i + settings.batch_size], run.pad_id)
                   for i in range(0, len(run.train_examples), settings.batch_size)]  # fmt: skip
        return enc.estimate_second_moments(batches)

    second_moments = _second_moments(Path(model_dir), run.model, estimate)
    phis = _projected(run, methods, second_moments)
    rankings, lambdas = _rankings(run, methods, second_moments, phis)
    method_dims = {m.name: int(phis[m.phi_key(run.base)].train.shape[1]) for m in methods if m.kind == "gradient"}
    patcher, tp = _tailpatch(run, rankings, second_moments)
    # Saturation: a completion already certain before the step cannot gain log-probability.
    base_logp = completion_logprobs(patcher.model, run.query_examples, run.pad_id)
    unsaturated = np.flatnonzero(base_logp < SATURATED_LOGP)
    rows, per_query = _scored(run, methods, rankings, tp, unsaturated)
    paired = {
        "all": paired_table(per_query, "trackstar", seed=settings.seed),
        "unsaturated": paired_table(per_query, "trackstar", rows=unsaturated.tolist(), seed=settings.seed),
    }
    oracle = float(np.mean([np.mean([tp[(qi, s)] for s in rel]) for qi, rel in enumerate(run.relevant)]))
    run.timings["total_s"] = time.perf_counter() - t0

    from evaluation.train import fact_accuracy

    context = {
        "model_dir": str(model_dir),
        "model_hash": model_hash(model_dir),
        "n_train_sequences": len(run.texts),
        "n_queries": len(run.queries),
        "fingerprint_dim": TrackStarEncoder(run.model, run.base, second_moments=second_moments).dim,
        "method_dims": method_dims,
        "second_moments_source": second_moments.source,
        "fact_accuracy": fact_accuracy(run.model, run.tokenizer, run.queries),
        "oracle_tailpatch_relevant": oracle,
        "saturated_fraction": float(1.0 - unsaturated.size / len(run.queries)),
        "saturated_threshold": f"p(completion | prompt) >= {SATURATED_P}",
        "base_logprob": base_logp.tolist(),
        "n_tailpatch_pairs": len(tp),
        "lambdas_by_fold": lambdas,
        "timings": run.timings,
    }
    log.info("evaluated %d methods on %d queries in %.1fs", len(methods), len(run.queries), run.timings["total_s"])
    return EvalResult(rows=rows, settings=asdict(settings), context=context, per_query=per_query, paired=paired)


def combine_seeds(results: list[EvalResult]) -> EvalResult:
    """One result over several projection seeds: rows hold each value's mean and its
    standard deviation over seeds (``_sd``); paired statistics use each query's value
    averaged over seeds; ``context["by_seed"]`` keeps every seed's rows and lambdas."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    per_query: dict[str, dict[str, Any]] = {}
    for method in first.per_query:
        per_query[method] = {"top10_by_seed": [r.per_query[method]["top10"] for r in results]}
        for metric in PER_QUERY_METRICS:
            per_query[method][metric] = np.mean([r.per_query[method][metric] for r in results], axis=0).tolist()
    base = np.mean([r.context["base_logprob"] for r in results], axis=0)
    unsaturated = np.flatnonzero(base < SATURATED_LOGP).tolist()
    seed = int(first.settings["seed"])
    paired = {"all": paired_table(per_query, "trackstar", seed=seed),
              "unsaturated": paired_table(per_query, "trackstar", rows=unsaturated, seed=seed)}  # fmt: skip
    context = dict(first.context)
    context["seeds"] = [r.settings["seed"] for r in results]
    context["by_seed"] = [{"seed": r.settings["seed"], "rows": r.rows, "lambdas_by_fold": r.context["lambdas_by_fold"]}
                          for r in results]  # fmt: skip
    settings = dict(first.settings, seed=context["seeds"])
    return EvalResult(rows=across_seeds([r.rows for r in results]), settings=settings, context=context,
                      per_query=per_query, paired=paired)  # fmt: skip
