"""Bad input: a clear message, exit code 2, nothing half-written published."""

from __future__ import annotations

import os
import shutil

import pytest

from api.errors import ArtifactError
from engine.index import InfluenceIndex, OpenOptions
from indexer import manifest as mf
from indexer.__main__ import main


def _build(capsys, model, corpus, out, *extra: str) -> tuple[int, str]:
    rc = main(
        [
            "build",
            "--model",
            str(model),
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "-k",
            "4",
            "--hessian",
            "train",
            "--no-progress",
            *extra,
        ]
    )
    return rc, capsys.readouterr().err


def _nothing_left(out) -> None:
    assert not out.exists()
    assert not (out.parent / f".{out.name}.build").exists()


def test_missing_corpus(trained_checkpoint, tmp_path, capsys):
    rc, err = _build(
        capsys, trained_checkpoint.checkpoint_dir, tmp_path / "nope.jsonl", tmp_path / "ix"
    )
    assert rc == 2 and "[corpus_not_found]" in err and "nope.jsonl" in err
    _nothing_left(tmp_path / "ix")


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "empty_corpus"),
        (b"\n\n", "empty_corpus"),
        (b'{"text": "fine"}\n{"text": "bad \xff\xfe bytes"}\n', "invalid_encoding"),
        (b'{"id": 1}\n', "invalid_corpus"),
        (b'{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n', "invalid_encoding"),
        (b'{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n', "duplicate_document_id"),
    ],
)
def test_bad_corpus(trained_checkpoint, tmp_path, capsys, content, code):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(content)
    rc, err = _build(capsys, trained_checkpoint.checkpoint_dir, corpus, tmp_path / "ix")
    assert rc == 2 and f"[{code}]" in err and "corpus.jsonl" in err
    assert (
        "Traceback" not in err
        and sum(line.startswith("influence: error") for line in err.splitlines()) == 1
    )
    if code == "invalid_encoding" and b"ud800" in content:
        assert "line 2" in err and "surrogate" in err
    _nothing_left(tmp_path / "ix")


def test_model_without_tokenizer(trained_checkpoint, fact_corpus_files, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_checkpoint.checkpoint_dir / name, model / name)
    rc, err = _build(capsys, model, fact_corpus_files[0], tmp_path / "ix")
    assert rc == 2 and "[missing_tokenizer]" in err and str(model) in err
    _nothing_left(tmp_path / "ix")


def test_out_holds_a_different_index(trained_checkpoint, fact_corpus_files, tiny_index, capsys):
    before = mf.sha256_file(tiny_index / mf.MANIFEST)
    rc, err = _build(capsys, trained_checkpoint.checkpoint_dir, fact_corpus_files[0], tiny_index)
    assert rc == 2 and "[index_exists]" in err and "different index" in err
    assert mf.sha256_file(tiny_index / mf.MANIFEST) == before
    assert not (tiny_index.parent / f".{tiny_index.name}.build").exists()


def test_out_is_a_non_empty_directory(trained_checkpoint, fact_corpus_files, tmp_path, capsys):
    out = tmp_path / "ix"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = _build(capsys, trained_checkpoint.checkpoint_dir, fact_corpus_files[0], out)
    assert rc == 2 and "[output_not_empty]" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_corrupt_index_is_refused(tiny_index, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_index, copy)
    assert main(["verify", str(copy)]) == 0
    assert "OK" in capsys.readouterr().out
    data = bytearray((copy / mf.FINGERPRINTS).read_bytes())
    data[-1] ^= 0x01
    (copy / mf.FINGERPRINTS).write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "[checksum_mismatch]" in err and mf.FINGERPRINTS in err
    with pytest.raises(ArtifactError, match="checksum"):
        InfluenceIndex.open(copy, OpenOptions(device="cpu"))


