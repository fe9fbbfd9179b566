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
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from encoder.families.base import Family


class Entry(NamedTuple):
    """A registered family: where its class lives (``module:class``, imported when first
    used) and how ``influence index info`` names it (``str.format`` over the config's fields)."""

    target: str
    summary: str


REGISTRY: dict[str, Entry] = {
    "sketch": Entry(
        "encoder.families.sketch:Sketch", "K-FAC whitened, CountSketch seed {seed} (sketch)"
    ),
    "gaussian": Entry("encoder.families.gaussian:Gaussian", "gaussian, seed {seed}"),
}

FAMILY_NAMES: tuple[str, ...] = tuple(REGISTRY)


def family_class(name: str) -> type[Family]:
    """The family class registered under ``name`` (KeyError for an unknown name; the config
    refuses those before any family is made)."""
    module, _, cls = REGISTRY[name].target.partition(":")
    found: type[Family] = getattr(importlib.import_module(module), cls)
    return found


def describe(name: str, config: dict[str, Any]) -> str:
    """The family of a fingerprint config (``to_dict`` form) in a few words, without torch."""
    return REGISTRY[name].summary.format(**config)
