"""Cross-checks of a published index: the manifest's config against its artifacts.

The checksums prove the files are the ones the manifest lists; these checks prove the
manifest describes them. The files a config needs follow from it (``required_files``) and
must all be listed, no file the config excludes may be (a whitener iff a Hessian, second
moments iff the optimizer correction, projections iff k > 0), and a sample of the stored
fingerprints must be finite and, with ``unit_norm``, of norm 1. Finally a few indexed
sequences are re-encoded with the encoder the manifest describes: their fingerprints must
equal the stored ones, which catches any edit of the config that changes the math.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from api.errors import ArtifactError
from encoder.batching import collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.model_loading import model_hash, tokenizer_hash
from encoder.tensor_files import FITTED_WITH, read_metadata
from indexer import manifest as mf
from indexer.metadata import MetadataStore

NORM_SAMPLE = 256
"""Stored fingerprints whose norms are checked at open and by verify."""
REENCODE_SAMPLE = 2
"""Indexed sequences re-encoded and compared with their stored fingerprints."""
REENCODE_MAX_NORM_ERROR = 1e-3
"""Relative agreement of a re-encoded sequence's exact-stage norm with the stored one (float32
passes in another batch shape: < 1e-5; another model or whitening: far more)."""
REENCODE_MIN_COSINE = 0.999
"""Agreement a re-encoded sequence must reach: float16 storage costs < 1e-6 in cosine and the
build's batch shape < 1e-5; a changed hessian / correction / mode / k / seed costs far more."""


def has_projections(manifest: mf.Manifest) -> bool:
    """Whether the index projects any module (its manifest's plan)."""
    return any(sizes is not None for sizes in manifest.fingerprint["plan"].values())


def required_files(manifest: mf.Manifest) -> set[str]:
    """The files an index with this manifest's fingerprint config must hold."""
    cfg = FingerprintConfig.from_dict(manifest.fingerprint["config"])
    need = {mf.FAISS_INDEX, mf.FINGERPRINTS, mf.METADATA, f"{mf.BM25_DIR}/{mf.BM25_IDS}"}
    if has_projections(manifest):
        need.add(mf.PROJECTIONS)
    if cfg.correction:
        need.add(mf.SECOND_MOMENTS)
    if cfg.hessian != "none":
        need |= {mf.WHITENER, mf.R_TRAIN}
    return need


def excluded_files(manifest: mf.Manifest) -> set[str]:
    """Files whose presence contradicts the config (they would mean another encoder)."""
    cfg = FingerprintConfig.from_dict(manifest.fingerprint["config"])
    out = set()
    if not has_projections(manifest):
        out.add(mf.PROJECTIONS)
    if not cfg.correction:
        out.add(mf.SECOND_MOMENTS)
    if cfg.hessian == "none":
        out |= {mf.WHITENER, mf.R_TRAIN, mf.R_EVAL}
    return out


def check_listing(manifest: mf.Manifest) -> None:
    """Every file the config needs is listed (and so checksummed); none it excludes is.

    Raises:
        ArtifactError: code ``manifest_mismatch`` naming the files.
    """
    listed = set(manifest.files)
    missing = sorted(required_files(manifest) - listed)
    if missing:
        raise ArtifactError(
            f"the manifest does not list {', '.join(missing)}, which its fingerprint config needs "
            "(an edited manifest, or an incomplete index): rebuild the index",
            code="manifest_mismatch",
        )
    extra = sorted(excluded_files(manifest) & listed)
    if extra:
        raise ArtifactError(
            f"the index holds {', '.join(extra)}, which its fingerprint config does not use "
            "(an edited manifest): rebuild the index",
            code="manifest_mismatch",
        )


FITTED = (mf.PROJECTIONS, mf.WHITENER)
"""Artifacts fitted at build time with the fingerprint config (and so recording it): what
they were fitted with (delta, lambda, seed, ...) cannot be re-derived from them."""