def test_wrong_model_is_refused(tiny_index, trained_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained_checkpoint.checkpoint_dir, other)
    cfg = (other / "config.json").read_text()
    (other / "config.json").write_text(cfg.replace("{", '{\n  "_edited": true,', 1))
    with pytest.raises(ArtifactError) as info:
        InfluenceIndex.open(tiny_index, OpenOptions(device="cpu", model_dir=other))
    assert info.value.code == "model_mismatch"


def test_batch_size_auto_is_resolved_once_and_recorded(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys
):
    """--batch-size auto: measured from free memory, recorded in the manifest; the same
    vectors as an explicit build with that batch size; bad values exit 2."""
    import numpy as np

    corpus = fact_corpus_files[0]
    rc, err = _build(
        capsys, trained_checkpoint.checkpoint_dir, corpus, tmp_path / "auto", "--batch-size", "auto"
    )
    assert rc == 0, err
    bs = mf.read_manifest(tmp_path / "auto")["build"]["batch_size"]
    assert bs >= 8 and bs % 8 == 0  # a few MiB per sequence against GiBs free
    rc, err = _build(
        capsys,
        trained_checkpoint.checkpoint_dir,
        corpus,
        tmp_path / "fixed",
        "--batch-size",
        str(bs),
    )
    assert rc == 0, err
    a = np.load(tmp_path / "auto" / mf.FINGERPRINTS)
    b = np.load(tmp_path / "fixed" / mf.FINGERPRINTS)
    np.testing.assert_array_equal(a, b)
    for bad in ("0", "-3", "lots"):
        with pytest.raises(SystemExit) as exit_:
            _build(
                capsys,
                trained_checkpoint.checkpoint_dir,
                corpus,
                tmp_path / "bad",
                "--batch-size",
                bad,
            )
        assert exit_.value.code == 2
        assert "positive integer or 'auto'" in capsys.readouterr().err


def test_unwritable_output_folder(trained_checkpoint, fact_corpus_files, capsys):
    rc, err = _build(
        capsys,
        trained_checkpoint.checkpoint_dir,
        fact_corpus_files[0],
        "/proc/influence-nowhere/ix",
    )
    assert rc == 2 and "[output_not_writable]" in err and "Traceback" not in err


def test_full_disk_mid_build_is_a_clear_error(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys, monkeypatch
):
    import errno

    from indexer import passes

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))

    monkeypatch.setattr(passes, "save_npy_atomic", full)
    rc, err = _build(
        capsys, trained_checkpoint.checkpoint_dir, fact_corpus_files[0], tmp_path / "ix"
    )
    assert rc == 2 and "[output_not_writable]" in err and "No space left" in err
    assert not (tmp_path / "ix").exists()  # nothing published


def test_second_build_of_the_same_out_is_refused(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys
):
    from indexer.workdir import WorkDir

    out = tmp_path / "ix"
    with WorkDir(out.resolve()).lock():
        rc, err = _build(capsys, trained_checkpoint.checkpoint_dir, fact_corpus_files[0], out)
    assert rc == 2 and "[build_locked]" in err and f"pid {os.getpid()}" in err
    assert not out.exists()


@pytest.mark.parametrize("which", ["missing", "model_weights"])
def test_bad_optimizer_state(trained_checkpoint, fact_corpus_files, tmp_path, capsys, which):
    state = (
        tmp_path / "nope.pt"
        if which == "missing"
        else trained_checkpoint.checkpoint_dir / "model.safetensors"
    )
    rc, err = _build(
        capsys,
        trained_checkpoint.checkpoint_dir,
        fact_corpus_files[0],
        tmp_path / "ix",
        "--optimizer-state",
        str(state),
        "--correction",
    )
    assert rc == 2 and "[optimizer_state_mismatch]" in err and "Traceback" not in err
    assert ("does not exist" if which == "missing" else "negative values") in err
    assert not (tmp_path / "ix").exists()  # nothing published (the work dir may stay, to resume)


