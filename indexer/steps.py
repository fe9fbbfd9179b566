"""The build after tokenizing, as a list of named steps over one ``Build`` state.

Each step is resumable on its own: it skips what the work directory already holds, runs
on rank 0 only where its result is one file, and leaves the encoder ready for the next
step. ``indexer.build`` runs ``STEPS`` in order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from encoder.batching import Tokenizer
from encoder.fingerprint import TrackStarEncoder
from encoder.memory import auto_batch_size
from encoder.optimizer_state import SecondMoments, load_second_moments
from encoder.tensor_files import fitted_with, load_tensors, save_tensors
from encoder.whitening import RStatistics, Whitener
from indexer import manifest as mf
from indexer import passes
from indexer.chunking import ChunkConfig
from indexer.distributed import DistContext
from indexer.files import write_atomic
from indexer.passes import Progress
from indexer.publish import BuildOutputs, publish
from indexer.workdir import TokenStore, WorkDir

if TYPE_CHECKING:
    from indexer.build_config import BuildConfig

log = logging.getLogger(__name__)

EVAL_STATS = "stats/eval.safetensors"


@dataclass
class Build:
    """A build in progress, tokenized: what every step reads, and what they record."""

    cfg: BuildConfig
    ctx: DistContext
    progress: Progress
    tokenizer: Tokenizer
    model: torch.nn.Module
    context: int | None
    chunk: ChunkConfig
    key: str
    work: WorkDir
    counts: dict[str, int]
    store: TokenStore
    encoder: TrackStarEncoder
    started: float
    timing: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.store)

    @property
    def pad(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    @property
    def shards(self) -> list[tuple[int, int]]:
        return passes.shard_ranges(self.n, self.cfg.shard_size)

    @property
    def mine(self) -> list[int]:
        """The shards this rank computes."""
        return [s for s in range(len(self.shards)) if self.ctx.owns(s)]

    @property
    def use_eval(self) -> bool:
        return self.cfg.fingerprint.hessian == "mixed" and self.cfg.queries is not None


def second_moment_source(cfg: BuildConfig) -> Path | None:
    """The optimizer state to read second moments from: as given, else the checkpoint's."""
    if cfg.optimizer_state is not None:
        return Path(cfg.optimizer_state)
    if (Path(cfg.model) / "optimizer.pt").is_file():
        return Path(cfg.model)
    return None


def batch_size(b: Build) -> None:
    """``batch_size`` 0 (auto): the largest batch that fits free memory, measured once."""
    if b.cfg.batch_size != 0:
        return
    path = b.work.path("batch_size.json")

    def resolve() -> None:
        if path.is_file():
            return
        bs, est = auto_batch_size(b.encoder, max(2, int(b.store.spans[:, 1].max())))
        write_atomic(path, lambda p: p.write_text(json.dumps({"batch_size": bs, **asdict(est)})))

    b.ctx.run(resolve, only_main=True)
    b.cfg = replace(b.cfg, batch_size=int(json.loads(path.read_text())["batch_size"]))
    log.info("batch size: %d (auto)", b.cfg.batch_size)


def second_moments(b: Build) -> None:
    """The optimizer correction's v_hat: from the optimizer state, else estimated."""
    if not b.cfg.fingerprint.correction:
        return
    path = b.work.path(mf.SECOND_MOMENTS)

    def compute() -> None:
        if path.is_file():
            return
        source = second_moment_source(b.cfg)
        if source is not None:
            sm = load_second_moments(source, b.model)
        else:
            ids = passes.evenly_spaced(b.n, b.cfg.v_sample)
            if (Path(b.cfg.model) / "trainer_state.json").is_file():
                log.warning(
                    "%s is a Trainer checkpoint without optimizer.pt: the optimizer correction uses "
                    "second moments estimated over %d sequences instead of the optimizer's; pass "
                    "--optimizer-state to use the real ones",
                    b.cfg.model,
                    len(ids),
                )
            else:
                log.info(
                    "no optimizer state: estimating second moments over %d sequences", len(ids)
                )
            batches = (batch for _, batch in passes.batches(b.store, ids, b.cfg.batch_size, b.pad))
            sm = b.encoder.estimate_second_moments(batches)
        tracked = [m.param_name for m in b.encoder.modules]
        write_atomic(
            path,
            lambda p: SecondMoments({k: sm.v_hat[k] for k in tracked}, sm.eps, sm.source).save(
                p, tracked
            ),
        )

    b.ctx.run(compute, only_main=True)
    b.encoder.set_second_moments(load_second_moments(path, b.model))


def basis(b: Build) -> None:
    """The family's fitted state (the sketch's whitening), from an evenly spaced sample."""
    if not b.encoder.needs_fit:
        return
    path = b.work.path(mf.PROJECTIONS)

    def fit() -> None:
        if path.is_file():
            return
        ids = passes.evenly_spaced(b.n, b.cfg.basis_sample or None)
        stats = passes.basis_statistics(
            b.encoder, b.store, ids, b.cfg.batch_size, b.pad, b.progress
        )
        b.encoder.family.fit(stats)
        save_tensors(
            b.encoder.family.tensors(), path, metadata=fitted_with(b.cfg.fingerprint.to_dict())
        )
        log.info("whitening fitted on %d sequences", stats.count)

    b.ctx.run(fit, only_main=True)
    b.encoder.family.restore(load_tensors(path))


