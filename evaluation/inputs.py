"""An evaluation's inputs, read once: the corpus and its training sequences, the queries, the
model and tokenizer, and the second moments (``load_run``, ``second_moments_for``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from api.errors import InputError, OptimizerStateError
from encoder.batching import Example, Tokenizer, sequence_example, tokenize_query
from encoder.config import FingerprintConfig
from encoder.model_loading import load_model, load_tokenizer
from encoder.optimizer_state import SecondMoments, load_second_moments
from evaluation.corpus import FactQuery, load_queries
from evaluation.settings import EvalSettings

log = logging.getLogger(__name__)


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


ProgressFactory = Callable[[str, int], Progress]


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
                raise InputError(
                    f"{path}, line {lineno}: not valid JSON ({exc})", code="invalid_corpus"
                ) from None
            if (
                not isinstance(record, dict)
                or "id" not in record
                or not isinstance(record.get("text"), str)
            ):
                raise InputError(
                    f'{path}, line {lineno}: expected {{"id": ..., "text": str}}',
                    code="invalid_corpus",
                )
            ids.append(str(record["id"]))
            texts.append(record["text"])
    if not ids:
        raise InputError(f"{path} holds no passages")
    return ids, texts


def training_sequences(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each passage as it was trained (evaluation.train): text[:max_len-1] + eos."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(ids[: max_len - 1]) + [tokenizer.eos_token_id] for ids in encoded]


def second_moments_for(
    model_dir: Path, model: torch.nn.Module, estimate: Callable[[], SecondMoments]
) -> SecondMoments:
    try:
        return load_second_moments(model_dir, model)
    except OptimizerStateError as exc:
        log.warning("%s; estimating the second moments from the training sequences", exc)
        return estimate()


def standard_error(values: list[float]) -> float:
    """Standard error of the mean over queries (0.0 for fewer than two)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


@dataclass
class Run:
    """One evaluation's loaded inputs, shared by its phases."""

    settings: EvalSettings
    model_dir: Path
    corpus_path: Path
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


def load_run(
    model_dir: Path,
    corpus_path: Path,
    queries_path: Path,
    settings: EvalSettings,
    progress: ProgressFactory | None,
) -> Run:
    """Read and check the inputs (a malformed file is reported before the model loads),
    then the model and every example tokenized."""
    passage_ids, texts = read_corpus(corpus_path)
    queries = load_queries(queries_path)[: settings.max_queries]
    if not queries:
        raise InputError(f"{queries_path} holds no queries")
    row_of = {pid: i for i, pid in enumerate(passage_ids)}
    missing = {r for q in queries for r in q.relevant_ids if r not in row_of}
    if missing:
        raise InputError(
            f"queries name {len(missing)} passages absent from the corpus, e.g. {sorted(missing)[:3]}"
        )
    model = load_model(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    sequences = training_sequences(
        tokenizer, texts, int(getattr(model.config, "n_positions", 1024))
    )
    return Run(
        settings=settings,
        model_dir=Path(model_dir),
        corpus_path=Path(corpus_path),
        model=model,
        tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        texts=texts,
        queries=queries,
        relevant=[{row_of[r] for r in q.relevant_ids} for q in queries],
        sequences=sequences,
        train_examples=[sequence_example(s) for s in sequences],
        query_examples=[tokenize_query(tokenizer, q.prompt, q.completion) for q in queries],
        base=FingerprintConfig(k=settings.k, seed=settings.seed, projection=settings.projection),
        progress=progress,
    )
