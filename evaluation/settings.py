"""What an evaluation compares and with which knobs: light (no torch), so that
``influence eval --help`` and the CLI's option table load without the model stack."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from encoder.config import FingerprintConfig, HessianMode
from encoder.families import FAMILY_NAMES


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Attributes:
        name: short id used in tables and JSON.
        description: one line for the report.
        kind: ``gradient``, ``shipped`` (``evaluation.shipped``), ``bm25``, ``hybrid`` or
            ``random``.
        correction, hessian, unit_norm: the fingerprint settings (gradient methods only).
        projection: the projection family; None: the run's (``EvalSettings.projection``).
        max_block: the most dims one module's block may take (``FingerprintConfig.max_block``);
            None: the family's default cap. Lets two families be compared at equal d.
        whiten: the sketch's K-FAC whitening (``FingerprintConfig.whiten``; off by default).
    """

    name: str
    description: str
    kind: str
    correction: bool = True
    hessian: HessianMode = "mixed"
    unit_norm: bool = True
    projection: str | None = None
    max_block: int | None = None
    whiten: bool = False

    def config(self, base: FingerprintConfig) -> FingerprintConfig:
        return replace(
            base,
            correction=self.correction,
            hessian=self.hessian,
            unit_norm=self.unit_norm,
            projection=self.projection or base.projection,
            max_block=self.max_block if self.max_block is not None else base.max_block,
            whiten=self.whiten,
        )

    def phi_key(self, base: FingerprintConfig) -> tuple[bool, str, int | None, bool]:
        """What this method's phi depends on: (correction, projection family, block cap,
        the sketch's whitening)."""
        config = self.config(base)
        return config.correction, config.projection, config.max_block, config.whiten


METHODS: tuple[Method, ...] = (
    Method("trackstar", "TrackStar: correction, mixed R, unit norm", "gradient"),
    Method("no_correction", "TrackStar without optimizer correction", "gradient", correction=False),
    Method(
        "r_train_only", "TrackStar with R = R_train (no task mixing)", "gradient", hessian="train"
    ),
    Method("no_hessian", "TrackStar without R (hessian none)", "gradient", hessian="none"),
    Method("no_unit_norm", "TrackStar without unit normalization", "gradient", unit_norm=False),
    Method(
        "grad_dot",
        "gradient dot product (no correction, R, norm)",
        "gradient",
        correction=False,
        hessian="none",
        unit_norm=False,
    ),
    Method(
        "grad_cosine",
        "gradient cosine (TRAK-like, no correction)",
        "gradient",
        correction=False,
        hessian="none",
        unit_norm=True,
    ),
    Method(
        "sketch",
        "the plain gradient cosine, CountSketched (the product's first stage: projection "
        "sketch, no whitening, no correction, no R)",
        "gradient",
        correction=False,
        hessian="none",
        projection="sketch",
    ),
    Method(
        "sketch_block1024",
        "sketch at the paper's 1024-dim block cap (TrackStar's d)",
        "gradient",
        correction=False,
        hessian="none",
        projection="sketch",
        max_block=1024,
    ),
    Method(
        "sketch_whitened",
        "K-FAC-whitened gradient cosine, CountSketched (sketch with --whiten)",
        "gradient",
        correction=False,
        hessian="none",
        projection="sketch",
        whiten=True,
    ),
    Method(
        "shipped",
        "the product as served: index build at its defaults, then the engine (first stage, "
        "certified exact second stage)",
        "shipped",
    ),
    Method(
        "shipped_cosine",
        "the product as served with the Gaussian fingerprint instead (no correction, no R: "
        "grad_cosine's), then its certified exact stage (the plain gradient cosine)",
        "shipped",
        projection="gaussian",
    ),
    Method(
        "shipped_whitened",
        "the product as served with the K-FAC-whitened sketch (--whiten), then its certified "
        "exact stage (the whitened gradient cosine)",
        "shipped",
        whiten=True,
    ),
    Method("bm25", "BM25 (bm25s), query = prompt + completion", "bm25"),
    Method(
        "hybrid",
        "reciprocal-rank fusion of bm25 and the product's first stage (sketch; c=60), as served",
        "hybrid",
    ),
    Method(
        "dense",
        "dense embeddings: all-MiniLM-L6-v2 cosine, query = prompt + completion (from its package)",
        "dense",
    ),
    Method("random", "random training sequences (floor)", "random"),
)
METHOD_NAMES = tuple(m.name for m in METHODS)
HYBRID_GRADIENT = "sketch"
"""The gradient method the hybrid fuses with BM25: the product's fingerprint (the service's
``mode: hybrid`` fuses BM25 with the index's first stage)."""


@dataclass(frozen=True)
class EvalSettings:
    """Knobs of one evaluation run (all recorded in the output JSON).

    Attributes:
        k: a fixed projection size per side (d = |modules| k^2); None = the fingerprint's
            default sizing (a 2^16 budget, ``encoder.projection.plan_projection``).
        projection: the projection family of the paper's methods (trackstar and its
            ablations; the sketch method always uses its own): ``gaussian`` (the paper's)
            draws the matrices from ``seed``; ``sketch`` fits a whitening on the training
            sequences.
        seed: projection seed, query folds and the random floor.
        batch_size: sequences per backward pass when fingerprinting.
        tailpatch_lr: step size of the tail-patch step.
        tailpatch_optimizer: ``adam`` (checkpoint's second moments) or ``sgd``.
        methods: names of the methods to compare (``METHOD_NAMES``).
        max_queries: evaluate only the first n queries (None: all).
    """

    k: int | None = field(
        default=None,
        metadata={"help": "a fixed projection size per side (default: the budget sizing)"},
    )
    projection: str = field(
        default="gaussian",
        metadata={
            "help": "family of the paper's method and its ablations (default gaussian)",
            "argparse": {"choices": FAMILY_NAMES},
        },
    )
    seed: int = 0
    batch_size: int = 16
    tailpatch_lr: float = 1e-4
    tailpatch_optimizer: Literal["adam", "sgd"] = field(
        default="adam",
        metadata={
            "help": "optimizer of the tail-patch step: adam (the checkpoint's moments) or sgd"
        },
    )
    methods: tuple[str, ...] = field(
        default=METHOD_NAMES,
        metadata={
            "help": "methods to compare (default: all)",
            "argparse": {"nargs": "+", "choices": METHOD_NAMES},
        },
    )

    max_queries: int | None = field(
        default=None, metadata={"help": "evaluate only the first N queries (default: all)"}
    )
