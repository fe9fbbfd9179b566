"""``influence index verify``: checksums, counts across artifacts, model hash."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from api.errors import ArtifactError
from encoder.model_loading import load_model, load_tokenizer
from indexer import integrity
from indexer import manifest as mf
from indexer.metadata import MetadataStore
from indexer.saved_encoder import build_encoder

FINITE_CHUNK = 65_536


def verify_index(index_dir: Path, model_dir: Path | None = None) -> list[str]:
    """Check an index directory end to end.

    Returns:
        human-readable lines, one per passed check.
    Raises:
        ArtifactError: the first failed check, with a clear message.
    """
    lines = []
    m = mf.Manifest.read(index_dir)
    integrity.check_listing(m)
    mf.verify_checksums(index_dir, m)
    lines.append(f"checksums: {len(m.files)} files OK, every file the config needs listed")
    integrity.check_fitted(index_dir, m)
    fitted = [name for name in integrity.FITTED if name in m.files]
    if fitted:
        lines.append(
            f"fitted artifacts: {', '.join(fitted)} record the manifest's fingerprint config"
        )
    fps = np.load(index_dir / mf.FINGERPRINTS, mmap_mode="r")
    index = faiss.read_index(str(index_dir / mf.FAISS_INDEX))
    store = MetadataStore(index_dir / mf.METADATA)
    try:
        return lines + _verify_contents(index_dir, model_dir, m, fps, index, store)
    finally:
        store.close()


def _verify_contents(
    index_dir: Path,
    model_dir: Path | None,
    m: mf.Manifest,
    fps: np.ndarray,
    index: faiss.Index,
    store: MetadataStore,
) -> list[str]:
    """Counts, the model, every fingerprint finite, and the config against the encoder."""
    lines = []
    n, d = m.sequences, m.counts["dim"]
    n_meta = store.count()
    if fps.shape != (n, d) or index.ntotal != n or index.d != d or n_meta != n:
        raise ArtifactError(
            f"counts disagree: manifest {n}x{d}, fingerprints {list(fps.shape)}, "
            f"FAISS {index.ntotal}x{index.d}, metadata {n_meta}",
            code="count_mismatch",
        )
    lines.append(f"counts: {n} sequences x {d} dims in fingerprints, FAISS and metadata")
    mdir = model_dir or Path(m.model.path)
    integrity.check_model(m, mdir)
    lines.append(f"model: {mdir} matches")
    for start in range(0, n, FINITE_CHUNK):
        if not np.isfinite(np.asarray(fps[start : start + FINITE_CHUNK], dtype=np.float32)).all():
            raise ArtifactError(
                f"the index stores non-finite fingerprints (NaN or inf) from row {start}: rebuild it "
                "(check the optimizer state it was built with)",
                code="nonfinite_fingerprints",
            )
    encoder = build_encoder(index_dir, m, load_model(mdir, device="cpu"))
    pad = int(load_tokenizer(mdir).pad_token_id or 0)
    exact_sq = integrity.load_exact_norms(index_dir, m)
    integrity.check_against_encoder(encoder, store, fps, m, pad, exact_sq)
    lines.append(
        f"fingerprints: all finite; config agrees with the artifacts "
        f"({len(integrity.reencode_rows(n))} sequences re-encoded)"
    )
    return lines
