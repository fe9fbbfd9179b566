"""Where the service runs model work besides its queries.

torch runs its parallel CPU kernels on an OpenMP team of the calling thread, kept for as long
as that thread lives, and two teams on the same cores slow each other's kernels down (a
query's second stage ran markedly slower on the batcher's thread once another thread had used
torch: ``benchmarks/results/bench_service_demo_default.md`` is measured with this module,
``bench_service_demo_default_before_threads.md`` without). Queries run on the batcher's one thread; work besides them (opening an index,
explaining a result) runs on a thread of its own that ends with it and takes its team along.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


async def in_passing_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a new thread that exits once it returns (also when the awaiting task
    is cancelled: the call runs to its end, then the thread goes)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influence-aside")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    finally:
        executor.shutdown(wait=False)