@pytest.mark.parametrize(
    ("factory", "code"),
    [("Flaat", "invalid_faiss_factory"), ("IVF1024,Flat", "faiss_needs_more_data")],
)
def test_faiss_factory_is_checked_before_the_passes(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys, monkeypatch, factory, code
):
    from indexer import passes

    def must_not_run(*args, **kwargs):
        raise AssertionError("an expensive pass ran before the factory was checked")

    monkeypatch.setattr(passes, "statistics_shard", must_not_run)
    rc, err = _build(
        capsys,
        trained_checkpoint.checkpoint_dir,
        fact_corpus_files[0],
        tmp_path / "ix",
        "--faiss",
        factory,
    )
    assert rc == 2 and f"[{code}]" in err and factory in err


def test_hessian_memory_is_estimated_and_refused(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys, monkeypatch
):
    from indexer import preflight

    monkeypatch.setattr(preflight, "free_memory", lambda device: 64 << 20)  # 64 MiB free
    rc = main(
        [
            "build",
            "--model",
            str(trained_checkpoint.checkpoint_dir),
            "--corpus",
            str(fact_corpus_files[0]),
            "--out",
            str(tmp_path / "ix"),
            "-k",
            "0",
            "--hessian",
            "train",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "[insufficient_memory]" in err and "GiB" in err and "--hessian none" in err


def test_model_dir_messages(trained_checkpoint, fact_corpus_files, tmp_path, capsys):
    rc, err = _build(capsys, tmp_path / "no-such-model", fact_corpus_files[0], tmp_path / "ix")
    assert rc == 2 and "[model_not_found]" in err and "does not exist" in err
    run_dir = tmp_path / "run"
    for step in (20, 100):
        shutil.copytree(trained_checkpoint.checkpoint_dir, run_dir / f"checkpoint-{step}")
    rc, err = _build(capsys, run_dir, fact_corpus_files[0], tmp_path / "ix")
    assert rc == 2 and "[not_a_model_dir]" in err and "checkpoint-20, checkpoint-100" in err
    assert f"the latest: {run_dir / 'checkpoint-100'}" in err


def test_fingerprint_store_is_estimated_and_refused(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys, monkeypatch
):
    import collections

    from indexer import preflight

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1024))
    rc, err = _build(
        capsys, trained_checkpoint.checkpoint_dir, fact_corpus_files[0], tmp_path / "ix"
    )
    assert rc == 2 and "[insufficient_disk]" in err and "GiB of disk" in err
    assert not (tmp_path / "ix").exists()


def test_negative_basis_sample_is_a_clear_error(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys
):
    rc, err = _build(
        capsys,
        trained_checkpoint.checkpoint_dir,
        fact_corpus_files[0],
        tmp_path / "ix",
        "--basis-sample",
        "-2",
    )
    assert rc == 2 and "--basis-sample must be >= 0, got -2" in err and "Traceback" not in err
    assert not (tmp_path / "ix").exists()


def test_basis_memory_is_estimated_and_refused(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys, monkeypatch
):
    from encoder.basis import BasisStatistics, basis_bytes
    from encoder.config import FingerprintConfig
    from encoder.modules import select_modules
    from encoder.projection import plan_projection
    from indexer import preflight
    from tests.conftest import tiny_gpt2

    # The estimate is the statistics' own size.
    modules = select_modules(tiny_gpt2(), FingerprintConfig())
    plan = plan_projection(modules, k=3, budget=1)
    stats = BasisStatistics.empty(modules, plan)
    assert basis_bytes(modules, plan) == sum(
        t.numel() * 8 for pair in stats.sums.values() for t in pair if t is not None
    )
    monkeypatch.setattr(preflight, "free_memory", lambda device: 256 << 10)  # 256 KiB free
    rc = main(
        [
            "build",
            "--model",
            str(trained_checkpoint.checkpoint_dir),
            "--corpus",
            str(fact_corpus_files[0]),
            "--out",
            str(tmp_path / "ix"),
            "-k",
            "4",
            "--whiten",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "[insufficient_memory]" in err and "without --whiten" in err
