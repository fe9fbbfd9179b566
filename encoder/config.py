"""Typed configuration of the TrackStar fingerprint (DESIGN.md, "The fingerprint, exactly")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from api.errors import ConfigError
from encoder.families import FAMILY_NAMES

HessianMode = Literal["none", "train", "mixed"]


MAX_BLOCK = 1024
"""Default cap of one module's block where a projected R whitens it: its float64 Hessian sums
take 8 MiB (16 MiB with R_eval), its R^-1/2 as much again, and its eigendecomposition grows
with the cube of the block."""
SKETCH_MAX_BLOCK = 4096
"""Default cap of a sketch's block without a projected R: the paper's 2^16 dims in all reach
models of 16+ modules (the demo's 8 get 32,768)."""


@dataclass(frozen=True)
class FingerprintConfig:
    """Everything that determines a fingerprint; saved in the index manifest.

    Args:
        include: glob patterns over module names selecting tracked linear maps. The default
            ``("*",)`` tracks every ``nn.Linear``/``Conv1D`` except the output embedding.
        exclude: glob patterns removed from the selection.
        track_lm_head: also track the output embedding (LM head) if it is a linear map.
        k: a fixed projection size per side: each module contributes k*k dims; ``0`` = no
            projection (phi_W = vec(G~_W), exact mode for tiny models and tests). ``None``
            (the default) sizes the projection from ``budget`` instead.
        budget: total fingerprint dims when ``k`` is None, shared equally by the modules
            (the paper's 2^16 in all); a module whose gradient fits its share is stored
            exactly and leaves the rest to the others (``encoder.projection.plan_projection``).
        max_block: the most dims one module's block may take under the budget rule (bounds
            each d_W x d_W Hessian block: 1024 dims = 8 MiB of float64 sums; its
            eigendecomposition grows with d_W^3). Default (None): 4096 for a sketch without a
            projected R, else 1024 (``block_cap``).
        projection: the fingerprint family (``encoder.families``): ``sketch`` (default), a
            seeded CountSketch of each module's gradient (optionally K-FAC-whitened first,
            ``whiten``); ``gaussian``, the paper's seeded Gaussian Kronecker pairs.
        seed: seed of the sketch's hash and of the Gaussian pairs (drawn per module name).
        correction: divide by sqrt(v_hat)+eps (paper Eq. 2 optimizer state). Off by default
            (the sketch's whitening does better without it); the paper's TrackStar turns it on.
        hessian: ``none`` (default: no projected R; the sketch already whitens), ``train``
            (R = R_train) or ``mixed`` (R = lambda R_eval + (1 - lambda) R_train, paper
            Sec. 3 / App. A.1.3), both in the projected space, per module block.
        lambda_: mixing weight; ``None`` chooses it by the eigenvalue rule of App. A.1.3.
        lambda_component: the rule's component c as a fraction of d (paper: d/64).
        delta: damping, R + delta * mean_eig(R) * I before the inverse square root (of the
            projected R and of the sketch's side covariances alike).
        unit_norm: normalize the final fingerprint (TrackStar); ``False`` is the ablation.
        whiten: the sketch's K-FAC whitening (fitted by the build's basis step; the exact
            stage then scores the whitened cosine). Off by default: the plain gradient is
            sketched (the family's sides are the identity, nothing is fitted) and the exact
            stage scores the plain gradient cosine, which answers the influence question best
            (tail-patch, ``docs/results.md``). Only the sketch whitens.
    """

    include: tuple[str, ...] = field(
        default=("*",),
        metadata={
            "help": "module name globs to track (default: every Linear/Conv1D in the blocks)"
        },
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "module name globs to leave out"}
    )
    track_lm_head: bool = field(default=False, metadata={"help": "also track the output embedding"})
    k: int | None = field(
        default=None,
        metadata={
            "help": "a fixed projection size per side instead of the budget (0: no projection)",
            "cli": ("-k", "--proj-dim"),
        },
    )
    budget: int = field(
        default=1 << 16, metadata={"help": "total fingerprint dims, shared by the tracked modules"}
    )
    max_block: int | None = field(
        default=None,
        metadata={
            "help": "the most dims one module's block takes (default: 4096 for a sketch without R, else 1024)"
        },
    )
    projection: str = field(
        default="sketch",
        metadata={
            "help": "fingerprint family: sketch (the default) or gaussian (the paper's)",
            "argparse": {"choices": FAMILY_NAMES},
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the sketch's hash and of the Gaussian pairs"}
    )
    correction: bool = field(
        default=False,
        metadata={
            "help": "divide by sqrt(v_hat) + eps, the optimizer correction (the paper's TrackStar)"
        },
    )
    hessian: HessianMode = field(
        default="none", metadata={"help": "a projected R on top: train, or mixed (with --queries)"}
    )
    lambda_: float | None = field(
        default=None, metadata={"help": "weight of R_eval (default: the paper's eigenvalue rule)"}
    )
    lambda_component: float = field(default=1.0 / 64.0, metadata={"cli": None})
    delta: float = field(
        default=1e-3, metadata={"help": "damping of R and of the sketch's whitening"}
    )
    unit_norm: bool = field(default=True, metadata={"cli": None})
    whiten: bool = field(
        default=False,
        metadata={
            "help": "the sketch's K-FAC whitening of each module's gradient (fitted by a basis step)"
        },
    )

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if self.budget < 1 or (self.max_block is not None and self.max_block < 1):
            raise ConfigError(
                f"budget and max_block must be >= 1, got {self.budget}, {self.max_block}"
            )
        if self.hessian not in ("none", "train", "mixed"):
            raise ConfigError(f"hessian must be none|train|mixed, got {self.hessian!r}")
        if self.whiten and self.projection != "sketch":
            raise ConfigError(f"only the sketch whitens: --whiten with {self.projection!r}")
        if self.projection not in FAMILY_NAMES:
            raise ConfigError(
                f"projection must be one of {'|'.join(FAMILY_NAMES)}, got {self.projection!r}"
            )
        if self.lambda_ is not None and not 0.0 <= self.lambda_ <= 1.0:
            raise ConfigError(f"lambda must lie in [0, 1], got {self.lambda_}")
        if not 0.0 < self.lambda_component <= 1.0:
            raise ConfigError("lambda_component must lie in (0, 1]")
        if self.delta < 0:
            raise ConfigError(f"delta must be >= 0, got {self.delta}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def block_cap(self) -> int:
        """``max_block``, or its default: ``SKETCH_MAX_BLOCK`` for a sketch without a projected
        R (no d_W x d_W block to bound), else ``MAX_BLOCK``."""
        if self.max_block is not None:
            return self.max_block
        return (
            SKETCH_MAX_BLOCK
            if self.projection == "sketch" and self.hessian == "none"
            else MAX_BLOCK
        )

    @property
    def projected(self) -> bool:
        """Whether any module may be projected (False only for k = 0)."""
        return self.k != 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"] = list(self.include)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FingerprintConfig:
        known = {f for f in cls.__dataclass_fields__}
        d = dict(d)
        if d.get("mode", "exact") != "exact":  # indexes of format 3 recorded the retired mode
            raise ConfigError(f"the {d['mode']} encoder mode was retired: rebuild the index")
        d.pop("mode", None)
        d.setdefault(
            "whiten", True
        )  # indexes before the field all whitened (the sketch's only way)
        if set(d) != known:
            raise ConfigError(
                f"a fingerprint config has every key of to_dict(): missing {sorted(known - set(d))}, "
                f"unknown {sorted(set(d) - known)}"
            )
        for key in ("include", "exclude"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
