"""Exact search with torch (placement ``torch``) against FAISS Flat over the same float16
fingerprints: same ids, same scores, row blocks split over several devices."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from api.errors import ConfigError
from engine.index import InfluenceIndex, OpenOptions
from engine.torch_search import TorchFlatSearch
from tests.tolerances import abs_products, assert_within, dot_bound, rounding_bound


def _store(n=1500, d=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def _flat(fps):
    flat = faiss.IndexFlatIP(fps.shape[1])
    flat.add(fps.astype(np.float32))
    return flat


CPU = torch.device("cpu")


def _score_bound(q, fps, ids, *, split_query=False):
    """FAISS and torch sum the same float32 products in other orders; a query split into a
    float16 head and tail also loses the tail's own float16 rounding."""
    bound = dot_bound(q, fps.astype(np.float32))
    if split_query:
        bound = bound + abs_products(rounding_bound(rounding_bound(q)), fps.astype(np.float32))
    return np.take_along_axis(bound, np.maximum(ids, 0), axis=1)


@pytest.mark.parametrize(
    "devices,dtype",
    [([CPU], None), ([CPU, CPU, CPU], None), ([CPU, CPU], torch.float16)],
    ids=["one-block", "three-blocks", "float16-blocks"],
)
def test_matches_faiss_flat(devices, dtype):
    fps = _store()
    rng = np.random.default_rng(1)
    q = rng.standard_normal((7, fps.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    want_s, want_i = _flat(fps).search(q, 20)
    got_s, got_i = TorchFlatSearch(fps, devices=devices, dtype=dtype).search(q, 20)
    np.testing.assert_array_equal(got_i, want_i)
    assert_within(
        got_s, want_s, _score_bound(q, fps, want_i, split_query=dtype is not None), "scores"
    )
    assert got_s.dtype == np.float32 and got_i.dtype == np.int64


def test_float16_product_with_a_two_part_query_matches_faiss_flat(monkeypatch):
    """The CUDA branch (float16 products, float32 accumulation, query split into a float16
    head and tail), run on the CPU with an emulated float32-accumulating product."""
    from engine import torch_search

    calls = []

    def emulated(a, b):
        assert a.dtype == b.dtype == torch.float16
        calls.append(a.shape)
        return (a.double() @ b.double()).float()

    monkeypatch.setattr(torch_search, "_mm_f32", emulated)
    fps = _store()
    rng = np.random.default_rng(2)
    q = rng.standard_normal((5, fps.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    want_s, want_i = _flat(fps).search(q, 20)
    got_s, got_i = TorchFlatSearch(fps, devices=[CPU, CPU], dtype=torch.float16).search(q, 20)
    assert calls and all(shape[0] == 10 for shape in calls)  # head and tail in one product
    np.testing.assert_array_equal(got_i, want_i)
    assert_within(got_s, want_s, _score_bound(q, fps, want_i, split_query=True), "scores")
    # The head alone (a float16 query) would be off by ~1e-4: the tail is what makes it exact.
    head_only = (torch.from_numpy(q).half().double() @ torch.from_numpy(fps).double().T).numpy()
    exact = q.astype(np.float64) @ fps.astype(np.float64).T
    assert np.abs(head_only - exact).max() > 1e-5


def test_pads_breaks_ties_by_id_and_checks_shapes():
    fps = np.repeat(_store(n=5, d=16), 2, axis=0)  # rows 2i and 2i+1 are equal
    search = TorchFlatSearch(fps, devices=[CPU, CPU])
    q = fps[:1].astype(np.float32)
    scores, ids = search.search(q, 12)
    assert ids[0, :2].tolist() == [0, 1]  # the exact duplicate pair, lower id first
    assert ids[0, 10:].tolist() == [-1, -1] and np.isneginf(scores[0, 10:]).all()
    assert (np.diff(scores[0, :10]) <= 0).all()
    with pytest.raises(ConfigError):
        search.search(np.zeros((1, 3), np.float32), 5)
    with pytest.raises(ConfigError):
        search.search(q, 0)


def test_index_opened_with_torch_placement_answers_like_flat(tiny_index):
    flat = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    brute = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu", placement="torch"))
    try:
        assert isinstance(
            brute.vectors, TorchFlatSearch
        )  # the FAISS index is not loaded: no second copy in RAM
        assert brute.size == flat.size == flat.vectors.index.ntotal
        q = flat.encode_queries([(f"Query {i} about", f" thing {i}") for i in range(6)])
        want_s, want_i = flat.search(q, 10)
        got_s, got_i = brute.search(q, 10)
        np.testing.assert_array_equal(got_i, want_i)
        assert_within(
            got_s, want_s, _score_bound(q, np.asarray(flat.fingerprints), want_i), "scores"
        )
    finally:
        flat.close()
        brute.close()
    with pytest.raises(ConfigError, match="placement"):
        InfluenceIndex.open(tiny_index, OpenOptions(device="cpu", placement="moon"))


def test_placement_choices_agree_everywhere():
    """The placements InfluenceIndex accepts are the ones the settings and both CLIs offer."""
    import argparse
    from typing import get_args

    from engine.choices import SEARCH_PLACEMENTS
    from engine.cli import register as register_query
    from service.commands import register as register_service
    from service.settings import Settings

    assert get_args(Settings.model_fields["search_placement"].annotation) == SEARCH_PLACEMENTS
    for register, argv in (
        (register_query, ["query", "--index", "x", "--prompt", "p", "--completion", "c"]),
        (register_service, ["serve"]),
    ):
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        action = next(
            a
            for a in parser._subparsers._group_actions[0].choices[argv[0]]._actions
            if a.dest == "search_placement"
        )
        assert tuple(action.choices) == SEARCH_PLACEMENTS
