"""Batch size from free memory (issue 7: "pick batch size automatically from free memory").

The memory of one encode pass is ``fixed + B * per_example``: the model, projections and
the exact path's chunked gradient buffer (``GRADIENT_BUDGET_BYTES``) do not grow with the
batch; activations saved for the backward pass, the captured module inputs, the float32
logits and the per-token output gradients do. Both terms are *measured* on the encoder
itself by probing two small batches of full-length random sequences:

- on CUDA, from the allocator's peak (``torch.cuda.max_memory_allocated``), which counts
  every tensor of the pass, hooks and sinks included;
- on the CPU (no allocator statistics), from the bytes of the tensors autograd saves for the
  backward pass plus the captured module inputs, times ``CPU_TRANSIENT_FACTOR`` for the
  transient buffers (gradients in flight, float32 upcasts) that are not saved.

The batch is the largest B with ``fixed + B * per_example <= fraction * free``, where free
is the device's free memory (``cudaMemGetInfo``; ``MemAvailable`` on the CPU).
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from api.errors import ConfigError
from encoder.batching import TokenBatch, collate, sequence_example

if TYPE_CHECKING:
    from encoder.fingerprint import TrackStarEncoder

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.6
"""Share of the free memory a batch may take (the rest: allocator slack, other work)."""
CPU_TRANSIENT_FACTOR = 2.0
"""CPU estimate: saved activations x this covers the unsaved transients of a pass."""
PROBE_BATCHES = (1, 3)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one encode pass: ``fixed + batch * per_example``."""

    fixed: int
    per_example: int
    method: str  # "cuda-peak" | "cpu-saved-tensors"

    def bytes_for(self, batch: int) -> int:
        return self.fixed + batch * self.per_example


def free_memory(device: torch.device) -> int:
    """Free bytes on the device: cudaMemGetInfo on CUDA, MemAvailable on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory cached by torch's allocator but unused is free for this process too.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not on /proc (macOS): fall back on psutil

    return int(psutil.virtual_memory().available)


def _probe_batch(vocab: int, seq_len: int, batch: int, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, max(2, vocab), (batch, seq_len), generator=g)
    return collate([sequence_example(row.tolist()) for row in ids])


def _saved_bytes(encoder: TrackStarEncoder, batch: TokenBatch) -> int:
    """Bytes autograd saves for backward in one encode pass (distinct storages), plus the
    module inputs the capture hooks keep."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder.project(batch)
    params = {p.untyped_storage().data_ptr() for p in encoder.model.parameters()}
    saved = sum(n for ptr, n in seen.items() if ptr not in params)
    elem = next(encoder.model.parameters()).element_size()
    acts = sum(m.in_features for m in encoder.modules) * batch.input_ids.numel() * elem
    return saved + acts


def _ready(encoder: TrackStarEncoder) -> TrackStarEncoder:
    """The encoder, or a twin on the same modules, shapes and code path (hence the same
    memory) when it cannot encode yet: uniform second moments for a correction without them,
    the family's placeholder state (a sketch: identity whitening) for a fit not made yet."""
    needs_moments = encoder.config.correction and encoder.second_moments is None
    if not needs_moments and not encoder.needs_fit:
        return encoder
    from encoder.fingerprint import TrackStarEncoder
    from encoder.optimizer_state import SecondMoments

    sm = encoder.second_moments
    if needs_moments:
        params = dict(encoder.model.named_parameters())
        v = {m.param_name: torch.ones(params[m.param_name].shape) for m in encoder.modules}
        sm = SecondMoments(v, 1e-8, "probe")
    twin = TrackStarEncoder(encoder.model, encoder.config, second_moments=sm)
    if encoder.needs_fit:
        twin.family.placeholder()
    else:
        twin.family.restore(encoder.family.tensors())
    return twin


