"""Assemble the index directory from a finished build's shards and publish it atomically.

The staging directory receives the float16 fingerprint matrix (shards concatenated in id
order, streamed through a memory map), the FAISS index, the encoder's artifacts, the BM25
index of the texts (``bm25/``) and finally the manifest with a sha256 per file (``bm25/``
files included); then ``os.rename(staging, out)`` publishes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from encoder.fingerprint import TrackStarEncoder
from encoder.model_loading import model_hash, tokenizer_hash
from encoder.tensor_files import fitted_with, save_tensors
from indexer import faiss_index
from indexer import manifest as mf
from indexer.bm25 import SUBDIR, BM25Index
from indexer.chunking import ChunkConfig
from indexer.files import is_temporary
from indexer.metadata import MetadataStore
from indexer.passes import evenly_spaced
from indexer.workdir import WorkDir

if TYPE_CHECKING:
    from indexer.build_config import BuildConfig

log = logging.getLogger(__name__)

RECALL_QUERIES = 100
ADD_CHUNK = 65536


def _chunks(fps: np.ndarray, step: int = ADD_CHUNK) -> Iterator[np.ndarray]:
    for s in range(0, fps.shape[0], step):
        yield np.asarray(fps[s : s + step], dtype=np.float32)


def _write_bm25(staging: Path, n: int, chunk: int = 20_000) -> None:
    """BM25 over every sequence's text (ids 0..n-1) into ``staging/bm25/``."""
    store = MetadataStore(staging / mf.METADATA)
    try:
        texts = [
            r.text for s in range(0, n, chunk) for r in store.get_many(range(s, min(n, s + chunk)))
        ]
    finally:
        store.close()
    t0 = time.perf_counter()
    BM25Index.build(texts, np.arange(n, dtype=np.int64)).save(staging)
    log.info("BM25 index over %d sequences in %.1f s", n, time.perf_counter() - t0)


@dataclass(frozen=True)
class BuildOutputs:
    """What a finished build hands to ``publish``: its config, its work directory with the
    shards, the encoder it encoded with, the counts, and how it ran."""

    cfg: BuildConfig
    chunk: ChunkConfig
    work: WorkDir
    encoder: TrackStarEncoder
    counts: dict[str, int]
    shards: list[tuple[int, int]]
    build_key: str
    timing: dict[str, Any]
    world_size: int
    elapsed: float


def _write_fingerprints(b: BuildOutputs) -> np.ndarray:
    """The shards concatenated in id order into ``fingerprints.f16.npy`` (streamed through a
    memory map); returns it memory-mapped for reading."""
    path, n = b.work.staging / mf.FINGERPRINTS, b.counts["sequences"]
    fps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, b.encoder.dim))
    for s, (start, stop) in enumerate(b.shards):
        fps[start:stop] = np.load(b.work.fp_path(s))
    fps.flush()
    del fps
    return np.load(path, mmap_mode="r")


def _write_norms(b: BuildOutputs) -> None:
    """The shards' exact-stage squared norms in id order into ``exact_norms.f64.npy``, where
    the family has them (``Family.exact_norms``)."""
    paths = [b.work.norms_path(s) for s in range(len(b.shards))]
    if not b.encoder.family.exact_norms:
        return
    if not all(p.is_file() for p in paths):  # shards encoded by a build before the norms
        log.info("some shards have no exact norms: the second stage will compute them")
        return
    norms = np.concatenate([np.load(p) for p in paths])
    if norms.shape != (b.counts["sequences"],):
        raise RuntimeError(f"the shards hold {norms.shape[0]} norms for {b.counts['sequences']}")
    np.save(b.work.staging / mf.EXACT_NORMS, norms.astype(np.float64))


