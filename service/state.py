"""The index being served and its hot swap.

Work on the index takes a lease (``with state.lease() as index``) for its whole duration.
A reload opens the new directory off the event loop, swaps the reference atomically, and
closes the old index only when its last lease is returned, so in-flight requests finish
on the index they started on. A new index that fails to open is refused and the old one
keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from api.errors import ArtifactError, InfluenceError, NotFoundError, NotReadyError, safe_text
from engine.protocols import Index
from service.threads import in_passing_thread

log = logging.getLogger(__name__)

IndexOpener = Callable[[Path], Index]
"""Opens an index directory (blocking; ``engine.index.InfluenceIndex.open`` in service)."""


def freeze_heap() -> None:
    """Take everything alive now (model, tokenizer, FAISS, the imported libraries: ~400k
    objects) out of the cyclic garbage collector's generations.

    Otherwise every full collection scans them all with the GIL held, at moments set by
    allocation counts: under load that stalls every in-flight request at once and was the p99
    tail of benchmarks/bench_service. Frozen
    objects are still freed by reference counting; cycles among a replaced index's objects
    are collected at the next reload (unfreeze, collect, freeze again).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.info(
        "froze %d long-lived objects out of the garbage collector's scans", gc.get_freeze_count()
    )


class _Handle:
    """One opened index plus the count of leases on it."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.leases = 0
        self.retired = False

    def close(self) -> None:
        try:
            self.index.close()
        except Exception:  # closing must never take the service down
            log.exception("closing index %s failed", self.index.index_dir)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL byte: no such directory
        return False


class IndexState:
    """Holds the current index; swap-safe for concurrent readers.

    Args:
        opener: ``Path -> index``; blocking (runs in a worker thread).
        index_dir: the configured directory, reloaded by default.
        freeze_heap: after each successful load, freeze the heap out of the cyclic GC's
            scans (``freeze_heap()``; the service does, unit tests need not).
    """

    def __init__(
        self,
        opener: IndexOpener,
        index_dir: Path | None,
        *,
        freeze_heap: bool = False,
        on_swap: Callable[[Index], None] | None = None,
    ) -> None:
        self.freeze_heap = freeze_heap
        self.on_swap = on_swap
        """Called with each index swapped in (metrics that describe the served index)."""
        self._opener = opener
        self.index_dir = index_dir
        self._current: _Handle | None = None
        self._guard = threading.Lock()
        self._reload_lock = asyncio.Lock()
        self.load_error: InfluenceError | None = None

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> Index:
        """The current index (no lease: for quick reads of immutable attributes only)."""
        handle = self._current
        if handle is None:
            raise NotReadyError(self._not_ready_message())
        return handle.index

    def _not_ready_message(self) -> str:
        if self.load_error is not None:
            return f"no index loaded: {self.load_error.message}"
        if self.index_dir is None:
            return "no index configured (set INFLUENCE_INDEX_DIR or --index)"
        return "the index is still loading"

    @contextmanager
    def lease(self) -> Iterator[Index]:
        """Borrow the current index; it stays open until the lease is returned.

        Raises:
            NotReadyError: no index is loaded.
        """
        with self._guard:
            handle = self._current
            if handle is None:
                raise NotReadyError(self._not_ready_message())
            handle.leases += 1
        try:
            yield handle.index
        finally:
            with self._guard:
                handle.leases -= 1
                close_now = handle.retired and handle.leases == 0
            if close_now:
                handle.close()

    def _swap(self, index: Index) -> Index | None:
        """Install ``index``; retire the old one (closed when its last lease returns)."""
        with self._guard:
            old = self._current
            self._current = _Handle(index)
            if old is not None:
                old.retired = True
            close_now = old is not None and old.leases == 0
        if self.on_swap is not None:
            self.on_swap(index)
        if old is None:
            return None
        if close_now:
            old.close()
        return old.index

    async def reload(self, index_dir: Path | None = None) -> tuple[Index, Index | None]:
        """Open ``index_dir`` (default: the configured one) and swap it in.

        Returns:
            (new index, previous index or None).
        Raises:
            InfluenceError: the new index cannot be opened; the old one keeps serving.
        """
        target = Path(index_dir) if index_dir is not None else self.index_dir
        if target is None:
            raise NotReadyError("no index directory configured")
        async with self._reload_lock:
            try:
                if not _is_dir(target):
                    raise NotFoundError(
                        f"index directory {safe_text(target)} does not exist",
                        code="index_not_found",
                    )
                try:
                    index = await in_passing_thread(self._opener, target)
                except InfluenceError:
                    raise
                except Exception as exc:  # a corrupt file surfaces as OSError, RuntimeError...
                    raise ArtifactError(f"cannot open index {target}: {exc}") from exc
            except InfluenceError as exc:
                log.error("refused index %s: [%s] %s", target, exc.code, exc.message)
                if self._current is None:
                    self.load_error = exc
                raise
            previous = self._swap(index)
            self.index_dir = target
            self.load_error = None
            if self.freeze_heap:
                freeze_heap()
            log.info(
                "serving index %s version %s (%d examples) from %s",
                target,
                index.version,
                index.size,
                index.summary().backend,
            )
            return index, previous

    def close(self) -> None:
        """Retire the current index (closed once idle)."""
        with self._guard:
            handle, self._current = self._current, None
            if handle is None:
                return
            handle.retired = True
            close_now = handle.leases == 0
        if close_now:
            handle.close()
