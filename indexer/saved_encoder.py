"""The encoder an index was built with, rebuilt from its saved artifacts (the family's
state, second moments, whitener) and checked against its manifest: what opening an index and
``influence index verify`` both need."""

from __future__ import annotations

from pathlib import Path

import torch

from api.errors import ArtifactError, ConfigError
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.optimizer_state import load_second_moments
from encoder.tensor_files import load_tensors
from encoder.whitening import Whitener
from indexer import integrity
from indexer import manifest as mf


def build_encoder(
    index_dir: Path, manifest: mf.Manifest, model: torch.nn.Module
) -> TrackStarEncoder:
    """The encoder an index was built with, from its saved artifacts.

    Raises:
        ArtifactError: the family's saved state does not fit the plan (or, gaussian, differs
            from what the seed draws); a whitener the manifest does not describe.
    """
    fp = manifest.fingerprint
    config = FingerprintConfig.from_dict(fp["config"])
    second_moments = (
        load_second_moments(index_dir / mf.SECOND_MOMENTS, model) if config.correction else None
    )
    whitener = Whitener.load(index_dir / mf.WHITENER) if config.hessian != "none" else None
    if whitener is not None and (
        whitener.lambda_ != fp["lambda"] or (config.hessian == "train" and whitener.lambda_ != 0)
    ):
        raise ArtifactError(
            f"the whitener mixes R_eval with lambda {whitener.lambda_}, the manifest says hessian "
            f"{config.hessian!r}, lambda {fp['lambda']}",
            code="manifest_mismatch",
        )
    encoder = TrackStarEncoder(model, config, second_moments=second_moments)
    shapes = {m.name: [m.out_features, m.in_features] for m in encoder.modules}
    if encoder.module_names != fp["modules"] or shapes != fp.get("shapes"):
        raise ArtifactError(
            "the model's tracked modules (names or shapes) differ from those the index was built with",
            code="manifest_mismatch",
        )
    if encoder.block_dims != fp["block_dims"]:
        raise ArtifactError(
            f"the config sizes the fingerprint blocks as {encoder.block_dims}, the manifest "
            f"says {fp['block_dims']}",
            code="manifest_mismatch",
        )
    saved = load_tensors(index_dir / mf.PROJECTIONS) if integrity.has_projections(manifest) else {}
    try:
        encoder.family.restore(saved)
    except ConfigError as exc:
        raise ArtifactError(
            f"the index's saved {config.projection} state does not fit: {exc}",
            code="manifest_mismatch",
        ) from exc
    if encoder.needs_fit:
        raise ArtifactError(
            f"the index holds no saved {config.projection} state", code="manifest_mismatch"
        )
    if whitener is not None:
        try:
            encoder.set_whitener(whitener)
        except ConfigError as exc:
            raise ArtifactError(str(exc), code="manifest_mismatch") from exc
    return encoder
