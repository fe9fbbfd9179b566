"""The two-pass index build (DESIGN.md "Index artifacts"), resumable and shardable.

    pass 0  tokenize + chunk (rank 0)            -> token store, metadata.sqlite
            second moments: optimizer state, or estimated over a sample (rank 0)
    basis   the projection's eigenbasis from a sample (rank 0; projection pca)
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from encoder.basis import load_projections, save_projections
from encoder.config import FingerprintConfig
from encoder.errors import ConfigError, InputError, OptimizerStateError
from encoder.fingerprint import TrackStarEncoder
from encoder.memory import auto_batch_size
from encoder.model_loading import load_model, load_tokenizer, model_hash, tokenizer_hash
from encoder.optimizer_state import SecondMoments, load_second_moments
from encoder.whitening import RStatistics, Whitener
from indexer import manifest as mf
from indexer import passes, preflight
from indexer.artifacts import model_max_tokens
from indexer.chunking import ChunkConfig
from indexer.corpus import corpus_format, corpus_hash
from indexer.distributed import DistContext
from indexer.manifest import sha256_file
from indexer.passes import Progress
from indexer.publish import publish
from indexer.workdir import TokenStore, WorkDir, write_atomic

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 50_000_000


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs (the ``influence index build`` options).

    Args:
        model: model directory or HF Trainer checkpoint directory.
        corpus: corpus path (see ``indexer.corpus.read_corpus``).
        out: the index directory to publish.
        fingerprint: the fingerprint configuration.
        seq_len: tokens per sequence; None = the model's context length.
        stride: window step; None = seq_len (no overlap).
        pack: pack documents into sequences.
        append_eos: end documents with EOS (as the trainer did).
        queries: JSONL of {prompt, completion} for R_eval (hessian ``mixed``).
        optimizer_state: second-moment source; None = the model dir's optimizer.pt if any,
            else estimated over ``v_sample`` sequences.
        v_sample: sequences for the second-moment estimate.
        hessian_sample: sequences for R_train; None = all.
        basis_sample: sequences the projection basis is fitted on (``projection: pca``;
            evenly spaced over the corpus; None = all).
        faiss: FAISS factory string.
        faiss_train_sample: vectors to train an approximate index on.
        bm25: also write the BM25 index of the sequence texts (``bm25/``, for the
            service's ``mode: bm25|hybrid``); not part of the fingerprints' identity.
        batch_size: sequences per backward pass (part of the build's identity); 0 = auto:
            the largest batch that fits the device's free memory (``encoder.memory``),
            measured once per build and kept in the work directory, so a resumed build
            uses the same batches.
        shard_size: sequences per shard (resume and scale-out unit).
        device: torch device; None = CUDA if present.
        threads: torch intra-op threads; None = 1 for a small model on the CPU, else torch's default.
        name: the model's display name (UI, API ``model``); None = ``display_name(model)``.
    """

    model: Path
    corpus: Path
    out: Path
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    seq_len: int | None = None
    stride: int | None = None
    pack: bool = False
    append_eos: bool = True
    queries: Path | None = None
    optimizer_state: Path | None = None
    v_sample: int = 256
    hessian_sample: int | None = None
    basis_sample: int | None = 1024
    faiss: str = "Flat"
    faiss_train_sample: int = 65536
    bm25: bool = True
    batch_size: int = 8
    shard_size: int = 256
    device: str | None = None
    threads: int | None = None
    name: str | None = None


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


def _second_moment_source(cfg: BuildConfig) -> Path | None:
    if cfg.optimizer_state is not None:
        return Path(cfg.optimizer_state)
    if (Path(cfg.model) / "optimizer.pt").is_file():
        return Path(cfg.model)
    return None


def build_key(cfg: BuildConfig, chunk: ChunkConfig) -> str:
    """sha256 over every input and option that changes the result."""
    sm = _second_moment_source(cfg)
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


