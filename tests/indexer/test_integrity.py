"""An index whose manifest does not describe its artifacts is refused at open and by verify;
identical inputs give byte-identical indexes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from api.errors import ArtifactError
from engine.index import InfluenceIndex, OpenOptions
from indexer import manifest as mf
from indexer.__main__ import main


def _copy(paper_index, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(paper_index, out)
    return out


def _edit(index_dir, change):
    m = json.loads((index_dir / mf.MANIFEST).read_text())
    change(m)
    (index_dir / mf.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
    "key,value",
    [
        ("hessian", "none"),
        ("correction", False),
        ("projection", "sketch"),
        ("unit_norm", False),
        ("seed", 3),
        ("hessian", "train"),
    ],
)
def test_edited_fingerprint_config_is_refused(paper_index, tmp_path, capsys, key, value):
    index_dir = _copy(paper_index, tmp_path)
    _edit(index_dir, lambda m: m["fingerprint"]["config"].__setitem__(key, value))
    with pytest.raises(ArtifactError) as err:
        InfluenceIndex.open(index_dir, OpenOptions(device="cpu"))
    assert err.value.code == "manifest_mismatch", err.value.message
    assert main(["verify", str(index_dir)]) == 2
    assert "manifest" in capsys.readouterr().err


def test_unlisted_file_is_refused(paper_index, tmp_path, capsys):
    index_dir = _copy(paper_index, tmp_path)
    _edit(index_dir, lambda m: m["files"].pop(mf.WHITENER))
    with pytest.raises(ArtifactError, match="does not list whitener") as err:
        InfluenceIndex.open(index_dir, OpenOptions(device="cpu"))
    assert err.value.code == "manifest_mismatch"
    assert main(["verify", str(index_dir)]) == 2
    assert "whitener" in capsys.readouterr().err


def test_nonfinite_fingerprints_are_refused(paper_index, tmp_path, capsys):
    index_dir = _copy(paper_index, tmp_path)
    fps = np.load(index_dir / mf.FINGERPRINTS)
    fps[0, 0] = np.nan
    np.save(index_dir / mf.FINGERPRINTS, fps)
    _edit(
        index_dir,
        lambda m: m["files"].__setitem__(
            mf.FINGERPRINTS, mf.sha256_file(index_dir / mf.FINGERPRINTS)
        ),
    )
    with pytest.raises(ArtifactError) as err:
        InfluenceIndex.open(index_dir, OpenOptions(device="cpu"))
    assert err.value.code == "nonfinite_fingerprints"
    assert main(["verify", str(index_dir)]) == 2
    assert "non-finite" in capsys.readouterr().err


def test_exact_norms_that_are_not_the_sequences_are_refused(tiny_index, tmp_path, capsys):
    """A sketch index stores each sequence's exact-stage norm; norms of another build (here:
    the first row's scaled, its checksum updated) are refused at open and by verify."""
    assert main(["verify", str(tiny_index)]) == 0  # the untouched default index passes
    capsys.readouterr()
    index_dir = _copy(tiny_index, tmp_path)
    sq = np.load(index_dir / mf.EXACT_NORMS)
    sq[0] *= 1.01
    np.save(index_dir / mf.EXACT_NORMS, sq)
    _edit(
        index_dir,
        lambda m: m["files"].__setitem__(
            mf.EXACT_NORMS, mf.sha256_file(index_dir / mf.EXACT_NORMS)
        ),
    )
    with pytest.raises(ArtifactError, match="exact-stage norms") as err:
        InfluenceIndex.open(index_dir, OpenOptions(device="cpu"))
    assert err.value.code == "manifest_mismatch"
    assert main(["verify", str(index_dir)]) == 2
    assert "exact-stage norms" in capsys.readouterr().err


def test_the_untouched_index_passes(paper_index, capsys):
    assert main(["verify", str(paper_index)]) == 0
    out = capsys.readouterr().out
    assert "config agrees" in out


def test_identical_inputs_give_byte_identical_indexes(
    trained_checkpoint, fact_corpus_files, tmp_path
):
    from tests.conftest import PAPER_INDEX_CLI_OPTIONS

    corpus, queries = fact_corpus_files
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            main(
                [
                    "build",
                    "--model",
                    str(trained_checkpoint.checkpoint_dir),
                    "--corpus",
                    str(corpus),
                    "--queries",
                    str(queries),
                    "--out",
                    str(out),
                    "--no-progress",
                    *PAPER_INDEX_CLI_OPTIONS,
                ]
            )
            == 0
        )
        outs.append(out)
    a, b = (mf.read_manifest(o) for o in outs)
    assert a["files"] == b["files"]  # every artifact byte for byte (the checksums cover them all)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for rel in files:
        if rel.name != mf.MANIFEST:
            assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    assert mf.manifest_version(outs[0]) == mf.manifest_version(outs[1])
    assert {k: v for k, v in a.items() if k not in mf.VOLATILE_KEYS} == {
        k: v for k, v in b.items() if k not in mf.VOLATILE_KEYS
    }