def _write_faiss(b: BuildOutputs, fps: np.ndarray) -> dict[str, Any]:
    """The FAISS index over the fingerprints; its manifest entry (recall of an approximate one)."""
    cfg, n = b.cfg, b.counts["sequences"]
    train = np.asarray(fps[evenly_spaced(n, cfg.faiss_train_sample)], dtype=np.float32)
    index = faiss_index.build_index(
        cfg.faiss, b.encoder.dim, _chunks(fps), train, use_gpu=b.encoder.device.type == "cuda"
    )
    exact = faiss_index.is_exact(cfg.faiss)
    recall = None
    if not exact:
        probes = np.asarray(fps[evenly_spaced(n, RECALL_QUERIES)], dtype=np.float32)
        recall = faiss_index.recall_at_k(index, fps, probes, k=10)
        log.info(
            "recall@10 vs exact: %.3f (re-ranked %.3f)",
            recall["recall_at_k"],
            recall["recall_at_k_reranked"],
        )
    faiss.write_index(index, str(b.work.staging / mf.FAISS_INDEX))
    return {"factory": cfg.faiss, "exact": exact, "recall": recall}


def _manifest(
    b: BuildOutputs, faiss_entry: dict[str, Any], files: list[str], seconds: float
) -> mf.Manifest:
    cfg, encoder, counts, chunk = b.cfg, b.encoder, b.counts, b.chunk
    model_dir = Path(cfg.model).resolve()
    return mf.Manifest(
        model=mf.ModelEntry(
            path=str(model_dir),
            name=cfg.name or mf.display_name(model_dir),
            hash=model_hash(model_dir),
            tokenizer_hash=tokenizer_hash(model_dir),
        ),
        fingerprint={
            "config": cfg.fingerprint.to_dict(),
            "lambda": encoder.whitener.lambda_ if encoder.whitener is not None else None,
            "second_moments": encoder.second_moments.source if encoder.second_moments else None,
            "modules": encoder.module_names,
            "shapes": {m.name: [m.out_features, m.in_features] for m in encoder.modules},
            "block_dims": encoder.block_dims,
            "plan": {
                name: list(sizes) if sizes is not None else None
                for name, sizes in encoder.plan.items()
            },
        },
        counts={
            "sequences": counts["sequences"],
            "documents": counts["documents"],
            "tokens": counts["tokens"],
            "dropped": counts["dropped"],
            "dim": encoder.dim,
        },
        faiss=faiss_entry,
        corpus={
            "path": str(Path(cfg.corpus).resolve()),
            "seq_len": chunk.seq_len,
            "stride": chunk.stride,
            "packing": chunk.pack,
            "append_eos": chunk.append_eos,
            "hessian_sample": cfg.hessian_sample,
            "v_sample": cfg.v_sample,
            "queries": str(Path(cfg.queries).resolve()) if cfg.queries else None,
        },
        storage={"fingerprints_dtype": "float16", "faiss_vectors": "float16 upcast to float32"},
        build={
            "build_key": b.build_key,
            "world_size": b.world_size,
            "shards": len(b.shards),
            "shard_size": cfg.shard_size,
            "batch_size": cfg.batch_size,
            "seconds": round(seconds, 3),
            **b.timing,
        },
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        files=mf.checksums(b.work.staging, files),
    )


def publish(b: BuildOutputs) -> None:
    """Write every artifact into ``work.staging``, then rename it to ``cfg.out``."""
    t0 = time.perf_counter()
    staging, n = b.work.staging, b.counts["sequences"]
    faiss_entry = _write_faiss(b, _write_fingerprints(b))
    _write_norms(b)
    state = b.encoder.family.tensors()
    if state:
        save_tensors(
            state, staging / mf.PROJECTIONS, metadata=fitted_with(b.cfg.fingerprint.to_dict())
        )
    for name in (mf.SECOND_MOMENTS, mf.WHITENER):
        if b.work.path(name).is_file():
            shutil.copyfile(b.work.path(name), staging / name)
    _write_bm25(staging, n)
    files = sorted(p.name for p in staging.iterdir() if p.is_file() and not is_temporary(p))
    files += sorted(
        str(p.relative_to(staging)) for p in (staging / SUBDIR).rglob("*") if p.is_file()
    )
    _manifest(b, faiss_entry, files, b.elapsed + time.perf_counter() - t0).write(staging)
    # An index is read-only data, served by other users (e.g. a non-root container); some
    # writers (safetensors) create files 0600.
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = Path(b.cfg.out).resolve()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    os.rename(staging, out)
    b.work.remove()
    log.info("published %s: %d sequences, d=%d, %s", out, n, b.encoder.dim, b.cfg.faiss)
