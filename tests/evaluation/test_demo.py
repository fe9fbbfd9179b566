"""`influence demo --quick` end to end: corpus -> trained model -> index -> live HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.harness import free_port, wait_http

pytestmark = pytest.mark.slow


def _learned(checkpoint: Path, queries) -> list:
    """The queries whose completion the demo model reproduces greedily."""
    from encoder.model_loading import load_model, load_tokenizer
    from evaluation.train import fact_accuracy

    model, tok = load_model(checkpoint, device="cpu"), load_tokenizer(checkpoint)
    return [q for q in queries if fact_accuracy(model, tok, [q]) == 1.0]


def test_quick_demo_serves_a_learned_fact(tmp_path):
    from evaluation.corpus import load_queries

    workdir, port = tmp_path / "demo", free_port()
    log = (tmp_path / "demo.log").open("w")
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "demo",
        "--quick",
        "--workdir",
        str(workdir),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", 480, proc)
        printed = (tmp_path / "demo.log").read_text()
        assert (
            "curl -s" in printed
            and f"{url}/" in printed
            and "(* = a passage that states the fact)" in printed
        )

        queries = load_queries(workdir / "corpus" / "queries.jsonl")
        checkpoint = next((workdir / "model").glob("checkpoint-*"))
        learned = _learned(checkpoint, queries)
        assert len(learned) >= len(queries) // 2, "the quick demo model learned too few facts"

        hits = 0
        with httpx.Client(base_url=url, timeout=60) as client:
            for q in learned:
                r = client.post(
                    "/v1/influence", json={"prompt": q.prompt, "completion": q.completion, "k": 10}
                )
                assert r.status_code == 200, r.text
                top10 = {str(res["document_id"]) for res in r.json()["results"]}
                hits += bool(top10 & set(q.relevant_ids))
        # Every learned fact should be traceable; demand a clear majority, and report.
        recall = hits / len(learned)
        print(
            f"quick demo: {len(learned)}/{len(queries)} facts learned, top-10 fact recall {recall:.3f}"
        )
        assert recall >= 0.5

        # A second run reuses every cached step and is ready quickly.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{url}/readyz", 120, proc)
        assert time.monotonic() - start < 60
        assert (tmp_path / "demo.log").read_text().count("model: cached") == 1

        # The port is taken now: a third demo says so in one line, exit 2, announcing nothing.
        third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert third.returncode == 2, third.stdout + third.stderr
        assert f"[port_in_use]: 127.0.0.1:{port} is already in use" in third.stderr
        assert "is serving" not in third.stdout and "Traceback" not in third.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
