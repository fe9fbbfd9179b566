"""The build's work directory: resumable state next to the output, published at the end.

Layout of ``<out parent>/.<out name>.build/``::

    plan.json                 build key; a different key means a different build (wiped)
    tokens.u32, spans.npy     all sequences' token ids and [start, length] per sequence
    tokens.json               counts; written last, marks tokenization complete
    second_moments.safetensors
    stats/train-00003.safetensors, stats/eval.safetensors   per-shard R sums (pass 1)
    phi/00003.npy             cached projected gradients of shard 3 (pass 1 -> pass 2)
    fp/00003.npy              float16 fingerprints of shard 3 (pass 2)
    whitener.safetensors
    staging/                  the index directory being assembled; renamed to <out>

Every file is written to ``*.tmp`` and moved into place with ``os.replace``, so after a
SIGKILL a file either exists complete or not at all and a re-run redoes only missing shards.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from api.errors import ConfigError
from indexer.files import write_atomic


class WorkDir:
    """Paths and atomic writes of one build's work directory."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.root = self.out.parent / f".{self.out.name}.build"
        self.staging = self.root / "staging"

    def path(self, name: str) -> Path:
        return self.root / name

    def stats_path(self, shard: int) -> Path:
        return self.root / "stats" / f"train-{shard:05d}.safetensors"

    def phi_path(self, shard: int) -> Path:
        return self.root / "phi" / f"{shard:05d}.npy"

    def fp_path(self, shard: int) -> Path:
        return self.root / "fp" / f"{shard:05d}.npy"

    def norms_path(self, shard: int) -> Path:
        """The exact stage's squared norms of a shard (``Family.exact_norms``), written
        before its fingerprints (pass 2) or its cached phi (pass 1)."""
        return self.root / "norms" / f"{shard:05d}.npy"

    def prepare(self, build_key: str) -> bool:
        """Create (or reuse) the work directory for ``build_key``.

        Returns:
            True when an earlier run of the same build left state to resume from.
        """
        plan = self.root / "plan.json"
        if plan.is_file():
            try:
                if json.loads(plan.read_text())["build_key"] == build_key:
                    return True
            except (ValueError, KeyError):
                pass
            shutil.rmtree(self.root)
        elif self.root.exists():
            shutil.rmtree(self.root)
        for sub in ("stats", "phi", "fp", "norms", "staging"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        write_atomic(plan, lambda p: p.write_text(json.dumps({"build_key": build_key})))
        return False

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``<parent>/.<out name>.build.lock`` (flock) for the whole build: a second
        build of the same ``--out`` is refused instead of racing this one's work directory.

        Raises:
            ConfigError: code ``build_locked``, naming the holder's pid and host.
        """
        path = self.out.parent / f".{self.out.name}.build.lock"
        fh = path.open("a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise ConfigError(
                    f"another build of {self.out} is running ({holder}); wait for it, or stop it "
                    f"(a stopped build resumes where it left off)",
                    code="build_locked",
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
            fh.flush()
            yield
        finally:
            fh.close()  # releases the lock


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # a work dir resumed from an older build

    def _save(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, array)

    write_atomic(path, _save)


class TokenStore:
    """All sequences' token ids in one flat uint32 file plus [start, length] spans."""

    def __init__(self, work: WorkDir) -> None:
        self.tokens = np.memmap(work.path("tokens.u32"), dtype=np.uint32, mode="r")
        self.spans = np.load(work.path("spans.npy"))

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    def ids(self, seq: int) -> list[int]:
        start, length = (int(x) for x in self.spans[seq])
        return self.tokens[start : start + length].tolist()
