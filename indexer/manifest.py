"""The index manifest: what was built, from what, and a checksum per file (DESIGN.md,
"Index artifacts").

The manifest is the last file written into a staging directory before it is published by
an atomic rename, so a directory holding a ``manifest.json`` is a complete index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.errors import ArtifactError
from encoder.hashing import sha256_file
from indexer.files import write_atomic

FORMAT_VERSION = 4
"""4: the sketch's hash is counter-based (``encoder.projection.sketch_hash``: made on any
device, never stored) and a sketch index stores the exact stage's norms; 3 (fitted artifacts
record the fingerprint config they were fitted with, the fingerprint entry the tracked
modules' shapes), 2 and 1 are refused (rebuild)."""
MANIFEST = "manifest.json"
PROJECTIONS = "projections.safetensors"
WHITENER = "whitener.safetensors"
R_TRAIN = "r_train.safetensors"
R_EVAL = "r_eval.safetensors"
SECOND_MOMENTS = "second_moments.safetensors"
FAISS_INDEX = "index.faiss"
FINGERPRINTS = "fingerprints.f16.npy"
EXACT_NORMS = "exact_norms.f64.npy"
METADATA = "metadata.sqlite"
BM25_DIR = "bm25"
BM25_IDS = "ids.npy"
"""The lexical index's folder (``indexer.bm25``); its files are listed like every artifact."""


def checksums(directory: Path, names: list[str]) -> dict[str, str]:
    """{file name: sha256} for the given files of a directory."""
    return {n: sha256_file(directory / n) for n in sorted(names)}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` all or nothing (``indexer.workdir.write_atomic``)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@dataclass(frozen=True)
class ModelEntry:
    """The model an index was built with: where it was, its name for people, and the
    hashes that opening checks it against."""

    path: str
    name: str
    hash: str
    tokenizer_hash: str


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, the on-disk format as code (DESIGN.md, "Index artifacts"): written
    by ``indexer.publish``, read by ``engine.index`` and every ``influence index`` command.

    Attributes:
        model: the model entry.
        fingerprint: ``config`` (``FingerprintConfig.to_dict``), ``lambda``,
            ``second_moments``, ``modules``, ``shapes`` ({module: [out, in]}), ``block_dims``,
            ``plan``.
        counts: ``sequences``, ``documents``, ``tokens``, ``dropped``, ``dim``.
        faiss: ``factory``, ``exact``, ``recall``.
        corpus: what was chunked, and how.
        storage: the stored dtypes.
        build: the build key and how the build ran (volatile).
        created_at: ISO time of publishing (volatile).
        files: {relative file name: sha256} of every artifact.
        format_version: ``FORMAT_VERSION``.
    """

    model: ModelEntry
    fingerprint: dict[str, Any]
    counts: dict[str, int]
    faiss: dict[str, Any]
    corpus: dict[str, Any]
    storage: dict[str, str]
    build: dict[str, Any]
    created_at: str
    files: dict[str, str]
    format_version: int = FORMAT_VERSION

    @property
    def sequences(self) -> int:
        return int(self.counts["sequences"])

    @property
    def factory(self) -> str:
        return str(self.faiss["factory"])

    @property
    def version(self) -> str:
        """Content hash (16 hex chars) without the ``VOLATILE_KEYS``: the ``index_version``
        the service reports, equal for two builds of identical inputs."""
        content = {k: v for k, v in self.to_dict().items() if k not in VOLATILE_KEYS}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """Parse a manifest dict.

        Raises:
            ArtifactError: another format version, or missing / unknown / mistyped entries.
        """
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: format version {data.get('format_version')!r}, this build reads "
                f"{FORMAT_VERSION}: rebuild the index",
                code="format_version",
            )
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ArtifactError(
                f"{where}: missing entries {sorted(names - set(data))}, unknown entries "
                f"{sorted(set(data) - names)}",
                code="manifest_mismatch",
            )
        try:
            model = ModelEntry(**data["model"])
        except TypeError as exc:
            raise ArtifactError(
                f"{where}: bad model entry: {exc}", code="manifest_mismatch"
            ) from exc
        manifest = cls(**{**data, "model": model})
        for name in names - {"model", "format_version"}:
            expected = str if name == "created_at" else dict
            if not isinstance(getattr(manifest, name), expected):
                raise ArtifactError(
                    f"{where}: entry {name!r} is not a {expected.__name__}",
                    code="manifest_mismatch",
                )
        return manifest

    @classmethod
    def read(cls, index_dir: Path) -> Manifest:
        """Load ``index_dir/manifest.json``.

        Raises:
            ArtifactError: no manifest (code ``not_an_index``), unreadable JSON, or any
                ``from_dict`` refusal.
        """
        path = Path(index_dir) / MANIFEST
        if not path.is_file():
            raise ArtifactError(
                f"{index_dir} is not an index directory (no {MANIFEST})", code="not_an_index"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ArtifactError(f"{path} is not a JSON object")
        return cls.from_dict(data, str(path))

    def write(self, index_dir: Path) -> None:
        write_json_atomic(Path(index_dir) / MANIFEST, self.to_dict())


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """``manifest.json`` as a dict, checked like ``Manifest.read``."""
    return Manifest.read(index_dir).to_dict()


VOLATILE_KEYS = ("created_at", "build")
"""Manifest entries that say when and how fast a build ran, not what it built."""


def manifest_version(index_dir: Path) -> str:
    """``Manifest.version`` of the index in ``index_dir``."""
    return Manifest.read(index_dir).version


def verify_checksums(index_dir: Path, manifest: Manifest) -> None:
    """Check every file listed in the manifest against its sha256.

    Raises:
        ArtifactError: code ``checksum_mismatch`` naming the first bad or missing file.
    """
    for name, expected in sorted(manifest.files.items()):
        path = Path(index_dir) / name
        if not path.is_file():
            raise ArtifactError(
                f"index file {name} is missing from {index_dir}", code="checksum_mismatch"
            )
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