def statistics(b: Build) -> None:
    """Pass 1: R_train per shard (every rank), R_eval from the queries (rank 0)."""
    fp, shards = b.cfg.fingerprint, b.shards
    if fp.hessian == "mixed" and b.cfg.queries is None and b.ctx.is_main:
        log.warning("hessian 'mixed' without --queries: R = R_train")
    t0, done = time.perf_counter(), 0
    if fp.hessian != "none":
        sample = passes.evenly_spaced(b.n, b.cfg.hessian_sample)
        todo = [s for s in b.mine if not b.work.stats_path(s).is_file()]
        total = sum(int(((sample >= shards[s][0]) & (sample < shards[s][1])).sum()) for s in todo)

        def run() -> int:
            count = 0
            for s in todo:
                start, stop = shards[s]
                ids = sample[(sample >= start) & (sample < stop)]
                passes.statistics_shard(
                    b.encoder,
                    b.store,
                    b.work,
                    s,
                    ids,
                    stop - start,
                    b.cfg.batch_size,
                    b.pad,
                    b.progress,
                    total,
                )
                count += len(ids)
            if (
                b.ctx.is_main
                and b.cfg.queries is not None
                and b.use_eval
                and not b.work.path(EVAL_STATS).is_file()
            ):
                ev = passes.query_statistics(
                    b.encoder, b.tokenizer, Path(b.cfg.queries), b.cfg.batch_size, b.context
                )
                write_atomic(b.work.path(EVAL_STATS), ev.save)
            return count

        done = b.ctx.run(run) or 0
    _record(b, "statistics", done, time.perf_counter() - t0)


def whitener(b: Build) -> None:
    """R^-1/2 from the merged statistics (rank 0), R_train / R_eval kept in the index."""
    fp = b.cfg.fingerprint
    if fp.hessian == "none":
        return

    def compute() -> None:
        if b.work.path(mf.WHITENER).is_file():
            return
        train = b.encoder.new_statistics()
        for s in range(len(b.shards)):
            if b.work.stats_path(s).is_file():
                train.merge(RStatistics.load(b.work.stats_path(s)))
        ev = RStatistics.load(b.work.path(EVAL_STATS)) if b.use_eval else None
        white = Whitener.from_statistics(
            train, ev, lambda_=fp.lambda_, lambda_component=fp.lambda_component, delta=fp.delta
        )
        write_atomic(b.work.staging / mf.R_TRAIN, train.save)
        if ev is not None:
            write_atomic(b.work.staging / mf.R_EVAL, ev.save)
        record = fitted_with(fp.to_dict())
        write_atomic(b.work.path(mf.WHITENER), lambda path: white.save(path, record))

    b.ctx.run(compute, only_main=True)
    b.encoder.set_whitener(Whitener.load(b.work.path(mf.WHITENER)))


def encode(b: Build) -> None:
    """Pass 2: every sequence's fingerprint, per shard (every rank)."""
    shards = b.shards
    todo = [s for s in b.mine if not b.work.fp_path(s).is_file()]
    total = sum(shards[s][1] - shards[s][0] for s in todo)
    t0 = time.perf_counter()

    def run() -> int:
        for s in todo:
            passes.encode_shard(
                b.encoder,
                b.store,
                b.work,
                s,
                *shards[s],
                b.cfg.batch_size,
                b.pad,
                b.progress,
                total,
            )
        return total

    done = b.ctx.run(run) or 0
    _record(b, "encode", done, time.perf_counter() - t0)


def finish(b: Build) -> None:
    """Publish the index (rank 0): ``indexer.publish``."""
    outputs = BuildOutputs(
        cfg=b.cfg,
        chunk=b.chunk,
        work=b.work,
        encoder=b.encoder,
        counts=b.counts,
        shards=b.shards,
        build_key=b.key,
        timing=dict(b.timing),
        world_size=b.ctx.world_size,
        elapsed=time.perf_counter() - b.started,
    )
    b.ctx.run(lambda: publish(outputs), only_main=True)


def _record(b: Build, what: str, n: int, seconds: float) -> None:
    b.timing |= {
        f"{what}_sequences": n,
        f"{what}_seconds": round(seconds, 3),
        f"{what}_seq_per_s": round(n / seconds, 2) if n and seconds > 0 else None,
    }


STEPS: tuple[tuple[str, Callable[[Build], None]], ...] = (
    ("batch size", batch_size),
    ("second moments", second_moments),
    ("basis", basis),
    ("pass 1: statistics", statistics),
    ("whitener", whitener),
    ("pass 2: encode", encode),
    ("publish", finish),
)
"""The build's steps after tokenizing, in order."""

__all__ = ["STEPS", "Build", "second_moment_source"]
