"""Tracked modules: the linear maps whose per-example gradients make up a fingerprint.

DESIGN.md: every linear map inside the transformer blocks (``torch.nn.Linear`` and
transformers' ``Conv1D``, whose weight is stored transposed, [in, out]), selectable by name
globs; the output embedding (LM head) is excluded unless asked for.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from api.errors import ConfigError
from encoder.config import FingerprintConfig


@dataclass(frozen=True)
class TrackedModule:
    """One tracked linear map.

    Attributes:
        name: the module's qualified name in ``model.named_modules()``.
        param_name: the qualified name of its weight parameter.
        module: the module itself.
        out_features, in_features: the map's shape; gradients are always handled in the
            [out, in] orientation, whatever the storage.
        transposed: True for ``Conv1D`` (weight stored [in, out]).
    """

    name: str
    param_name: str
    module: nn.Module
    out_features: int
    in_features: int
    transposed: bool

    def weight_as_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the stored weight, returned in [out, in] orientation."""
        return tensor.t() if self.transposed else tensor


def _linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return out_f, in_f, True
    return None


def select_modules(model: nn.Module, config: FingerprintConfig) -> list[TrackedModule]:
    """Select tracked modules by the config's globs, in ``named_modules`` order.

    Args:
        model: a causal LM.
        config: uses ``include``, ``exclude`` and ``track_lm_head``.
    Returns:
        the tracked modules, at least one.
    Raises:
        ConfigError: a glob that matches no candidate linear map, or an empty selection.
    """
    getter = getattr(model, "get_output_embeddings", None)
    output_embeddings = getter() if callable(getter) else None
    candidates: list[TrackedModule] = []
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None or not name:
            continue
        if module is output_embeddings and not config.track_lm_head:
            continue
        out_f, in_f, transposed = shape
        candidates.append(TrackedModule(name, f"{name}.weight", module, out_f, in_f, transposed))
    names = [c.name for c in candidates]
    for pattern in (*config.include, *config.exclude):
        if not fnmatch.filter(names, pattern):
            raise ConfigError(
                f"module glob {pattern!r} matches no tracked linear map; "
                f"candidates look like {names[:4]}",
                code="unknown_module_glob",
            )
    selected = [
        c
        for c in candidates
        if any(fnmatch.fnmatchcase(c.name, p) for p in config.include)
        and not any(fnmatch.fnmatchcase(c.name, p) for p in config.exclude)
    ]
    if not selected:
        raise ConfigError("the module globs select no linear map", code="unknown_module_glob")
    return selected
