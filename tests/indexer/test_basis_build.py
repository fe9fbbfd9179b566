"""The sketch's fitted whitening in the build: fitted once over ``basis_sample`` sequences,
resumed, part of the build's identity."""

from __future__ import annotations

import pytest
import torch

from encoder.config import FingerprintConfig
from encoder.tensor_files import load_tensors
from indexer import manifest as mf
from indexer import passes


def _build(ckpt, corpus, out, **kw):
    from indexer.build import BuildConfig, run_build

    return run_build(
        BuildConfig(
            model=ckpt,
            corpus=corpus,
            out=out,
            shard_size=64,
            batch_size=8,
            fingerprint=FingerprintConfig(k=4, correction=True, whiten=True),
            **kw,
        )
    )


def test_basis_is_fitted_once_and_a_resumed_build_reuses_it(
    trained_checkpoint, fact_corpus_files, tmp_path, monkeypatch
):
    corpus, _ = fact_corpus_files
    ckpt = trained_checkpoint.checkpoint_dir
    seen: list[int] = []
    fit = passes.basis_statistics

    def counting(encoder, store, ids, *args, **kwargs):
        seen.append(len(ids))
        return fit(encoder, store, ids, *args, **kwargs)

    def crash(*args, **kwargs):
        raise RuntimeError("killed in pass 2")

    monkeypatch.setattr(passes, "basis_statistics", counting)
    monkeypatch.setattr(passes, "encode_shard", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _build(ckpt, corpus, tmp_path / "index", basis_sample=16)
    assert seen == [16]  # evenly spaced sample of 16 sequences
    monkeypatch.undo()
    monkeypatch.setattr(
        passes, "basis_statistics", lambda *a, **k: pytest.fail("the basis was fitted again")
    )
    index = _build(ckpt, corpus, tmp_path / "index", basis_sample=16)
    saved = load_tensors(index / mf.PROJECTIONS)
    assert saved and {key.rsplit(".", 1)[1] for key in saved} == {"W_out", "W_in"}
    # Each side a symmetric inverse square root: float64 products rounded once to float32, so
    # w and w^T differ by at most one float32 ulp of the largest entry.
    assert all((w - w.T).abs().max() <= 2.0**-23 * w.abs().max() for w in saved.values())
    # Another sample is another basis, and another index.
    monkeypatch.undo()
    other = _build(ckpt, corpus, tmp_path / "other", basis_sample=0)  # 0: all
    assert (other / mf.MANIFEST).read_text() != (index / mf.MANIFEST).read_text()
    other_saved = load_tensors(other / mf.PROJECTIONS)
    assert any(not torch.equal(saved[n], other_saved[n]) for n in saved)
