"""The index manifest: what was built, from what, and a checksum per file (DESIGN.md,
"Index artifacts").

The manifest is the last file written into a staging directory before it is published by
an atomic rename, so a directory holding a ``manifest.json`` is a complete index.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from encoder.errors import ArtifactError
from encoder.hashing import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROJECTIONS = "projections.safetensors"
WHITENER = "whitener.safetensors"
R_TRAIN = "r_train.safetensors"
R_EVAL = "r_eval.safetensors"
SECOND_MOMENTS = "second_moments.safetensors"
FAISS_INDEX = "index.faiss"
FINGERPRINTS = "fingerprints.f16.npy"
METADATA = "metadata.sqlite"


def checksums(directory: Path, names: list[str]) -> dict[str, str]:
    """{file name: sha256} for the given files of a directory."""
    return {n: sha256_file(directory / n) for n in sorted(names)}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json``.

    Raises:
        ArtifactError: no manifest, unreadable JSON, or an unknown format version.
    """
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{index_dir} is not an index directory (no {MANIFEST})", code="not_an_index")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {manifest.get('format_version')!r}, "
            f"this build reads {FORMAT_VERSION}"
        )
    return manifest


VOLATILE_KEYS = ("created_at", "build")
"""Manifest entries that say when and how fast a build ran, not what it built."""


def manifest_version(index_dir: Path) -> str:
    """Content hash of the manifest (16 hex chars) without its ``VOLATILE_KEYS``: the
    ``index_version`` the service reports, equal for two builds of identical inputs."""
    manifest = read_manifest(index_dir)
    content = {k: v for k, v in manifest.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def verify_checksums(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in the manifest against its sha256.

    Raises:
        ArtifactError: code ``checksum_mismatch`` naming the first bad or missing file.
    """
    for name, expected in sorted(manifest.get("files", {}).items()):
        path = Path(index_dir) / name
        if not path.is_file():
            raise ArtifactError(f"index file {name} is missing from {index_dir}", code="checksum_mismatch")
        if sha256_file(path) != expected:
            raise ArtifactError(
                f"index file {name} in {index_dir} fails its checksum (corrupt or modified)",
                code="checksum_mismatch",
            )


def display_name(model_dir: Path) -> str:
    """A model's name for people: ``run/checkpoint-N`` for a Trainer checkpoint (the
    checkpoint's base name alone says nothing), else the directory's name."""
    if model_dir.name.startswith("checkpoint-") and model_dir.parent.name:
        return f"{model_dir.parent.name}/{model_dir.name}"
    return model_dir.name
