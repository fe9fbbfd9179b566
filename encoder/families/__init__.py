"""The fingerprint families: how a tracked module's corrected gradient becomes its block.

Two families ship, each one file under this package:

- ``sketch`` (the product's default, ``encoder.families.sketch``): the K-FAC whitening of each
  module's corrected gradient, fitted once per index, then a seeded CountSketch of it;
- ``gaussian`` (the paper's TrackStar projection, ``encoder.families.gaussian``): seeded
  Gaussian Kronecker pairs A G~ B^T, with the paper's optimizer correction and projected R.

This module stays light (no torch): the CLI reads the names from it to print ``--help``.
Adding a family is a new file with a ``encoder.families.base.Family`` subclass and one line
in ``REGISTRY``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from encoder.families.base import Family

REGISTRY: dict[str, str] = {
    "sketch": "encoder.families.sketch:Sketch",
    "gaussian": "encoder.families.gaussian:Gaussian",
}
"""Family name -> ``module:class`` of its implementation (imported when first used)."""

FAMILY_NAMES: tuple[str, ...] = tuple(REGISTRY)


def family_class(name: str) -> type[Family]:
    """The family class registered under ``name`` (KeyError for an unknown name; the config
    refuses those before any family is made)."""
    module, _, cls = REGISTRY[name].partition(":")
    found: type[Family] = getattr(importlib.import_module(module), cls)
    return found
