"""``BuildConfig``: everything a build needs, and the source of ``influence index build``'s
flags (``indexer.options``). Light on purpose: the CLI imports it to print ``--help``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from api.errors import ConfigError
from encoder.config import FingerprintConfig


def batch_size_flag(text: str) -> int:
    """``--batch-size``: a positive integer, or ``auto`` (0)."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs (the ``influence index build`` options).

    Args:
        model: model or HF Trainer checkpoint directory.
        corpus: .jsonl, .parquet, datasets dir, or folder of .txt (``indexer.corpus``).
        out: index directory to publish.
        fingerprint: the fingerprint configuration.
        seq_len: tokens per sequence; None = the model's context length.
        stride: window step; None = seq_len (no overlap).
        pack: pack documents into sequences.
        append_eos: end documents with EOS (as the trainer did).
        queries: JSONL of {prompt, completion} whose gradients make R_eval (hessian ``mixed``).
        optimizer_state: optimizer.pt, checkpoint dir or second-moment safetensors; None =
            the model dir's optimizer.pt if any, else estimated over ``v_sample`` sequences.
        v_sample: sequences for the second-moment estimate.
        hessian_sample: sequences for R_train; None = all.
        basis_sample: sequences the sketch's whitening is fitted on, evenly spaced; 0 = all.
        faiss: FAISS factory string (Flat, IVF{n},PQ{m}, HNSW32).
        faiss_train_sample: vectors an approximate FAISS index is trained on.
        batch_size: sequences per backward pass, or ``auto`` (0): the largest batch that
            fits the device's free memory (``encoder.memory``), measured once per build and
            kept in the work directory, so a resumed build uses the same batches. Part of
            the build's identity.
        shard_size: sequences per shard (resume and scale-out unit).
        device: torch device; None = CUDA if present, else the CPU.
        threads: torch intra-op threads; None = 1 for a model under 50M parameters on the
            CPU, else torch's default.
        name: the model's display name in the UI and API; None = run/checkpoint-N for a
            Trainer checkpoint, else the model directory's name.
    """

    model: Path = field(metadata={"help": "model or HF Trainer checkpoint directory"})
    corpus: Path = field(
        metadata={"help": "JSONL, Parquet, a datasets directory or a folder of .txt"}
    )
    out: Path = field(metadata={"help": "index directory to publish"})
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    seq_len: int | None = field(
        default=None, metadata={"help": "tokens per sequence (default: the model's context)"}
    )
    stride: int | None = field(
        default=None, metadata={"help": "window step (default: the sequence length, no overlap)"}
    )
    pack: bool = field(default=False, metadata={"help": "pack documents into sequences"})
    append_eos: bool = field(
        default=True, metadata={"help": "do not end each document with EOS", "cli": "--no-eos"}
    )
    queries: Path | None = field(
        default=None, metadata={"help": "JSONL of {prompt, completion} whose gradients make R_eval"}
    )
    optimizer_state: Path | None = field(
        default=None,
        metadata={
            "help": "second moments: optimizer.pt, a checkpoint directory or safetensors (default: the checkpoint's)"
        },
    )
    v_sample: int = field(
        default=256,
        metadata={
            "help": "sequences second moments are estimated from when there is no optimizer state"
        },
    )
    hessian_sample: int | None = field(
        default=None, metadata={"help": "sequences R_train is summed over (default: all)"}
    )
    basis_sample: int = field(
        default=1024, metadata={"help": "sequences the whitening (--whiten) is fitted on (0: all)"}
    )
    faiss: str = field(
        default="Flat", metadata={"help": "FAISS factory, e.g. IVF1024,PQ64 (re-ranked exactly)"}
    )
    faiss_train_sample: int = field(
        default=65536, metadata={"help": "vectors an approximate FAISS index is trained on"}
    )
    batch_size: int = field(
        default=8,
        metadata={
            "help": "sequences per backward pass, or auto (from free memory)",
            "parse": batch_size_flag,
        },
    )
    shard_size: int = field(default=256, metadata={"help": "sequences per resumable shard"})
    device: str | None = field(
        default=None, metadata={"help": "torch device (default: CUDA if present, else the CPU)"}
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "torch threads (default: 1 for a model under 50M parameters on the CPU)"},
    )
    name: str | None = field(
        default=None,
        metadata={"help": "the model's display name (default: its run and checkpoint)"},
    )

    def __post_init__(self) -> None:
        least = {
            "seq_len": 2,
            "stride": 1,
            "v_sample": 1,
            "hessian_sample": 1,
            "basis_sample": 0,
            "faiss_train_sample": 1,
            "batch_size": 0,
            "shard_size": 1,
            "threads": 1,
        }
        for name, bound in least.items():
            value = getattr(self, name)
            if value is not None and value < bound:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be >= {bound}, got {value}", field=name)
        from encoder.model_loading import resolve_device  # torch: not for --help

        resolve_device(self.device)
        if self.optimizer_state is not None and not self.fingerprint.correction:
            raise ConfigError(
                "--optimizer-state is read only by the optimizer correction: add --correction, "
                "or drop --optimizer-state",
                field="optimizer_state",
            )
