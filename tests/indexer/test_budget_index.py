"""An index sized by the budget rule: the plan is recorded and checked, exact modules and
projected ones live side by side, and ``index info`` says how the fingerprint is sized."""

from __future__ import annotations

import json
import shutil

import pytest

from api.errors import ArtifactError
from encoder.config import FingerprintConfig
from engine.index import InfluenceIndex, OpenOptions
from indexer import manifest as mf
from service.cli import main

# The test model (2 x 64): the two 64 x 64 attention projections fit a 4096-dim share and
# are stored exactly; the other six modules are projected to 64 x 64.
SIZING = {"budget": 8 * 4096, "max_block": 4096}


@pytest.fixture(scope="module")
def budget_index(trained_checkpoint, fact_corpus_files, tmp_path_factory):
    from indexer.build import BuildConfig, run_build

    corpus, _ = fact_corpus_files
    return run_build(
        BuildConfig(
            model=trained_checkpoint.checkpoint_dir,
            corpus=corpus,
            out=tmp_path_factory.mktemp("budget") / "index",
            # gaussian: score_sd models a random projection (a fitted basis has none to vary)
            fingerprint=FingerprintConfig(hessian="none", projection="gaussian", **SIZING),
            shard_size=64,
            batch_size=8,
        )
    )


def test_the_plan_is_recorded_and_served(budget_index, capsys):
    fp = json.loads((budget_index / mf.MANIFEST).read_text())["fingerprint"]
    exact = [name for name, sizes in fp["plan"].items() if sizes is None]
    assert len(exact) == 2 and all(name.endswith("attn.c_proj") for name in exact)
    assert sum(fp["block_dims"]) == 8 * 4096 and fp["config"]["k"] is None
    idx = InfluenceIndex.open(
        budget_index, OpenOptions(device="cpu")
    )  # verify re-encodes stored sequences
    try:
        assert set(idx.encoder.family.pairs) == {n for n, s in fp["plan"].items() if s is not None}
        scores, ids = idx.search(idx.encode_queries([("The capital of Drosora is", " Mutu.")]), 5)
        assert (ids >= 0).all() and scores[0, 0] >= scores[0, -1]
    finally:
        idx.close()
    # Served: every first-stage result of this projected, unwhitened index has its sd, small
    # next to the unit-norm scale (exact modules add none); without "rescore" the index's
    # default re-scores exactly, and then the sd is 0.
    import httpx

    from service.app import create_app
    from service.settings import Settings
    from tests.service.live import live_server

    with live_server(create_app(Settings(index_dir=budget_index))) as base:
        rows = httpx.post(
            f"{base}/v1/influence",
            json={
                "prompt": "The capital of Drosora is",
                "completion": " Mutu.",
                "k": 5,
                "rescore": 0,
            },
            timeout=60,
        ).json()["results"]
        rescored = httpx.post(
            f"{base}/v1/influence",
            json={"prompt": "The capital of Drosora is", "completion": " Mutu.", "k": 5},
            timeout=60,
        ).json()["results"]
    assert len(rows) == 5 and all(0 < r["score_sd"] < 1 for r in rows)
    assert len(rescored) == 5 and all(r["score_sd"] == 0 for r in rescored)
    assert main(["index", "info", str(budget_index)]) == 0
    assert (
        "budget 32768, blocks <= 4096 dims: 6 modules projected, 2 kept whole"
        in capsys.readouterr().out
    )


def test_a_manifest_whose_sizing_disagrees_is_refused(budget_index, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(budget_index, copy)
    m = json.loads((copy / mf.MANIFEST).read_text())
    m["fingerprint"]["config"]["max_block"] = 1024  # another plan than the one built
    (copy / mf.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as err:
        InfluenceIndex.open(copy, OpenOptions(device="cpu"))
    assert err.value.code == "manifest_mismatch", err.value.message
