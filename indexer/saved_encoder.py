"""The encoder an index was built with, rebuilt from its saved artifacts (projections,
second moments, whitener) and checked against its manifest: what opening an index and
``influence index verify`` both need."""

from __future__ import annotations

from pathlib import Path

import torch

from encoder.basis import load_fitted
from encoder.config import FingerprintConfig
from encoder.errors import ArtifactError, ConfigError
from encoder.fingerprint import TrackStarEncoder
from encoder.optimizer_state import load_second_moments
from encoder.whitening import Whitener
from indexer import integrity
from indexer import manifest as mf


def _check_saved_gaussian(encoder: TrackStarEncoder, saved: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    """A gaussian index's saved matrices are the ones its seed generates."""
    projections = encoder.projections()
    if not projections:
        return
    if saved is None or set(saved) != set(projections):
        raise ArtifactError("the saved projections name other modules than the config projects",
                            code="manifest_mismatch")  # fmt: skip
    for name, (a, b) in projections.items():
        if not (torch.equal(saved[name][0], a) and torch.equal(saved[name][1], b)):
            raise ArtifactError(f"projection of {name} differs from the saved one (seed or torch RNG changed)",
                                code="manifest_mismatch")  # fmt: skip


def build_encoder(index_dir: Path, manifest: mf.Manifest, model: torch.nn.Module) -> TrackStarEncoder:
    """The encoder an index was built with, from its saved artifacts.

    Raises:
        ArtifactError: the saved projections do not fit the plan, or (gaussian) differ from
            those the config generates; a whitener the manifest does not describe.
    """
    fp = manifest.fingerprint
    config = FingerprintConfig.from_dict(fp["config"])
    second_moments = load_second_moments(index_dir / mf.SECOND_MOMENTS, model) if config.correction else None
    whitener = Whitener.load(index_dir / mf.WHITENER) if config.hessian != "none" else None
    if whitener is not None and (whitener.lambda_ != fp["lambda"] or (config.hessian == "train" and whitener.lambda_ != 0)):
        raise ArtifactError(f"the whitener mixes R_eval with lambda {whitener.lambda_}, the manifest says hessian "
                            f"{config.hessian!r}, lambda {fp['lambda']}", code="manifest_mismatch")  # fmt: skip
    saved, roots = load_fitted(index_dir / mf.PROJECTIONS) if integrity.has_projections(manifest) else (None, None)
    fitted = None if config.projection == "gaussian" else (roots or {}) if config.projection == "sketch" else saved
    try:  # a fitted basis is installed before the second moments: one correction set-up
        encoder = TrackStarEncoder(model, config, second_moments=second_moments, whitener=whitener,
                                   projections=fitted)  # fmt: skip
    except ConfigError as exc:
        raise ArtifactError(f"the saved projection basis does not fit the model: {exc}",
                            code="manifest_mismatch") from exc  # fmt: skip
    shapes = {m.name: [m.out_features, m.in_features] for m in encoder.modules}
    if encoder.module_names != fp["modules"] or shapes != fp.get("shapes"):
        raise ArtifactError("the model's tracked modules (names or shapes) differ from those the index was built with",
                            code="manifest_mismatch")
    if encoder.block_dims != fp["block_dims"]:
        raise ArtifactError(f"the config sizes the fingerprint blocks as {encoder.block_dims}, the manifest "
                            f"says {fp['block_dims']}", code="manifest_mismatch")  # fmt: skip
    if config.projection == "gaussian":
        _check_saved_gaussian(encoder, saved)
    if config.projection == "kfac":
        encoder.kfac_roots = roots
    if config.projection in ("kfac", "sketch"):
        if encoder.kfac_roots is None or set(encoder.kfac_roots) != set(encoder.module_names):
            raise ArtifactError("a kfac index's projections file lacks the whitening of some module",
                                code="manifest_mismatch")  # fmt: skip
    return encoder
