"""safetensors files written byte for byte the same for the same tensors and metadata.

safetensors serializes the ``__metadata__`` map in hash order, which varies between
processes, so two builds of identical inputs wrote different bytes (and checksums). The
header is rewritten here with its keys sorted; data offsets are relative to the end of the
header, so the tensor bytes are unchanged.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

FITTED_WITH = "fitted_with"
"""Header key of a fitted artifact (projections, whitening, whitener): the canonical JSON of
the fingerprint config it was fitted with, which an index's manifest must match."""


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with a canonical (sorted, compact) header."""
    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        fh.write(raw[8 + n :])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    return load_file(str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors file (empty if it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def fitted_with(config: dict[str, object]) -> dict[str, str]:
    """The header entry that records the fingerprint config an artifact was fitted with."""
    return {FITTED_WITH: json.dumps(config, sort_keys=True, separators=(",", ":"))}
