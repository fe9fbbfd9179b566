"""The build's passes over the sequences, one shard at a time.

Pass 0 (rank 0): tokenize and chunk the corpus into the token store and the metadata store.
Basis (rank 0, ``projection: sketch``): corrected-gradient side covariances of a sample,
    whose damped inverse square roots whiten every module (``encoder.basis``).
Pass 1 (statistics): projected gradients phi of the Hessian sample, summed per shard into
    R_train statistics (float64); phi of fully sampled shards is cached for pass 2.
Pass 2 (encode): e = R^-1/2 phi / ||.|| per shard, stored as float16.

Batches are consecutive ids of one shard, ``batch_size`` at a time, so a vector depends
only on its shard's contents, never on how shards are spread over ranks or runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from api.errors import InputError
from encoder.basis import BasisStatistics
from encoder.batching import TokenBatch, collate, sequence_example, tokenize_query
from encoder.fingerprint import TrackStarEncoder
from encoder.whitening import RStatistics
from indexer.chunking import ChunkConfig, Chunker
from indexer.corpus import read_corpus
from indexer.files import write_atomic
from indexer.metadata import MetadataWriter
from indexer.workdir import TokenStore, WorkDir, save_npy_atomic

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, n_new, total): called as sequences are processed."""

METADATA_BATCH = 1024


def _no_progress(stage: str, n: int, total: int) -> None:
    return None


def tokenize_corpus(
    work: WorkDir, corpus: Path, tokenizer, chunk: ChunkConfig, metadata_path: Path
) -> dict[str, int]:
    """Pass 0: stream the corpus into ``tokens.u32``/``spans.npy`` and the metadata store.

    Returns:
        counts {sequences, documents, tokens, dropped}.
    Raises:
        InputError: code ``empty_corpus`` when no sequence results.
    """
    chunker = Chunker(tokenizer, chunk)
    writer = MetadataWriter(metadata_path)
    spans: list[tuple[int, int]] = []
    offset, pending, pending_ids = 0, [], []
    tokens_tmp = work.path("tokens.u32.tmp")
    with tokens_tmp.open("wb") as fh:
        for c in chunker.chunks(read_corpus(corpus)):
            fh.write(np.asarray(c.input_ids, dtype=np.uint32).tobytes())
            spans.append((offset, len(c.input_ids)))
            offset += len(c.input_ids)
            pending.append(c.record)
            pending_ids.append(c.input_ids)
            if len(pending) >= METADATA_BATCH:
                writer.add(pending, pending_ids)
                pending, pending_ids = [], []
    writer.add(pending, pending_ids)
    writer.close()
    if not spans:
        raise InputError(
            f"the corpus {corpus} yields no training sequences ({chunker.n_documents} documents, "
            f"{chunker.n_tokens} tokens)",
            code="empty_corpus",
        )
    tokens_tmp.replace(work.path("tokens.u32"))
    save_npy_atomic(work.path("spans.npy"), np.asarray(spans, dtype=np.int64))
    counts = {
        "sequences": len(spans),
        "documents": chunker.n_documents,
        "tokens": offset,
        "dropped": chunker.n_dropped,
    }
    write_atomic(work.path("tokens.json"), lambda p: p.write_text(json.dumps(counts)))
    log.info(
        "tokenized %d documents into %d sequences (%d tokens)",
        counts["documents"],
        len(spans),
        offset,
    )
    return counts


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) id ranges of the shards of n sequences."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def evenly_spaced(n: int, n_sample: int | None) -> np.ndarray:
    """A deterministic sample of ids in [0, n): all when n_sample is None or >= n."""
    if n_sample is None or n_sample >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, max(n_sample, 1)).round().astype(np.int64))


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Positions sorted by length, longest first, ties in id order (deterministic, so a
    resumed shard batches exactly as before)."""
    return np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))


def batches(
    store: TokenStore, ids: np.ndarray, batch_size: int, pad_id: int
) -> Iterator[tuple[np.ndarray, TokenBatch]]:
    """Padded batches of ``batch_size`` sequences of similar length: ``ids`` sorted by
    length, so a batch pads to its own longest member, not to the longest of a corpus-order
    group (vectors do not depend on the batching; the caller puts each result back).

    Yields:
        (positions [b] into ``ids``, the padded batch of those sequences).
    """
    order = length_order(store.spans[ids, 1])
    for s in range(0, len(ids), batch_size):
        rows = order[s : s + batch_size]
        yield rows, collate([sequence_example(store.ids(int(ids[r]))) for r in rows], pad_id)


def padded_tokens(lengths: np.ndarray, batch_size: int, *, by_length: bool = True) -> int:
    """Tokens (real + padding) the batches of ``batches`` hold for sequences of ``lengths``."""
    lengths = np.asarray(lengths)
    order = length_order(lengths) if by_length else np.arange(len(lengths))
    groups = [lengths[order[s : s + batch_size]] for s in range(0, len(lengths), batch_size)]
    return int(sum(len(g) * int(g.max()) for g in groups))


def basis_statistics(
    encoder: TrackStarEncoder,
    store: TokenStore,
    ids: np.ndarray,
    batch_size: int,
    pad_id: int,
    progress: Progress = _no_progress,
) -> BasisStatistics:
    """The basis pass (the sketch's whitening): C_out / C_in sums over the sampled ``ids``."""

    def feed() -> Iterator[TokenBatch]:
        for rows, batch in batches(store, ids, batch_size, pad_id):
            yield batch
            progress("basis", len(rows), len(ids))

    return encoder.basis_statistics(feed())


def statistics_shard(
    encoder: TrackStarEncoder,
    store: TokenStore,
    work: WorkDir,
    shard: int,
    ids: np.ndarray,
    shard_len: int,
    batch_size: int,
    pad_id: int,
    progress: Progress = _no_progress,
    total: int = 0,
) -> None:
    """Pass 1 for one shard: R_train sums over its sampled ``ids``; phi cached when the
    sample is the whole shard."""
    stats = encoder.new_statistics()
    cache = np.empty((len(ids), encoder.dim), dtype=np.float32) if len(ids) == shard_len else None
    norms = _norms(encoder, len(ids)) if cache is not None else None
    for rows, batch in batches(store, ids, batch_size, pad_id):
        sq = _norms(encoder, len(rows), encoder.device) if norms is not None else None
        phi = encoder.project(batch, sq)
        stats.update(phi)
        if cache is not None:
            cache[rows] = phi.float().cpu().numpy()
        if norms is not None and sq is not None:
            norms[rows] = sq.cpu()
        progress("statistics", len(rows), total)
    if cache is not None and len(ids):
        if norms is not None:  # before the phi: a shard with phi has its norms
            save_npy_atomic(work.norms_path(shard), norms.numpy())
        save_npy_atomic(work.phi_path(shard), cache)
    write_atomic(work.stats_path(shard), stats.save)


def query_statistics(
    encoder: TrackStarEncoder, tokenizer, queries: Path, batch_size: int, max_tokens: int | None
) -> RStatistics:
    """R_eval sums over a JSONL file of {prompt, completion} queries (completion = targets)."""
    examples = []
    with Path(queries).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
                obj = json.loads(line) if line else None
            except (UnicodeDecodeError, ValueError) as exc:
                raise InputError(
                    f"{queries}, line {lineno}: not a UTF-8 JSON object", code="invalid_queries"
                ) from exc
            if obj is None:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("completion"), str):
                raise InputError(
                    f"{queries}, line {lineno}: needs 'prompt' and 'completion'",
                    code="invalid_queries",
                )
            examples.append(
                tokenize_query(
                    tokenizer, obj.get("prompt", ""), obj["completion"], max_tokens=max_tokens
                )
            )
    if not examples:
        raise InputError(f"the query file {queries} holds no queries", code="invalid_queries")
    stats = encoder.new_statistics()
    pad = int(tokenizer.pad_token_id or 0)
    for s in range(0, len(examples), batch_size):
        stats.update(encoder.project(collate(examples[s : s + batch_size], pad)))
    log.info("R_eval from %d queries", stats.count)
    return stats


