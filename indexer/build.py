"""The two-pass index build (DESIGN.md "Index artifacts"), resumable and shardable.

    pass 0  tokenize + chunk (rank 0)            -> token store, metadata.sqlite
            second moments: optimizer state, or estimated over a sample (rank 0)
    basis   the sketch's whitening from a sample (rank 0)
    pass 1  R_train per shard (all ranks), R_eval from --queries (rank 0)
            merge in shard order, lambda, R^-1/2 (rank 0)
    pass 2  fingerprints per shard (all ranks)
    publish FAISS + float16 fingerprints + manifest (rank 0), atomic rename

All state lives in a work directory beside the output (``indexer.workdir``); a re-run of
the same build resumes from it, a finished build is left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from api.errors import ConfigError, InputError, OptimizerStateError
from encoder.batching import Tokenizer
from encoder.fingerprint import TrackStarEncoder
from encoder.model_loading import (
    load_model,
    load_tokenizer,
    model_hash,
    model_max_tokens,
    tokenizer_hash,
)
from indexer import manifest as mf
from indexer import passes, preflight
from indexer.build_config import BuildConfig
from indexer.chunking import ChunkConfig
from indexer.corpus import corpus_format, corpus_hash
from indexer.distributed import DistContext
from indexer.manifest import sha256_file
from indexer.passes import Progress
from indexer.steps import STEPS, Build, second_moment_source
from indexer.workdir import TokenStore, WorkDir

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 50_000_000


def _out_state(out: Path, build_key: str) -> bool:
    """True when ``out`` already holds this very build; raises when it holds anything else."""
    if not out.exists():
        return False
    if (out / mf.MANIFEST).is_file():
        try:
            existing = mf.read_manifest(out).get("build", {}).get("build_key")
        except Exception:  # noqa: BLE001 - any unreadable manifest is "a different index"
            existing = None
        if existing == build_key:
            return True
        raise ConfigError(
            f"{out} already holds a different index; choose another --out or delete it",
            code="index_exists",
        )
    if not out.is_dir() or any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not an empty directory", code="output_not_empty")
    return False


def build_key(cfg: BuildConfig, chunk: ChunkConfig) -> str:
    """sha256 over every input and option that changes the result."""
    sm = second_moment_source(cfg)
    ident: dict[str, Any] = {
        "format": mf.FORMAT_VERSION,
        "model": model_hash(cfg.model),
        "tokenizer": tokenizer_hash(cfg.model),
        "corpus": corpus_hash(Path(cfg.corpus)),
        "queries": sha256_file(Path(cfg.queries)) if cfg.queries else None,
        "second_moments": (sha256_file(sm / "optimizer.pt" if sm.is_dir() else sm) if sm else None),
        "fingerprint": cfg.fingerprint.to_dict(),
        "chunk": asdict(chunk),
        "v_sample": cfg.v_sample,
        "hessian_sample": cfg.hessian_sample,
        "basis_sample": cfg.basis_sample,
        "faiss": cfg.faiss,
        "faiss_train_sample": cfg.faiss_train_sample,
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
    }
    if cfg.name is not None:  # a published index records its name: another name is another index
        ident["name"] = cfg.name
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def run_build(
    cfg: BuildConfig, ctx: DistContext | None = None, progress: Progress | None = None
) -> Path:
    """Build (or resume, or confirm) the index ``cfg.out``.

    Returns:
        the published index directory.
    Raises:
        InputError, ConfigError, ModelLoadError, OptimizerStateError: bad inputs (nothing
            is published).
    """
    ctx = ctx or DistContext()
    progress = progress or passes._no_progress
    t_start = time.perf_counter()
    out = Path(cfg.out).resolve()
    corpus_format(Path(cfg.corpus))  # missing corpus: fail before loading the model
    if cfg.queries is not None and not Path(cfg.queries).is_file():
        raise InputError(f"query file {cfg.queries} does not exist", code="queries_not_found")
    if cfg.optimizer_state is not None and not Path(cfg.optimizer_state).exists():
        raise OptimizerStateError(
            f"optimizer state {cfg.optimizer_state} does not exist (--optimizer-state)"
        )
    preflight.check_writable(out.parent)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=cfg.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(_threads(cfg, model))
    try:
        with WorkDir(out).lock() if ctx.is_main else contextlib.nullcontext():
            return _run(cfg, ctx, progress, out, tokenizer, model, t_start)
    except OSError as exc:
        if exc.errno in preflight.DISK_ERRNOS:
            raise ConfigError(
                f"cannot write the index next to {out}: {os.strerror(exc.errno or 0)} ({exc.filename or out}); "
                "free space or choose another --out; nothing was published, and a rerun resumes",
                code="output_not_writable",
            ) from exc
        raise
    finally:
        torch.set_num_threads(threads_before)


def _threads(cfg: BuildConfig, model: torch.nn.Module) -> int:
    """Intra-op threads: as asked; else 1 for a small model on the CPU, whose small matmuls
    lose more to thread contention than they gain (vectors do not depend on it)."""
    if cfg.threads:
        return cfg.threads
    device = next(model.parameters()).device
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        return 1
    return torch.get_num_threads()


def _run(
    cfg: BuildConfig,
    ctx: DistContext,
    progress: Progress,
    out: Path,
    tokenizer: Tokenizer,
    model: torch.nn.Module,
    t_start: float,
) -> Path:
    """The build proper, with model and tokenizer loaded (see ``run_build``): tokenize, then
    ``indexer.steps.STEPS`` in order."""
    ctx_len = model_max_tokens(model)
    seq_len = cfg.seq_len or ctx_len or 512
    if ctx_len is not None and seq_len > ctx_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's context length {ctx_len}")
    chunk = ChunkConfig(seq_len, cfg.stride or seq_len, cfg.pack, cfg.append_eos)
    key = build_key(cfg, chunk)
    if _out_state(out, key):
        log.info("%s already holds this index; nothing to do", out)
        if ctx.is_main:
            WorkDir(out).remove()  # left over if a run died between publish and clean-up
        return out
    work = WorkDir(out)
    resumed = ctx.run(lambda: work.prepare(key), only_main=True)
    if ctx.is_main and resumed:
        log.info("resuming the build from %s", work.root)
    _tokenize(cfg, ctx, work, tokenizer, chunk)
    store = TokenStore(work)
    encoder = TrackStarEncoder(model, cfg.fingerprint)
    preflight.check_resources(cfg, encoder, len(store), out)
    build = Build(
        cfg=cfg,
        ctx=ctx,
        progress=progress,
        tokenizer=tokenizer,
        model=model,
        context=ctx_len,
        chunk=chunk,
        key=key,
        work=work,
        counts=json.loads(work.path("tokens.json").read_text()),
        store=store,
        encoder=encoder,
        started=t_start,
    )
    for name, step in STEPS:
        log.debug("build step: %s", name)
        step(build)
    return out


def _tokenize(
    cfg: BuildConfig, ctx: DistContext, work: WorkDir, tokenizer: Tokenizer, chunk: ChunkConfig
) -> None:
    """Pass 0 (rank 0): the token store and the metadata; a bad corpus leaves nothing behind."""

    def tokenize() -> None:
        if not work.path("tokens.json").is_file():
            passes.tokenize_corpus(
                work, Path(cfg.corpus), tokenizer, chunk, work.staging / mf.METADATA
            )

    try:
        ctx.run(tokenize, only_main=True)
    except BaseException:
        if ctx.is_main and not work.path("tokens.json").is_file():
            work.remove()
        raise
