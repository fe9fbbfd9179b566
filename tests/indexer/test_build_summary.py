"""A build ends with the summary `index info` prints (sequences, tokens, tokens/s, tracked
modules, d, time per pass, size); the model's display name is recorded in the manifest
(`--name`, else run/checkpoint-N) and is what the API reports as `model`."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.errors import ArtifactError
from indexer import manifest as mf
from indexer.__main__ import main
from tests.conftest import PAPER_INDEX_CLI_OPTIONS


def test_build_ends_with_the_index_info_summary(
    trained_checkpoint, fact_corpus_files, tmp_path, capsys
):
    corpus, queries = fact_corpus_files
    out = tmp_path / "named"
    capsys.readouterr()
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
                "--name",
                "facts-gpt2 v1",
                *PAPER_INDEX_CLI_OPTIONS,
            ]
        )
        == 0
    )
    built = capsys.readouterr().out.splitlines()
    assert built[0] == f"index published: {out}"
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out.splitlines()
    assert built[1:] == info
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in info}
    m = mf.read_manifest(out)
    assert fields["name"] == "facts-gpt2 v1" == mf.Manifest.read(out).model.name
    assert (
        int(fields["sequences"]) == m["counts"]["sequences"]
        and int(fields["tokens"]) == m["counts"]["tokens"]
    )
    assert float(fields["tokens/s"].split()[0]) > 0
    modules = m["fingerprint"]["modules"]
    assert fields["modules"].startswith(f"{len(modules)}: {modules[0]}")
    assert int(fields["dim"]) == m["counts"]["dim"]
    assert fields["pass 1 (statistics)"].endswith("seq/s") and fields["pass 2 (encode)"].endswith(
        "seq/s"
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert f"({size} bytes" in fields["size"]


def test_default_name_is_run_and_checkpoint(tiny_index, trained_checkpoint):
    ckpt = Path(trained_checkpoint.checkpoint_dir).resolve()
    assert ckpt.name.startswith("checkpoint-")
    m = mf.read_manifest(tiny_index)
    assert (
        m["model"]["name"]
        == f"{ckpt.parent.name}/{ckpt.name}"
        == mf.Manifest.read(tiny_index).model.name
    )
    assert mf.display_name(Path("/models/gpt2-small")) == "gpt2-small"
    # A manifest without the name entry is refused: every format-2 build writes one.
    legacy = {**m, "model": {k: v for k, v in m["model"].items() if k != "name"}}
    with pytest.raises(ArtifactError) as err:
        mf.Manifest.from_dict(legacy)
    assert err.value.code == "manifest_mismatch"


def test_a_build_prints_nothing_a_user_must_ignore(trained_checkpoint, fact_corpus, tmp_path):
    """The CLI's own process, as a user runs it: stderr holds only INFO lines of this
    project (no DEBUG from bm25s, whose logger is set to DEBUG at import; no tokenizer
    warning for a document longer than the model's context, which the build cuts into
    windows), and the summary no `None`."""
    import json
    import os
    import re
    import subprocess
    import sys

    corpus = tmp_path / "corpus.jsonl"
    texts = [p.text for p in fact_corpus.passages] + [
        " ".join(p.text for p in fact_corpus.passages[:60])
    ]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [
        sys.executable,
        "-m",
        "service.cli",
        "index",
        "build",
        "--model",
        str(trained_checkpoint.checkpoint_dir),
        "--corpus",
        str(corpus),
        "--out",
        str(tmp_path / "index"),
        "--no-progress",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    own = re.compile(r"^\S+ \S+ INFO (encoder|indexer|engine|service|evaluation)\.[\w.]+: ")
    assert [line for line in done.stderr.splitlines() if not own.match(line)] == []
    assert "None" not in done.stdout and "index published" in done.stdout