def run_build(cfg: BuildConfig, ctx: DistContext | None = None, progress: Progress | None = None) -> Path:
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
    if cfg.batch_size < 0 or cfg.shard_size < 1:
        raise ConfigError("batch size must be >= 1 (or 0: auto) and shard size >= 1")
    if cfg.basis_sample is not None and cfg.basis_sample < 1:
        raise ConfigError(f"basis sample must be >= 1 sequences (or all), got {cfg.basis_sample}")
    corpus_format(Path(cfg.corpus))  # missing corpus: fail before loading the model
    if cfg.queries is not None and not Path(cfg.queries).is_file():
        raise InputError(f"query file {cfg.queries} does not exist", code="queries_not_found")
    if cfg.optimizer_state is not None and not Path(cfg.optimizer_state).exists():
        raise OptimizerStateError(f"optimizer state {cfg.optimizer_state} does not exist (--optimizer-state)")
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


def _run(cfg: BuildConfig, ctx: DistContext, progress: Progress, out: Path, tokenizer, model, t_start: float) -> Path:
    """The build proper, with model and tokenizer loaded (see ``run_build``)."""
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

    # -- pass 0: tokenize ----------------------------------------------------------------
    def tokenize() -> None:
        if not work.path("tokens.json").is_file():
            passes.tokenize_corpus(work, Path(cfg.corpus), tokenizer, chunk, work.staging / mf.METADATA)

    try:
        ctx.run(tokenize, only_main=True)
    except BaseException:
        if ctx.is_main and not work.path("tokens.json").is_file():
            work.remove()  # a bad corpus leaves nothing behind
        raise
    counts = json.loads(work.path("tokens.json").read_text())
    store = TokenStore(work)
    n = len(store)
    pad = int(tokenizer.pad_token_id or 0)
    shards = passes.shard_ranges(n, cfg.shard_size)
    mine = [s for s in range(len(shards)) if ctx.owns(s)]
    encoder = TrackStarEncoder(model, cfg.fingerprint)
    preflight.check_resources(cfg, encoder, n, out)

    # -- batch size (auto: from free memory, once per build) -----------------------------
    if cfg.batch_size == 0:
        bs_path = work.path("batch_size.json")

        def resolve_batch_size() -> None:
            if bs_path.is_file():
                return
            bs, est = auto_batch_size(encoder, max(2, int(store.spans[:, 1].max())))
            write_atomic(bs_path, lambda p: p.write_text(json.dumps({"batch_size": bs, **asdict(est)})))

        ctx.run(resolve_batch_size, only_main=True)
        cfg = replace(cfg, batch_size=int(json.loads(bs_path.read_text())["batch_size"]))
        log.info("batch size: %d (auto)", cfg.batch_size)

    # -- second moments ------------------------------------------------------------------
    sm_path = work.path(mf.SECOND_MOMENTS)

    def second_moments() -> None:
        if sm_path.is_file():
            return
        source = _second_moment_source(cfg)
        if source is not None:
            sm = load_second_moments(source, model)
        else:
            ids = passes.evenly_spaced(n, cfg.v_sample)
            if (Path(cfg.model) / "trainer_state.json").is_file():
                log.warning("%s is a Trainer checkpoint without optimizer.pt: the optimizer correction uses "
                            "second moments estimated over %d sequences instead of the optimizer's; pass "
                            "--optimizer-state to use the real ones", cfg.model, len(ids))  # fmt: skip
            else:
                log.info("no optimizer state: estimating second moments over %d sequences", len(ids))
            sm = encoder.estimate_second_moments(b for _, b in passes.batches(store, ids, cfg.batch_size, pad))
        tracked = [m.param_name for m in encoder.modules]
        write_atomic(sm_path, lambda p: SecondMoments(
            {k: sm.v_hat[k] for k in tracked}, sm.eps, sm.source).save(p, tracked))

    if cfg.fingerprint.correction:
        ctx.run(second_moments, only_main=True)
        encoder.set_second_moments(load_second_moments(sm_path, model))

    # -- basis (projection: pca) ----------------------------------------------------------
    basis_path = work.path(mf.PROJECTIONS)

    def fit_basis() -> None:
        if basis_path.is_file():
            return
        ids = passes.evenly_spaced(n, cfg.basis_sample)
        stats = passes.basis_statistics(encoder, store, ids, cfg.batch_size, pad, progress)
        save_projections(stats.projections(encoder.modules, encoder.plan, cfg.fingerprint.seed), basis_path)
        log.info("projection basis fitted on %d sequences", stats.count)

    if encoder.needs_basis:
        ctx.run(fit_basis, only_main=True)
        encoder.set_projections(load_projections(basis_path))

    # -- pass 1: statistics --------------------------------------------------------------
    fp = cfg.fingerprint
    use_eval = fp.hessian == "mixed" and cfg.queries is not None
    if fp.hessian == "mixed" and cfg.queries is None and ctx.is_main:
        log.warning("hessian 'mixed' without --queries: R = R_train")
    sample = passes.evenly_spaced(n, cfg.hessian_sample)
    t1, n1 = time.perf_counter(), 0
    if fp.hessian != "none":
        todo = [s for s in mine if not work.stats_path(s).is_file()]
        total1 = sum(int(((sample >= shards[s][0]) & (sample < shards[s][1])).sum()) for s in todo)

        def statistics() -> int:
            done = 0
            for s in todo:
                start, stop = shards[s]
                ids = sample[(sample >= start) & (sample < stop)]
                passes.statistics_shard(encoder, store, work, s, ids, stop - start, cfg.batch_size, pad,
                                        progress, total1)
                done += len(ids)
            if ctx.is_main and use_eval and not work.path("stats/eval.safetensors").is_file():
                ev = passes.query_statistics(encoder, tokenizer, Path(cfg.queries), cfg.batch_size, ctx_len)
                write_atomic(work.path("stats/eval.safetensors"), ev.save)
            return done

        n1 = ctx.run(statistics) or 0
    t1 = time.perf_counter() - t1

    def whiten() -> None:
        if work.path(mf.WHITENER).is_file():
            return
        train = encoder.new_statistics()
        for s in range(len(shards)):
            path = work.stats_path(s)
            if path.is_file():
                train.merge(RStatistics.load(path))
        ev = RStatistics.load(work.path("stats/eval.safetensors")) if use_eval else None
        whitener = Whitener.from_statistics(train, ev, lambda_=fp.lambda_,
                                            lambda_component=fp.lambda_component, delta=fp.delta)
        write_atomic(work.staging / mf.R_TRAIN, train.save)
        if ev is not None:
            write_atomic(work.staging / mf.R_EVAL, ev.save)
        write_atomic(work.path(mf.WHITENER), whitener.save)

    if fp.hessian != "none":
        ctx.run(whiten, only_main=True)
        encoder.set_whitener(Whitener.load(work.path(mf.WHITENER)))

    # -- pass 2: encode ------------------------------------------------------------------
    todo2 = [s for s in mine if not work.fp_path(s).is_file()]
    total2 = sum(shards[s][1] - shards[s][0] for s in todo2)
    t2 = time.perf_counter()

    def encode() -> int:
        for s in todo2:
            passes.encode_shard(encoder, store, work, s, *shards[s], cfg.batch_size, pad, progress, total2)
        return total2

    n2 = ctx.run(encode) or 0
    t2 = time.perf_counter() - t2

    # -- publish -------------------------------------------------------------------------
    timing = {
        "statistics_sequences": n1, "statistics_seconds": round(t1, 3),
        "statistics_seq_per_s": round(n1 / t1, 2) if n1 and t1 > 0 else None,
        "encode_sequences": n2, "encode_seconds": round(t2, 3),
        "encode_seq_per_s": round(n2 / t2, 2) if n2 and t2 > 0 else None,
    }

    def finish() -> None:
        publish(cfg, chunk, work, encoder, counts, shards, key, timing, ctx.world_size,
                time.perf_counter() - t_start)

    ctx.run(finish, only_main=True)
    return out
