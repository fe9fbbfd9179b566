"""What every fingerprint family provides (``encoder.families``).

A family owns what turns a module's corrected gradient G~_W into its block phi_W: the plan of
block sizes, the state it fits from the corpus or draws from the seed, the tensors an index
saves of that state and their restore, each module's block (``encoder.blocks``), and the model
of how far a score moves under another seed (``encoder.uncertainty``). The encoder
(``encoder.fingerprint``) does the rest the same way for every family: the backward pass, the
optimizer correction, the projected R and the unit norm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from api.errors import ConfigError
from encoder.basis import BasisStatistics, Pairs
from encoder.blocks import Block, Precision
from encoder.config import FingerprintConfig
from encoder.modules import TrackedModule
from encoder.projection import Plan, plan_projection


class Family(ABC):
    """One fingerprint family, made for one encoder's modules.

    Args:
        config: the fingerprint configuration (``config.projection`` names this family).
        modules: the tracked modules, in fingerprint order.
        device: where the blocks run.
        dtype: the accumulation dtype of the blocks (float32; float64 for a float64 model).
    """

    name: ClassVar[str]
    exact_norms: ClassVar[bool] = False
    """Whether the blocks' unsketched norms (``encoder.blocks``, ``sq``) are the exact second
    stage's: the build then stores them with the index."""

    def __init__(
        self,
        config: FingerprintConfig,
        modules: list[TrackedModule],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config = config
        self.modules = modules
        self.device = device
        self.dtype = dtype
        self.plan: Plan = self.plan_for(config, modules)
        self.setup()

    @abstractmethod
    def setup(self) -> None:
        """Make what the seed determines (called once the plan is set)."""

    @classmethod
    def plan_for(cls, config: FingerprintConfig, modules: list[TrackedModule]) -> Plan:
        """The block sizes of ``modules`` under ``config`` (no state is made: a memory plan
        asks this of a model on the meta device)."""
        base = plan_projection(
            modules, k=config.k, budget=config.budget, max_block=config.block_cap
        )
        return cls.shape_plan(base, modules)

    @classmethod
    def shape_plan(cls, plan: Plan, modules: list[TrackedModule]) -> Plan:
        """This family's plan from the budget rule's (``encoder.projection.plan_projection``)."""
        return plan

    @property
    def needs_fit(self) -> bool:
        """Whether the state must be fitted (``fit``) or restored before encoding."""
        return False

    def fit(self, stats: BasisStatistics) -> None:
        """Fit the state from the corrected gradients' side covariances."""
        raise ConfigError(f"the {self.name} family has nothing to fit")

    def placeholder(self) -> None:
        """Install a state of the fitted one's shapes and cost (memory is measured before the
        fit); nothing to do for a family without a fit."""
        if self.needs_fit:
            raise ConfigError(f"the {self.name} family has no placeholder for its fitted state")

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """What an index saves of the state: float32 CPU tensors by key (empty: no file)."""

    @abstractmethod
    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install what ``tensors`` saved. Raises ConfigError when they do not fit the plan."""

    @abstractmethod
    def block(self, m: TrackedModule, inv: torch.Tensor | None, precision: Precision) -> Block:
        """Module ``m``'s block; ``inv`` is its correction 1 / (sqrt(v_hat) + eps) or None."""

    @abstractmethod
    def score_variance(
        self, query: torch.Tensor, rows: torch.Tensor, block_dims: list[int]
    ) -> torch.Tensor:
        """Variance of each score query [d] . rows [n, d] under another seed; [n] float64."""

    def whitening(self) -> Pairs | None:
        """The (W_out, W_in) each module's gradient is whitened by before its block (the exact
        second stage scores with it); None: not whitened."""
        return None

    def set_whitening(self, pairs: Pairs) -> None:
        """Install a whitening (the exact second stage of a whitened index)."""
        raise ConfigError(f"the {self.name} family does not whiten")

    def whole(self, m: TrackedModule) -> bool:
        """Whether module ``m`` is kept whole (no projection noise)."""
        sizes = self.plan[m.name]
        return sizes is None or sizes == (m.out_features, m.in_features)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)


def pairs_from(tensors: dict[str, Any], first: str, second: str) -> Pairs:
    """{module: (tensors[module.first], tensors[module.second])} of a saved state.

    Raises:
        ConfigError: a key of another kind, or one of a pair without the other.
    """
    names = set()
    for key in tensors:
        name, _, suffix = key.rpartition(".")
        if suffix not in (first, second):
            raise ConfigError(
                f"the saved state holds {key!r}; this family saves {first} and {second}"
            )
        names.add(name)
    if any(f"{n}.{first}" not in tensors or f"{n}.{second}" not in tensors for n in names):
        raise ConfigError(f"the saved state holds a {first} without its {second} (or the reverse)")
    return {n: (tensors[f"{n}.{first}"], tensors[f"{n}.{second}"]) for n in names}


def pair_tensors(pairs: Pairs, first: str, second: str) -> dict[str, torch.Tensor]:
    """The inverse of ``pairs_from``: float32 CPU tensors by ``module.first`` / ``module.second``."""
    out = {}
    for name, pair in pairs.items():
        for suffix, t in zip((first, second), pair, strict=True):
            out[f"{name}.{suffix}"] = t.float().cpu().contiguous()
    return out
