"""Checks a build makes before its expensive passes: the output folder takes files, the FAISS
factory can be built and trained on this data, and the fingerprint store and the Hessian
statistics fit in disk and memory (refused with the estimate and what to change)."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from api.errors import ConfigError
from encoder.basis import basis_bytes
from encoder.fingerprint import TrackStarEncoder
from encoder.memory import free_memory, hessian_bytes
from indexer import faiss_index

if TYPE_CHECKING:
    from indexer.build_config import BuildConfig

log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.8
"""Share of the free host memory the Hessian statistics may take."""


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def check_writable(parent: Path) -> None:
    """The output's folder exists (or can be made) and takes files, before any work."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".influence-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"the output folder {parent} is not writable: {exc.strerror or exc}; choose another --out",
            code="output_not_writable",
        ) from exc


def check_resources(cfg: BuildConfig, encoder: TrackStarEncoder, n: int, out: Path) -> None:
    """Before the expensive passes: the FAISS factory can be built and trained on this data,
    and the fingerprint store and the Hessian statistics fit (refused with the estimate)."""
    faiss_index.check_trainable(cfg.faiss, encoder.dim, min(n, cfg.faiss_train_sample))
    check_device(cfg, encoder)
    free = free_memory(torch.device("cpu"))
    _check_store(cfg, n, encoder.dim, out, free)
    if encoder.needs_fit:
        _check_basis(encoder, free)
    if cfg.fingerprint.hessian == "none":
        return
    need = hessian_bytes(encoder.block_dims, with_eval=cfg.queries is not None)
    log.info(
        "Hessian statistics: %d blocks, up to %d dims, ~%.2f GiB of host memory (%.1f GiB free)",
        len(encoder.block_dims),
        max(encoder.block_dims),
        need / 2**30,
        free / 2**30,
    )
    if need > MEMORY_FRACTION * free:
        smaller = (
            f"smaller blocks (--max-block {max(1, max(encoder.block_dims) // 2)})"
            if cfg.fingerprint.k is None
            else "a smaller projection (-k 16 gives 256-dim blocks)"
        )
        raise ConfigError(
            f"the Hessian statistics need ~{need / 2**30:.1f} GiB of memory ({len(encoder.block_dims)} blocks "
            f"of up to {max(encoder.block_dims)} x {max(encoder.block_dims)} float64), {free / 2**30:.1f} GiB "
            f"are free: use {smaller}, fewer tracked modules (--include), or --hessian none",
            code="insufficient_memory",
            needed_bytes=need,
            free_bytes=free,
        )


FIXES = {
    "sketch hash": "--projection gaussian, or fewer tracked modules (--include)",
    "whitening": "no --whiten (the plain sketch needs none), or fewer tracked modules (--include)",
    "activations": "a smaller --batch-size or --seq-len, or --batch-size auto",
    "weights": "a device with more memory",
}
"""What to change when a term is the largest of a build that does not fit its device."""


def check_device(cfg: BuildConfig, encoder: TrackStarEncoder, free: int | None = None) -> None:
    """On a GPU, before any pass: the build's device terms (``indexer.plan``: weights, the
    family's state, the correction, the gradient chunk, a fixed batch's activations) fit its
    free memory; refused with the largest terms and what to change. On the CPU the host
    checks hold the large terms and an auto batch is sized to fit."""
    from indexer.plan import build_device_terms

    device = encoder.device
    if device.type != "cuda":
        return
    context = getattr(encoder.model.config, "max_position_embeddings", None) or 1024
    sizes = {"seq_len": cfg.seq_len or int(context), "batch_size": cfg.batch_size}
    fp, plan = cfg.fingerprint, encoder.plan
    terms = build_device_terms(
        encoder.model, encoder.modules, fp, plan, device=str(device), **sizes
    )
    need = sum(t.bytes for t in terms)
    free = free_memory(device) if free is None else free
    log.info("device memory: ~%.2f GiB of %.1f GiB free", need / 2**30, free / 2**30)
    if need <= MEMORY_FRACTION * free:
        return
    largest = sorted(terms, key=lambda t: -t.bytes)[:3]
    parts = ", ".join(f"{t.name} {t.bytes / 2**30:.1f} GiB" for t in largest)
    raise ConfigError(
        f"the build needs ~{need / 2**30:.1f} GiB on {device} ({parts}), {free / 2**30:.1f} GiB "
        f"are free: use {FIXES.get(largest[0].name, 'a smaller model or device')} "
        "(influence index plan shows every term)",
        code="insufficient_memory",
        needed_bytes=need,
        free_bytes=free,
    )


def _check_basis(encoder: TrackStarEncoder, free: int) -> None:
    """The sketch whitening's covariance sums fit in host memory."""
    need = basis_bytes(encoder.modules, encoder.plan)
    log.info(
        "whitening statistics: ~%.2f GiB of host memory (%.1f GiB free)", need / 2**30, free / 2**30
    )
    if need > MEMORY_FRACTION * free:
        raise ConfigError(
            f"the whitening needs ~{need / 2**30:.1f} GiB of memory for its covariance sums, "
            f"{free / 2**30:.1f} GiB are free: build without --whiten, or with fewer tracked modules (--include)",
            code="insufficient_memory",
            needed_bytes=need,
            free_bytes=free,
        )


def _check_store(cfg: BuildConfig, n: int, d: int, out: Path, free_ram: int) -> None:
    """Disk for the work directory and the index (float32 phi cache with a Hessian, float16
    fingerprints per shard and published, a Flat index's float32 vectors), and RAM for the
    FAISS index being built (Flat: every vector as float32; else its training sample)."""
    exact = faiss_index.is_exact(cfg.faiss)
    row = 4 * d * (cfg.fingerprint.hessian != "none") + 2 * d * 2 + (4 * d if exact else 0)
    disk = n * row
    ram = 4 * d * (n if exact else min(n, cfg.faiss_train_sample))
    free_disk = shutil.disk_usage(out.parent).free
    log.info(
        "fingerprint store: %d x %d dims, ~%.2f GiB of disk (%.1f GiB free), FAISS ~%.2f GiB of RAM",
        n,
        d,
        disk / 2**30,
        free_disk / 2**30,
        ram / 2**30,
    )
    fix = "use a smaller projection (-k), fewer tracked modules (--include)"
    if disk > free_disk:
        raise ConfigError(
            f"the fingerprints need ~{disk / 2**30:.1f} GiB of disk next to {out}, "
            f"{free_disk / 2**30:.1f} GiB are free: {fix}, or another --out",
            code="insufficient_disk",
            needed_bytes=disk,
            free_bytes=free_disk,
        )
    if ram > MEMORY_FRACTION * free_ram:
        raise ConfigError(
            f"the FAISS index ({cfg.faiss}) needs ~{ram / 2**30:.1f} GiB of memory, "
            f"{free_ram / 2**30:.1f} GiB are free: {fix}, or an approximate --faiss "
            "(e.g. IVF1024,PQ64)",
            code="insufficient_memory",
            needed_bytes=ram,
            free_bytes=free_ram,
        )