@functools.cache
def runtime_bytes() -> int:
    """Resident bytes of a fresh interpreter that has imported torch and transformers: what
    every process of this project holds before any model (measured once per process, in a
    child, so that the caller's own memory does not count; 0 without /proc)."""
    code = (
        "import os, pathlib, torch, transformers; "
        "print(int(pathlib.Path('/proc/self/statm').read_text().split()[1]) "
        "* os.sysconf('SC_PAGE_SIZE'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


def estimate_memory(encoder: TrackStarEncoder, seq_len: int) -> MemoryEstimate:
    """Measure ``fixed`` and ``per_example`` bytes of ``encoder.project`` at ``seq_len``."""
    encoder = _ready(encoder)
    vocab = int(getattr(getattr(encoder.model, "config", None), "vocab_size", 2) or 2)
    b1, b2 = PROBE_BATCHES
    device = encoder.device
    if device.type == "cuda":
        peaks = []
        for b in (b1, b2):
            batch = _probe_batch(vocab, seq_len, b)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            encoder.project(batch)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        per = max(1, (peaks[1] - peaks[0]) // (b2 - b1))
        fixed = max(0, peaks[0] - b1 * per)
        return MemoryEstimate(int(fixed), int(per), "cuda-peak")
    from encoder.products import GRADIENT_BUDGET_BYTES

    s1 = _saved_bytes(encoder, _probe_batch(vocab, seq_len, b1))
    s2 = _saved_bytes(encoder, _probe_batch(vocab, seq_len, b2))
    per = max(1, int(CPU_TRANSIENT_FACTOR * (s2 - s1) / (b2 - b1)))
    # Batch-independent: a chunk of per-example gradients, with x2 headroom for the product's
    # operand copies (the correction is applied in place).
    return MemoryEstimate(2 * GRADIENT_BUDGET_BYTES, per, "cpu-saved-tensors")


def fitting_batch(budget: float, fixed: int, per_example: int, max_batch: int) -> int:
    """The largest batch B <= ``max_batch`` with ``fixed + B * per_example <= budget``,
    rounded down to a multiple of 8 above 8; 0 when not even one fits."""
    batch = int(min((budget - fixed) // per_example, max_batch))
    if batch > 8:
        batch -= batch % 8
    return max(batch, 0)


def auto_batch_size(
    encoder: TrackStarEncoder,
    seq_len: int,
    *,
    free: int | None = None,
    fraction: float = DEFAULT_FRACTION,
    max_batch: int = 256,
) -> tuple[int, MemoryEstimate]:
    """The largest batch whose encode pass fits ``fraction`` of the free memory.

    Args:
        encoder: a ``TrackStarEncoder`` ready to encode.
        seq_len: tokens per sequence (the longest the batches will hold).
        free: free bytes; None = measured on the encoder's device.
        fraction: share of ``free`` the pass may use.
        max_batch: upper bound (past a few hundred sequences nothing gets faster).
    Returns:
        (batch size, the memory estimate it came from); sizes above 8 are multiples of 8.
    Raises:
        ConfigError: code ``insufficient_memory`` when not even one sequence fits.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must lie in (0, 1], got {fraction}")
    est = estimate_memory(encoder, seq_len)
    budget = int(fraction * (free_memory(encoder.device) if free is None else free))
    batch = fitting_batch(budget, est.fixed, est.per_example, max_batch)
    if batch < 1:
        raise ConfigError(
            f"one sequence of {seq_len} tokens needs ~{est.bytes_for(1) / 2**20:.0f} MiB to "
            f"encode but only {budget / 2**20:.0f} MiB are available; shorten --seq-len or "
            "free memory",
            code="insufficient_memory",
        )
    log.info(
        "auto batch size %d: %.1f MiB fixed + %.2f MiB/sequence (%s), budget %.0f MiB",
        batch,
        est.fixed / 2**20,
        est.per_example / 2**20,
        est.method,
        budget / 2**20,
    )
    return batch, est


def candidate_batch_size(
    encoder: TrackStarEncoder, seq_len: int, cap: int, *, free: int | None = None
) -> int:
    """Candidates per backward pass of the exact second stage: ``cap`` on the CPU (whose
    memory the batch of a few candidates does not strain); on an accelerator (or given
    ``free`` bytes), the largest batch up to ``cap`` that ``auto_batch_size`` fits, so that
    a model whose ``cap`` full-length candidates would not fit one device still serves.

    Raises:
        ConfigError: code ``insufficient_memory`` when not even one candidate fits.
    """
    if free is None and encoder.device.type != "cuda":
        return cap
    batch, _ = auto_batch_size(encoder, seq_len, free=free, max_batch=cap)
    return batch


def hessian_bytes(block_dims: list[int], *, with_eval: bool) -> int:
    """Host memory of the Hessian statistics and their whitening (DESIGN.md step 4).

    Per block of d_W dims: the float64 sum of phi phi^T (one more for R_eval), and while a
    block is whitened its eigendecomposition (eigenvectors plus the R^-1/2 result, float64):
    ``sum_W 8 d_W^2 (1 + with_eval) + 3 * 8 max_W d_W^2``.
    """
    if not block_dims:
        return 0
    sums = sum(8 * d * d for d in block_dims) * (2 if with_eval else 1)
    return sums + 3 * 8 * max(block_dims) ** 2
