"""Multi-process / multi-node builds under ``torchrun`` (gloo backend, CPU or GPU).

Ranks split the shards (shard s goes to rank s % world_size); rank 0 does the serial steps
(tokenization, statistics merge, publishing). All ranks share the build's work directory,
so a multi-node build needs ``--out`` on a shared filesystem. Synchronization points also
exchange a failure flag, so one rank's error stops the others instead of hanging them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from api.errors import InfluenceError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the build: ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        """Whether this rank encodes ``shard`` (round robin)."""
        return shard % self.world_size == self.rank

    def run(self, fn: Callable[[], T] | None, *, only_main: bool = False) -> T | None:
        """Run ``fn`` (on every rank, or on rank 0 only) and then synchronize.

        Raises:
            the local exception, or ``InfluenceError`` (code ``rank_failed``) when another
            rank failed.
        """
        result, error = None, None
        if fn is not None and (self.is_main or not only_main):
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised after telling the others
                error = exc
        if self.world_size > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if error is None and int(flag) != 0:
                raise InfluenceError(
                    "another rank of the build failed; see its log", code="rank_failed"
                )
        if error is not None:
            raise error
        return result


def init_distributed(timeout_s: float = 7200.0) -> DistContext:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    ctx = DistContext(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    )
    log.info("distributed build: rank %d of %d", ctx.rank, ctx.world_size)
    return ctx


def shutdown() -> None:
    """Tear the process group down (error paths; see ``exit_after_success`` for the normal end)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_after_success(code: int = 0) -> None:
    """End a rank of a finished multi-process build: all ranks meet, then the process exits.

    After the final barrier nothing is in flight (the index is published), so each rank
    flushes its streams and leaves with ``os._exit``: gloo's C++ process-group teardown can
    abort (SIGABRT) and make torchrun report a complete build as failed.
    """
    if dist.is_initialized():
        dist.barrier()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