def check_fitted(index_dir: Path, manifest: mf.Manifest) -> None:
    """Every fitted artifact records the fingerprint config the manifest states.

    A config value that only the fit consumed (``delta`` for the whitening, ``lambda`` for
    R, the seed of a fit that projects nothing) leaves the re-encode check unmoved, so the
    manifest's word for it is held against the artifact's own record.

    Raises:
        ArtifactError: code ``manifest_mismatch``, naming the keys that differ (or an
            artifact that records no config).
    """
    stated = manifest.fingerprint["config"]
    for name in FITTED:
        if name not in manifest.files:
            continue
        record = read_metadata(Path(index_dir) / name).get(FITTED_WITH)
        if record is None:
            raise ArtifactError(
                f"{name} does not record the fingerprint config it was fitted with "
                "(an index from an older build): rebuild the index",
                code="manifest_mismatch",
            )
        fitted = json.loads(record)
        keys = sorted(k for k in set(stated) | set(fitted) if stated.get(k) != fitted.get(k))
        if keys:
            differ = ", ".join(
                f"{k} {stated.get(k)!r} (fitted with {fitted.get(k)!r})" for k in keys
            )
            raise ArtifactError(
                f"the manifest's fingerprint config is not the one {name} was fitted with: {differ}; "
                "rebuild the index",
                code="manifest_mismatch",
                keys=", ".join(keys),
            )


def check_model(manifest: mf.Manifest, model_dir: Path) -> None:
    """The model and tokenizer in ``model_dir`` are the ones the index was built with.

    Raises:
        ArtifactError: code ``model_missing`` (no such directory) or ``model_mismatch``.
    """
    if not model_dir.is_dir():
        raise ArtifactError(
            f"the index's model directory {model_dir} does not exist; pass the model directory",
            code="model_missing",
        )
    if model_hash(model_dir) != manifest.model.hash:
        raise ArtifactError(
            f"the model in {model_dir} is not the model this index was built with (hash "
            "mismatch); rebuild the index or pass the right model",
            code="model_mismatch",
        )
    if tokenizer_hash(model_dir) != manifest.model.tokenizer_hash:
        raise ArtifactError(
            f"the tokenizer in {model_dir} differs from the one this index was built with",
            code="model_mismatch",
        )


def check_fingerprints(fingerprints: np.ndarray, manifest: mf.Manifest) -> None:
    """A sample of stored fingerprints is finite and, with ``unit_norm``, of norm 1.

    Raises:
        ArtifactError: code ``nonfinite_fingerprints`` or ``manifest_mismatch``.
    """
    n = len(fingerprints)
    if n == 0:
        return
    rows = np.unique(np.linspace(0, n - 1, min(n, NORM_SAMPLE)).astype(np.int64))
    sample = np.asarray(fingerprints[rows], dtype=np.float32)
    if not np.isfinite(sample).all():
        raise ArtifactError(
            "the index stores non-finite fingerprints (NaN or inf): rebuild it "
            "(check the optimizer state it was built with)",
            code="nonfinite_fingerprints",
        )
    d = sample.shape[1]
    norms = np.linalg.norm(sample.astype(np.float64), axis=1)
    # float16 rounding moves each entry by <= 2^-11 of itself: the norm by <= 2^-11 (+ d x
    # half the subnormal spacing, for the tiny entries).
    tol = 2.0**-11 + d * 2.0**-25
    unit = np.abs(norms - 1.0) <= tol
    cfg = FingerprintConfig.from_dict(manifest.fingerprint["config"])
    if cfg.unit_norm and not unit.all():
        raise ArtifactError(
            f"the config says unit_norm but {int((~unit).sum())} of {len(rows)} sampled "
            f"fingerprints are not of norm 1: the manifest does not describe this index",
            code="manifest_mismatch",
        )
    if not cfg.unit_norm and unit.all() and len(rows) > 1:
        raise ArtifactError(
            "the config says unit_norm false but every sampled fingerprint has norm 1: "
            "the manifest does not describe this index",
            code="manifest_mismatch",
        )


