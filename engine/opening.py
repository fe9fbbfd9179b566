"""Opening a published index: the checks and the parts ``InfluenceIndex.open`` assembles.

``verify_model`` checks the manifest's listing and checksums and the model's hashes
(``indexer.saved_encoder.build_encoder`` then rebuilds the encoder); ``HeldFiles`` keeps
the files read while serving open and notices an in-place edit.
"""

from __future__ import annotations

import os
from pathlib import Path

from api.errors import IndexChangedError
from indexer import integrity
from indexer import manifest as mf

LIVE_FILES = (mf.FINGERPRINTS, mf.METADATA)
"""The files read while serving (memory-mapped fingerprints, SQLite); the rest is in RAM."""


def verify_model(index_dir: Path, manifest: mf.Manifest, model_dir: Path) -> None:
    """The manifest lists what its config needs, every file passes its checksum, and the
    model and tokenizer in ``model_dir`` are the ones the index was built with.

    The fitted artifacts must record the manifest's fingerprint config.

    Raises:
        ArtifactError: codes ``manifest_mismatch``, ``checksum_mismatch``, ``model_missing``,
            ``model_mismatch``.
    """
    integrity.check_listing(manifest)
    mf.verify_checksums(index_dir, manifest)
    integrity.check_fitted(index_dir, manifest)
    integrity.check_model(manifest, model_dir)


class HeldFiles:
    """Open descriptors of an index's live files and their size and mtime at open.

    Holding them keeps the inodes a served index reads alive whatever happens to the path
    (rename-based publishing is always safe); ``check`` notices an in-place modification
    (which would otherwise surface as SIGBUS on a truncated memory map or garbage reads).
    """

    def __init__(self, index_dir: Path, names: tuple[str, ...] = LIVE_FILES) -> None:
        self.fds: dict[str, int] = {}
        self.stats: dict[str, tuple[int, int]] = {}
        for name in names:
            fd = os.open(index_dir / name, os.O_RDONLY)
            st = os.fstat(fd)
            self.fds[name], self.stats[name] = fd, (st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        for name, fd in self.fds.items():
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self.stats[name]:
                raise IndexChangedError(
                    f"index file {name} was modified in place while served (published indexes are "
                    "immutable: publish a new directory and reload)",
                    file=name,
                )

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