def _norms(
    encoder: TrackStarEncoder, n: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """[n] float64 zeros to add the exact stage's squared norms to, where the family has
    them (``Family.exact_norms``); None where it does not."""
    if not encoder.family.exact_norms:
        return None
    return torch.zeros(n, dtype=torch.float64, device=device)


def encode_shard(
    encoder: TrackStarEncoder,
    store: TokenStore,
    work: WorkDir,
    shard: int,
    start: int,
    stop: int,
    batch_size: int,
    pad_id: int,
    progress: Progress = _no_progress,
    total: int = 0,
) -> None:
    """Pass 2 for one shard: fingerprints of ids [start, stop) as float16 in ``fp/``."""
    cached = work.phi_path(shard)
    out = np.empty((stop - start, encoder.dim), dtype=np.float16)
    if cached.is_file():
        phi_all = np.load(cached)
        for s in range(0, stop - start, batch_size):
            phi = torch.from_numpy(phi_all[s : s + batch_size]).to(
                encoder.device, encoder.accum_dtype
            )
            out[s : s + len(phi)] = encoder.finalize(phi).float().cpu().numpy().astype(np.float16)
            progress("encode", len(phi), total)
    else:
        ids = np.arange(start, stop, dtype=np.int64)
        norms = _norms(encoder, stop - start)
        for rows, batch in batches(store, ids, batch_size, pad_id):
            sq = _norms(encoder, len(rows), encoder.device)
            out[rows] = encoder.encode(batch, sq).float().cpu().numpy().astype(np.float16)
            if norms is not None and sq is not None:
                norms[rows] = sq.cpu()
            progress("encode", len(rows), total)
        if norms is not None:  # before the fingerprints: a shard with them has its norms
            save_npy_atomic(work.norms_path(shard), norms.numpy())
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} fingerprints of sequences {start}..{stop - 1} are not finite (first: sequence "
            f"{start + int(np.argmax(bad))}): the optimizer state or the model yields NaN/inf gradients; "
            "nothing was published",
            code="nonfinite_fingerprints",
        )
    save_npy_atomic(work.fp_path(shard), out)
    cached.unlink(missing_ok=True)
