"""Async micro-batcher: concurrent queries share one encode pass on the accelerator.

A single consumer task takes the first waiting query and everything already queued, waits
(at most ``max_wait_ms``) for more only while the batch is smaller than the number of
clients likely to be active (see ``_gather``), never beyond ``max_batch_size``, and runs the batch in a worker thread (so
encoding and search never block the event loop) on a leased index. The queue is bounded:
when it is full, ``submit`` raises ``OverloadedError`` (503 + Retry-After) at once instead
of letting latency pile up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from api.errors import InfluenceError, OverloadedError, QueryTimeoutError
from engine.batch import failure, run_batch
from engine.query import Limits, Outcome, Query
from service.state import IndexState
from service.work import WorkMeter, candidates

log = logging.getLogger(__name__)


@dataclass
class _Item:
    query: Query
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    gave_up: threading.Event = field(default_factory=threading.Event)
    """Set when the request timed out: the worker drops the query at its next chunk."""

    def abandoned(self, _: int = 0) -> bool:
        """Whether its request gave up (``run_batch``'s ``abandoned`` for this item alone)."""
        return self.gave_up.is_set()


BatchObserver = Callable[[list[Outcome]], None]


class MicroBatcher:
    """Bounded queue + bounded wait + bounded batch in front of ``run_batch``.

    Args:
        state: the served index (each batch takes one lease).
        limits: token limits passed to validation.
        max_batch_size: queries per encode pass.
        max_wait_ms: at most how long the first query of a batch waits for others (only
            while fewer have gathered than there are clients likely to be active).
        max_queue: queries allowed to wait; more are refused with ``OverloadedError``.
        timeout_s: per-query bound on queue + compute time.
        observe: called with each finished batch's outcomes (metrics).
    """

    def __init__(
        self,
        state: IndexState,
        limits: Limits,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        timeout_s: float,
        observe: BatchObserver | None = None,
    ) -> None:
        self.state = state
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.observe = observe
        self.meter = WorkMeter(timeout_s)
        """Admission by work (``service.work``): what a request may cost against the timeout."""
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        # How many mates the next batch waits for (see _gather): the previous batch's size,
        # and when it finished (queries queued before then came from other clients).
        self._previous = 0
        self._last_done = float("-inf")
        # One worker thread: batches run one at a time on the device.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influence-batch")

    @property
    def depth(self) -> int:
        """Queries waiting (not yet taken into a batch)."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.create_task(self._run(), name="influence-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, queries: list[Query]) -> list[Outcome]:
        """Enqueue queries (all or none) and wait for their outcomes, in order.

        Raises:
            OverloadedError: the queue cannot take all of them.
            WorkOverBudgetError: their estimated work alone outlasts ``timeout_s`` (413).
            BacklogError: with the work admitted before them it would (503, Retry-After).
            QueryTimeoutError: they did not finish within ``timeout_s``.
        """
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self._queue.qsize() + len(queries) > self.max_queue:
            raise OverloadedError(
                f"{self._queue.qsize()} queries are waiting (limit {self.max_queue}); retry later",
                queue_depth=self._queue.qsize(),
            )
        default, size = (
            (self.state.current.default_rescore, self.state.current.size)
            if self.state.ready
            else (0, 0)
        )
        caps = [candidates(q, default, size) for q in queries]
        admitted = self.meter.admit(caps)  # 413 / 503 before queueing
        loop = asyncio.get_running_loop()
        items = [_Item(q, loop.create_future()) for q in queries]
        for item in items:  # no await between the check and the puts: all fit
            self._queue.put_nowait(item)
        try:
            async with asyncio.timeout(self.timeout_s):
                return list(await asyncio.gather(*(item.future for item in items)))
        except TimeoutError:
            for item in items:
                item.gave_up.set()
                item.future.cancel()
            raise QueryTimeoutError(
                f"the query did not finish within {self.timeout_s:g} s; retry later"
            ) from None
        finally:
            self.meter.release(admitted)

    async def _gather(self) -> list[_Item]:
        """The next batch: the first waiting item, everything already queued, and (for at
        most ``max_wait_ms``) later arrivals until the batch holds as many queries as there
        are clients likely to be active.

        That estimate is the previous batch's size (its clients come back together) plus
        the queries that arrived while it ran, so a lone client never waits and groups that
        fell out of step merge again. ``max_wait_ms`` must cover parsing the returning
        clients' requests (benchmarks/results/bench_service.md).
        """
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        self._take_queued(batch)
        arrived_while_running = sum(item.enqueued < self._last_done for item in batch)
        target = min(self.max_batch_size, self._previous + arrived_while_running)
        while len(batch) < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
            self._take_queued(batch)
        self._previous = len(batch)
        return [item for item in batch if not item.future.done()]

    def _take_queued(self, batch: list[_Item]) -> None:
        """Move already queued items into ``batch``, up to ``max_batch_size``."""
        assert self._queue is not None
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _compute(self, items: list[_Item]) -> list[Outcome]:
        """``run_batch`` on a leased index, dropping the queries whose requests timed out.
        ``run_batch`` isolates each query's failure; should the batch still raise something
        other than a project error (a shared step's bug), each query is answered alone, so
        that only the one that breaks it fails."""
        queries = [item.query for item in items]
        with self.state.lease() as index:
            try:
                return run_batch(index, queries, self.limits, lambda i: items[i].abandoned())
            except InfluenceError:
                raise
            except Exception:
                if len(queries) == 1:
                    raise
                log.exception(
                    "a batch of %d failed; answering its queries one by one", len(queries)
                )
            outcomes = []
            for item in items:
                try:
                    outcomes.extend(run_batch(index, [item.query], self.limits, item.abandoned))
                except Exception as exc:
                    outcomes.append(Outcome(error=failure(exc, "the batch"), batch_size=1))
            return outcomes

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._compute, batch)
            except asyncio.CancelledError:
                for item in batch:
                    item.future.cancel()
                raise
            except Exception as exc:  # delivered to the waiting requests, never lost
                self._last_done = time.monotonic()
                error = failure(exc, "the batch")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self._last_done = time.monotonic()
            self.meter.observe(outcomes)
            for item, outcome in zip(batch, outcomes, strict=True):
                if not item.future.done():
                    item.future.set_result(outcome)
            if self.observe is not None:
                self.observe(outcomes)
