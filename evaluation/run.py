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

from encoder.batching import Example, collate, sequence_example, tokenize_query
from encoder.config import FingerprintConfig
from encoder.errors import InputError, OptimizerStateError
from encoder.fingerprint import TrackStarEncoder
from encoder.model_loading import load_model, load_tokenizer, model_hash
from encoder.optimizer_state import SecondMoments, load_second_moments
from evaluation.corpus import load_queries
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
from evaluation.settings import METHOD_NAMES, METHODS, EvalSettings
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
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # Inputs first: a malformed file is reported before the model is loaded.
    passage_ids, texts = read_corpus(corpus_path)
    queries = load_queries(queries_path)[: settings.max_queries]
    if not queries:
        raise InputError(f"{queries_path} holds no queries")
    row_of = {pid: i for i, pid in enumerate(passage_ids)}
    missing = {r for q in queries for r in q.relevant_ids if r not in row_of}
    if missing:
        raise InputError(f"queries name {len(missing)} passages absent from the corpus, e.g. {sorted(missing)[:3]}")
    relevant = [{row_of[r] for r in q.relevant_ids} for q in queries]
    device = torch.device("cpu")
    model = load_model(model_dir, device=device, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_len = int(getattr(model.config, "n_positions", 1024))
    sequences = training_sequences(tokenizer, texts, max_len)
    train_examples = [sequence_example(s) for s in sequences]
    query_examples: list[Example] = [tokenize_query(tokenizer, q.prompt, q.completion) for q in queries]
    base = FingerprintConfig(k=settings.k, seed=settings.seed, projection=settings.projection)

    def bar(desc: str, total: int) -> Progress | None:
        return progress(desc, total) if progress is not None else None

    def estimate() -> SecondMoments:
        enc = TrackStarEncoder(model, base, second_moments=None)
        batches = [collate(train_examples[i : i + settings.batch_size], pad_id)
                   for i in range(0, len(train_examples), settings.batch_size)]  # fmt: skip
        return enc.estimate_second_moments(batches)

    second_moments = _second_moments(Path(model_dir), model, estimate)

    # phi once per correction setting; R, whitening and normalization are cheap on top.
    phis: dict[bool, GradientInputs] = {}
    for correction in sorted({m.correction for m in methods if m.kind == "gradient"} |
                             ({True} if any(m.kind == "hybrid" for m in methods) else set()), reverse=True):
        enc = TrackStarEncoder(model, replace(base, correction=correction),
                               second_moments=second_moments if correction else None)  # fmt: skip
        label = "corrected" if correction else "uncorrected"
        pb = bar(f"gradients ({label})", len(train_examples) + len(query_examples))
        tick = pb.update if pb is not None else None
        start = time.perf_counter()
        fit_basis(enc, train_examples, pad_id=pad_id, batch_size=settings.batch_size)  # a pass more (pca)
        train_phi = project_all(enc, train_examples, pad_id=pad_id, batch_size=settings.batch_size, on_batch=tick)
        query_phi = project_all(enc, query_examples, pad_id=pad_id, batch_size=settings.batch_size, on_batch=tick)
        if pb is not None:
            pb.close()
        timings[f"fingerprints_{label}_s"] = time.perf_counter() - start
        phis[correction] = GradientInputs(train_phi, query_phi)

    folds = fold_of(len(queries), settings.seed)
    depth = max(TAILPATCH_CUTOFFS + (10,))
    rankings: dict[str, np.ndarray] = {}
    lambdas: dict[str, list[float]] = {}
    start = time.perf_counter()
    for m in methods:
        if m.kind == "gradient":
            rankings[m.name], lambdas[m.name] = rank_gradient(
                m, base, model, second_moments, phis[m.correction], folds, depth
            )
    if any(m.kind in ("bm25", "hybrid") for m in methods):
        bm25 = BM25Index.build(texts)
        query_texts = [q.prompt + q.completion for q in queries]
        bm25_deep = rank_bm25(bm25, query_texts, FUSION_DEPTH)
        if "bm25" in settings.methods:
            rankings["bm25"] = bm25_deep[:, :depth]
        if "hybrid" in settings.methods:
            trackstar = next(m for m in METHODS if m.name == "trackstar")
            ts_deep, _ = rank_gradient(trackstar, base, model, second_moments, phis[True], folds, FUSION_DEPTH)
            rankings["hybrid"] = rank_hybrid(bm25_deep, ts_deep, depth)
    if "random" in settings.methods:
        rankings["random"] = rank_random(len(queries), len(texts), depth, settings.seed)
    timings["ranking_s"] = time.perf_counter() - start

    # Tail-patch every (query, sequence) pair any method put in its top 10, plus the
    # passages that state the fact (the oracle reference).
    pairs: dict[int, set[int]] = {}
    for ranking in rankings.values():
        for qi, row in enumerate(ranking):
            for sid in row[: max(TAILPATCH_CUTOFFS)].tolist():
                pairs.setdefault(int(sid), set()).add(qi)
    for qi, rel in enumerate(relevant):
        for sid in rel:
            pairs.setdefault(sid, set()).add(qi)
    patcher = TailPatcher(
        load_trainable_model(Path(model_dir)), second_moments=second_moments,
        lr=settings.tailpatch_lr, optimizer=settings.tailpatch_optimizer,
        hyper=read_adam_hyper(Path(model_dir)), pad_id=pad_id,
    )  # fmt: skip
    pb = bar("tail-patch", len(pairs))
    start = time.perf_counter()
    tp = patcher.scores(
        query_examples, dict(enumerate(sequences)), {s: sorted(q) for s, q in pairs.items()},
        on_sequence=pb.update if pb is not None else None,
    )  # fmt: skip
    if pb is not None:
        pb.close()
    timings["tailpatch_s"] = time.perf_counter() - start

    # Saturation: a completion already certain before the step cannot gain log-probability.
    base_logp = completion_logprobs(patcher.model, query_examples, pad_id)
    unsaturated = np.flatnonzero(base_logp < SATURATED_LOGP)
    rows, per_query = [], {}
    for m in methods:
        ranking = rankings[m.name]
        row: dict[str, Any] = {"method": m.name, "description": m.description}
        row.update(attribution_metrics(ranking, relevant))
        values: dict[str, Any] = {
            "top10": ranking[:, :10].tolist(),
            "rr_at_10": [reciprocal_rank(r, rel, 10) for r, rel in zip(ranking, relevant, strict=True)],
            "hit_at_10": [hit_at(r, rel, 10) for r, rel in zip(ranking, relevant, strict=True)],
        }
        for c in TAILPATCH_CUTOFFS:
            tps = [float(np.mean([tp[(qi, int(s))] for s in r[:c]])) for qi, r in enumerate(ranking)]
            values[f"tailpatch_top{c}"] = tps
            row[f"tailpatch_top{c}"] = float(np.mean(tps))
            row[f"tailpatch_top{c}_se"] = _standard_error(tps)
            row[f"tailpatch_top{c}_unsaturated"] = float(np.mean([tps[i] for i in unsaturated])) if unsaturated.size else float("nan")
        per_query[m.name] = values
        rows.append(row)
    paired = {
        "all": paired_table(per_query, "trackstar", seed=settings.seed),
        "unsaturated": paired_table(per_query, "trackstar", rows=unsaturated.tolist(), seed=settings.seed),
    }
    oracle = float(np.mean([np.mean([tp[(qi, s)] for s in rel]) for qi, rel in enumerate(relevant)]))
    timings["total_s"] = time.perf_counter() - t0

    from evaluation.train import fact_accuracy

    context = {
        "model_dir": str(model_dir),
        "model_hash": model_hash(model_dir),
        "n_train_sequences": len(texts),
        "n_queries": len(queries),
        "fingerprint_dim": TrackStarEncoder(model, base, second_moments=second_moments).dim,
        "second_moments_source": second_moments.source,
        "fact_accuracy": fact_accuracy(model, tokenizer, queries),
        "oracle_tailpatch_relevant": oracle,
        "saturated_fraction": float(1.0 - unsaturated.size / len(queries)),
        "saturated_threshold": f"p(completion | prompt) >= {SATURATED_P}",
        "base_logprob": base_logp.tolist(),
        "n_tailpatch_pairs": len(tp),
        "lambdas_by_fold": lambdas,
        "timings": timings,
    }
    log.info("evaluated %d methods on %d queries in %.1fs", len(methods), len(queries), timings["total_s"])
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