def check_reencoded(
    encoder: TrackStarEncoder,
    token_ids: list[list[int]],
    stored: np.ndarray,
    pad_id: int,
    stored_sq: np.ndarray | None = None,
) -> None:
    """Re-encode indexed sequences; each must match its stored fingerprint (and, given
    ``stored_sq``, its stored exact-stage norm).

    Args:
        encoder: the encoder the manifest describes.
        token_ids: the sequences' indexed token ids.
        stored: [S, d] their stored fingerprints.
        pad_id: the tokenizer's pad id.
        stored_sq: [S] their stored exact-stage squared norms, or None.
    Raises:
        ArtifactError: code ``manifest_mismatch`` with the worst cosine or norm.
    """
    if not token_ids:
        return
    sq = torch.zeros(len(token_ids), dtype=torch.float64, device=encoder.device)
    batch = collate([sequence_example(ids) for ids in token_ids], pad_id)
    e = encoder.encode(batch, sq).float().cpu().numpy()
    if stored_sq is not None:
        error = np.abs(sq.cpu().numpy() / np.maximum(stored_sq, 1e-300) - 1.0)
        if not (error <= REENCODE_MAX_NORM_ERROR).all():
            raise ArtifactError(
                f"the stored exact-stage norms ({mf.EXACT_NORMS}) are not the re-encoded "
                f"sequences' (relative error {float(error.max()):.2e}): rebuild the index",
                code="manifest_mismatch",
            )
    s = np.asarray(stored, dtype=np.float32)
    cos = np.sum(e * s, axis=1) / np.maximum(
        np.linalg.norm(e, axis=1) * np.linalg.norm(s, axis=1), 1e-30
    )
    if not (cos >= REENCODE_MIN_COSINE).all():
        raise ArtifactError(
            f"re-encoding indexed sequences with the manifest's fingerprint config does not give their "
            f"stored fingerprints (cosine {float(cos.min()):.4f}): the config or the model differs from "
            "the build's; rebuild the index",
            code="manifest_mismatch",
        )


def reencode_rows(n: int) -> list[int]:
    """The rows ``check_reencoded`` samples: the first and the last (deterministic)."""
    return sorted({0, n - 1})[:REENCODE_SAMPLE] if n > 0 else []


def check_against_encoder(
    encoder: TrackStarEncoder,
    store: MetadataStore,
    fingerprints: np.ndarray,
    manifest: mf.Manifest,
    pad_id: int,
    exact_sq: np.ndarray | None = None,
) -> None:
    """``check_fingerprints`` on a sample, then ``check_reencoded`` on ``reencode_rows`` (with
    the stored exact-stage norms ``exact_sq`` where the index has them): what
    open and verify both check once the encoder the manifest describes is built."""
    check_fingerprints(fingerprints, manifest)
    rows = reencode_rows(len(fingerprints))
    sq = None if exact_sq is None else exact_sq[rows]
    check_reencoded(encoder, store.token_ids_many(rows), fingerprints[rows], pad_id, sq)


def load_exact_norms(index_dir: Path, manifest: mf.Manifest) -> np.ndarray | None:
    """The exact second stage's squared norm of every sequence (``mf.EXACT_NORMS``: [n]
    float64, stored by a build whose family has them), or None for an index without them
    (the second stage then computes them).

    Raises:
        ArtifactError: the file does not hold one norm per sequence.
    """
    if mf.EXACT_NORMS not in manifest.files:
        return None
    sq: np.ndarray = np.load(index_dir / mf.EXACT_NORMS)
    if sq.shape != (manifest.sequences,) or sq.dtype != np.float64:
        raise ArtifactError(
            f"{mf.EXACT_NORMS} holds {sq.dtype} {list(sq.shape)}, not one float64 per sequence "
            f"({manifest.sequences})"
        )
    return sq
