"""Resume after SIGKILL and two-process torchrun builds equal an uninterrupted build."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from indexer import manifest as mf
from indexer.__main__ import main
from tests.conftest import PAPER_INDEX_CLI_OPTIONS
from tests.indexer.helpers import REPO


def _args(trained_checkpoint, fact_corpus_files, out: Path) -> list[str]:
    corpus, queries = fact_corpus_files
    return [
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


def _rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / mf.METADATA) as conn:
        return conn.execute("SELECT * FROM examples ORDER BY id").fetchall()


def assert_same_index(a: Path, b: Path) -> None:
    """Byte-identical vectors, identical dense ids and metadata, identical FAISS contents."""
    assert (a / mf.FINGERPRINTS).read_bytes() == (b / mf.FINGERPRINTS).read_bytes()
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r[0] for r in rows_a] == list(range(len(rows_a)))
    assert rows_a == rows_b
    ia, ib = faiss.read_index(str(a / mf.FAISS_INDEX)), faiss.read_index(str(b / mf.FAISS_INDEX))
    assert ia.ntotal == ib.ntotal == len(rows_a)
    assert np.array_equal(ia.reconstruct_n(0, ia.ntotal), ib.reconstruct_n(0, ib.ntotal))
    for name in (mf.WHITENER, mf.SECOND_MOMENTS, mf.PROJECTIONS, mf.R_TRAIN, mf.R_EVAL):
        # safetensors headers order metadata keys arbitrarily: compare contents, not bytes.
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
            assert fa.metadata() == fb.metadata(), name


@pytest.mark.slow
def test_sigkill_mid_build_then_resume(
    paper_index, trained_checkpoint, fact_corpus_files, tmp_path, caplog
):
    out = tmp_path / "index"
    work = tmp_path / ".index.build"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "indexer", *_args(trained_checkpoint, fact_corpus_files, out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        # Kill once pass 1 has finished two of its nine shards: mid-build, mid-pass.
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((work / "stats").glob("train-*.safetensors"))) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and work.is_dir()
    done_before = len(list((work / "stats").glob("train-*.safetensors")))
    assert 2 <= done_before < 9

    with caplog.at_level(logging.INFO, logger="indexer.build"):
        assert main(_args(trained_checkpoint, fact_corpus_files, out)) == 0
    assert "resuming the build" in caplog.text
    assert not work.exists()
    assert_same_index(out, paper_index)
    m = mf.read_manifest(out)
    assert (
        m["build"]["statistics_sequences"] < m["counts"]["sequences"]
    )  # finished shards were skipped


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(
    paper_index, trained_checkpoint, fact_corpus_files, tmp_path
):
    out = tmp_path / "index"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "indexer",
            *_args(trained_checkpoint, fact_corpus_files, out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr
    assert proc.stdout.count("index published:") == 1  # rank 0 only, flushed before os._exit
    assert mf.read_manifest(out)["build"]["world_size"] == 2
    assert_same_index(out, paper_index)
