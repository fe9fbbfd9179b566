"""Load a causal LM and its tokenizer from a local directory, and hash them.

The hashes go into the index manifest so that the service can refuse a model that does
not match the index it serves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from torch import nn

from api.errors import ConfigError, ModelLoadError
from encoder.batching import Tokenizer
from encoder.hashing import sha256_named_files

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.model",
)


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` exists and is a model directory, else a message that says what it is.

    Raises:
        ModelLoadError: code ``model_not_found`` (no such directory) or ``not_a_model_dir``
            (listing the Trainer checkpoints inside, the latest suggested).
    """
    d = Path(model_dir)
    if not d.exists():
        raise ModelLoadError(f"model directory {d} does not exist", code="model_not_found")
    if not d.is_dir():
        raise ModelLoadError(f"{d} is a file, not a model directory", code="not_a_model_dir")
    if (d / "config.json").is_file():
        return d
    checkpoints = sorted(
        (p for p in d.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
        key=lambda p: int(p.name[11:]),
    )
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints[-5:])
        raise ModelLoadError(
            f"{d} is a training output directory, not a model: it holds the checkpoints {names}; "
            f"pass one of them, e.g. the latest: {checkpoints[-1]}",
            code="not_a_model_dir",
        )
    raise ModelLoadError(f"{d} is not a model directory (no config.json)", code="not_a_model_dir")


def _sha256_files(files: list[Path]) -> str:
    return sha256_named_files((f.name, f) for f in sorted(files))


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the config and weight files of a model directory."""
    d = check_model_dir(model_dir)
    files = [d / "config.json"] if (d / "config.json").is_file() else []
    for pattern in _WEIGHT_PATTERNS:
        files += [p for p in d.glob(pattern) if p.is_file()]
    if not files:
        raise ModelLoadError(f"{d} holds no model weights")
    return _sha256_files(list(dict.fromkeys(files)))


def tokenizer_hash(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files of a model directory."""
    d = Path(model_dir)
    files = [d / n for n in _TOKENIZER_FILES if (d / n).is_file()]
    if not files:
        raise ModelLoadError(f"{d} holds no tokenizer files", code="missing_tokenizer")
    return _sha256_files(files)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device named by ``device`` (None: ``default_device``), checked to exist here.

    Raises:
        ConfigError: code ``invalid_device``: not a device name, not a CPU or CUDA device, or
            a CUDA device this machine does not have.
    """
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"{device!r} is not a torch device (cpu, cuda, cuda:N)", code="invalid_device"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(
                f"device {device!r}: this machine has no CUDA device (use cpu)",
                code="invalid_device",
            )
        if dev.index is not None and dev.index >= n:
            have = f"this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}"
            raise ConfigError(f"device {device!r}: {have}", code="invalid_device")
    elif dev.type != "cpu":
        raise ConfigError(
            f"device {device!r}: only cpu and cuda devices are supported", code="invalid_device"
        )
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; bf16 weights on an accelerator (accumulation stays float32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a transformers causal LM from a local directory, frozen and in eval mode.

    Raises:
        ModelLoadError: not a directory, or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM

    d = check_model_dir(model_dir)
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype or default_dtype(dev))
    except Exception as exc:  # noqa: BLE001 - report any loader failure as the user's input
        raise ModelLoadError(f"cannot load a causal LM from {d}: {exc}") from exc
    model.to(dev)  # type: ignore[arg-type]  # transformers types .to() via a wrapper
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load the tokenizer saved beside a model; a pad id is guaranteed (eos if unset).

    Raises:
        ModelLoadError: code ``missing_tokenizer`` when the directory has none.
    """
    from transformers import AutoTokenizer

    d = check_model_dir(model_dir)
    tokenizer_hash(d)  # raises missing_tokenizer with a clear message
    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load the tokenizer in {d}: {exc}", code="missing_tokenizer"
        ) from exc
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return as_tokenizer(tok)


def as_tokenizer(tokenizer: object) -> Tokenizer:
    """A Hugging Face tokenizer as the ``Tokenizer`` it is: transformers types ``decode`` as
    returning ``str | list[str]`` (a list for batched ids), which the project never passes."""
    return cast("Tokenizer", tokenizer)


def model_max_tokens(model: nn.Module) -> int | None:
    """The model's context length (positions), if its config says."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
