"""The benchmark scripts run end to end at smoke size (no timing asserted: `make bench`
reports ratios; this only keeps the scripts from rotting)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_search_quick_with_graphs(tmp_path):
    from benchmarks import bench_search

    assert (
        bench_search.main(
            [
                "--quick",
                "--hnsw",
                "--queries",
                "32",
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "bench_search_quick.json").read_text())
    factories = {r["factory"] for r in data["configs"][0]["rows"]}
    assert factories == {"PCA64,IVF512,PQ16x4fs", "PCA64,HNSW32", "HNSW32_SQ8"}
    for row in data["configs"][0]["rows"]:
        assert (
            0.0 <= row["recall@10"] <= 1.0
            and row["b1_p50_ms"] > 0
            and row["bytes_per_vector_ram"] > 0
        )
        # Codebooks and transforms are the fixed part; what remains per vector is smaller.
        assert (
            0 < row["fixed_bytes_ram"]
            and 0 < row["bytes_per_vector_marginal"] < row["bytes_per_vector_ram"]
        )
    # The most generous setting of every index finds most true neighbours of easy queries.
    assert max(r["recall@10"] for r in data["configs"][0]["rows"]) >= 0.9
    assert (tmp_path / "bench_search_quick.md").read_text().startswith("# Search benchmark")


@pytest.mark.slow
def test_bench_search_quick_flat_codes_and_torch_exact(tmp_path):
    from benchmarks import bench_search

    assert (
        bench_search.main(
            [
                "--quick",
                "--queries",
                "32",
                "--factories",
                "PQ64x4fs",
                "--torch-exact",
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path),
                "--tag",
                "t",
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench_search_quick_t.json").read_text())["configs"][0]["rows"]
    codes = [r for r in rows if r["factory"] == "PQ64x4fs"]
    assert [r["candidates"] for r in codes] == [256, 512, 1024]
    # 64 sub-quantizers x 4 bits = 32 B of codes per vector; the codebooks are the fixed part.
    assert all(r["bytes_per_vector_marginal"] == pytest.approx(32.0, abs=0.01) for r in codes)
    (exact,) = [r for r in rows if r["factory"].startswith("torch exact")]
    assert exact["recall@10"] == 1.0 and exact["b1_p50_ms"] > 0


@pytest.mark.slow
def test_bench_encode_quick(tmp_path):
    from benchmarks import bench_encode

    assert bench_encode.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_encode_quick.json").read_text())
    row = data["speed"][0]
    assert row["plain_s"] > 0 and row["default_s"] > 0 and row["paper_s"] > 0
    assert row["default_ratio"] == row["default_s"] / row["plain_s"]
    assert [g["goal"].split(" ")[0] for g in data["goals"]] == ["default", "paper", "default"]
    assert row["exact_s"] > 0 and row["exact_ratio"] == row["exact_s"] / row["plain_s"]


@pytest.mark.slow
def test_bench_scale_quick(tmp_path):
    """One shape in its own process, both fingerprints' rows from one measurement, a query's
    cost at each cap from the measured per-candidate cost, and the 1B / 8B plans fitting."""
    from benchmarks import bench_scale

    assert bench_scale.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_scale_quick.json").read_text())
    (m,) = data["measured"].values()
    default, paper = data["rows"]
    assert (default["config"], paper["config"]) == ("default", "paper")
    assert default["encode_over_step"] == m["default_s"] / m["plain_s"]
    assert paper["encode_over_step"] == m["paper_s"] / m["plain_s"]
    assert default["index_bytes_per_sequence"] == 2 * default["d"] + 8
    assert 0 < m["query_s"] == default["query_s_rescore_0"]
    per = m["exact_s"] / m["batch"]
    assert default["query_s_rescore_200"] == m["query_s"] + 200 * per
    assert default["peak_rss_GiB"] > default["state_GiB"] > 0
    assert [p["shape"] for p in data["plans"]] == ["llama-3.2-1b", "llama-3.1-8b"]
    assert all(p["fits_build"] and p["fits_serve"] for p in data["plans"])
    assert [g["met"] for g in data["goals"][-2:]] == [True, True]
    assert data["goals"][0]["measured"] == default["encode_over_step"]


@pytest.mark.slow
def test_bench_fit_quick(tmp_path):
    from benchmarks import bench_fit

    assert bench_fit.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_fit_quick.json").read_text())
    (row,) = data["rows"]
    assert row["sums_s"] > 0 and row["sums_formed_s"] > 0 and row["roots_s"] > 0
    batches = row["basis_sample"] / row["batch"]
    want = (batches * row["sums_s"] + row["roots_s"]) / (batches * row["encode_s"])
    assert row["basis_step_ratio"] == want  # the same arithmetic in the same order
    assert data["goals"][0]["measured"] == row["basis_step_ratio"]


def test_bench_service_quick_on_the_tiny_index(tiny_index, tmp_path):
    """Both modes served over loopback, every level answered, goals computed from the
    measured rows (the paired windows included)."""
    from benchmarks import bench_service

    assert (
        bench_service.main(
            [
                "--quick",
                "--index",
                str(tiny_index),
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "bench_service_quick.json").read_text())
    for mode in data["modes"]:
        assert [r["concurrency"] for r in mode["load"]] == [1, 4, 8, 16]
        assert all(r["requests"] > 0 and r["failures"] == 0 for r in mode["load"])
        (pair,) = mode["pairs"]
        assert pair["p99_16_over_p50_1"] == pytest.approx(
            pair["p99_ms_at_16"] / pair["p50_ms_at_1"]
        )
    goals = {(g["mode"], g["goal"].split(" (")[0]): g for g in data["goals"]}
    on = data["modes"][0]
    assert on["mode"] == "batching_on"
    assert (
        goals[("batching_on", "p99@16 / p50@1 <= 3")]["measured"]
        == on["pairs"][0]["p99_16_over_p50_1"]
    )
    price = goals[("batching_on", "QPS@8 >= 8")]
    assert price["measured"] == next(r["qps"] for r in on["load"] if r["concurrency"] == 8)
    md = (tmp_path / "bench_service_quick.md").read_text()
    assert "## Paired windows" in md and "## Goals" in md


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every step of the GPU check at toy size on the CPU,
    so the script is known to work before a GPU machine runs it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("env", "tests_gpu", "encode", "search", "serve"):
        assert f"| {step} | 0 |" in summary, summary
    encode = json.loads((tmp_path / "bench_encode_gpu_check.json").read_text())
    assert {r["model"] for r in encode["speed"]} == {"pythia-tiny", "llama-tiny"}
    assert all(r["tokens_per_s_default"] > 0 and "mfu_default" in r for r in encode["speed"])


@pytest.mark.slow
def test_bench_fidelity_quick_on_the_trained_model(trained_checkpoint, fact_corpus_files, tmp_path):
    """The fidelity benchmark runs on the session's trained model: overlaps are fractions,
    and the exact second stage can only gain with more candidates (the unprojected top-10
    members among the candidates are always kept)."""
    import shutil

    from benchmarks import bench_fidelity

    work = tmp_path / "w" / "quick"
    (work / "corpus").mkdir(parents=True)
    for path in fact_corpus_files:
        shutil.copy(path, work / "corpus" / path.name)
    (work / "stamp.json").write_text(
        json.dumps({"checkpoint": str(trained_checkpoint.checkpoint_dir)})
    )
    assert (
        bench_fidelity.main(
            ["--quick", "--queries", "6", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)]
        )
        == 0
    )
    data = json.loads((tmp_path / "bench_fidelity_quick.json").read_text())
    rows = data["results"][0]["rows"]
    assert [(r["config"], r["projection"]) for r in rows] == [
        ("k=8 gaussian", "gaussian"),
        ("budget 2^16, block 256, sketch", "sketch"),
    ]
    assert rows[0]["d"] == 8 * 64 and rows[1]["d"] == 8 * 256  # 8 modules: k^2, the cap
    for r in rows:
        gains = [r["rescore20"], r["rescore50"], r["rescore100"]]
        assert all(
            0.0 <= g <= 1.0 for g in [*gains, r["none_vs_exact"], r["none_vs_own"], r["mixed_seed"]]
        )
        assert gains == sorted(gains)
        assert r["build_passes_s"] > 0 and r["bytes_per_vector"] == 2 * r["d"]
    assert (tmp_path / "bench_fidelity_quick.png").stat().st_size > 0


def test_bench_rescore_depth_on_the_trained_model(trained_checkpoint, fact_corpus_files, tmp_path):
    """The depth benchmark runs on the session's trained model with the default (sketch)
    fingerprint; re-scoring more candidates can only recover more of the unprojected top-10."""
    import shutil

    from benchmarks import bench_rescore_depth

    work = tmp_path / "w" / "quick"
    (work / "corpus").mkdir(parents=True)
    for path in fact_corpus_files:
        shutil.copy(path, work / "corpus" / path.name)
    (work / "stamp.json").write_text(
        json.dumps({"checkpoint": str(trained_checkpoint.checkpoint_dir)})
    )
    assert (
        bench_rescore_depth.main(
            [
                "--models",
                "quick",
                "--queries",
                "6",
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    (row,) = json.loads((tmp_path / "bench_rescore_depth.json").read_text())["rows"]
    assert row["projection"] == "sketch"
    gains = [row["first_vs_own"]] + [row[f"rescore{c}"] for c in bench_rescore_depth.DEPTHS]
    assert all(0.0 <= g <= 1.0 for g in gains) and gains == sorted(gains)


def test_bench_milvus_quick_on_the_tiny_index(tiny_index, tmp_path):
    """Local FAISS and Milvus Lite rows for the index and the synthetic store; Milvus's
    FLAT answers have full recall (it scores the same float16 values), counting as hits the
    answers tied with the k-th within float32 rounding (the plain sketch of near-duplicate
    sequences gives equal scores, ordered either way)."""
    from benchmarks import bench_milvus

    assert bench_milvus.main(["--quick", "--index", str(tiny_index), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_milvus.json").read_text())["rows"]
    assert [r["backend"].split(" ")[0] for r in rows] == ["FAISS", "Milvus", "FAISS", "Milvus"]
    assert all(r["recall@10, ties counted"] == 1.0 for r in rows)
    assert all(r["b1 p99 ms"] >= r["b1 p50 ms"] > 0 for r in rows)


def test_bench_peer_skips_cleanly_without_bergson(tmp_path, capsys):
    from benchmarks import bench_peer

    assert (
        bench_peer.main(
            ["--peer-python", str(tmp_path / "no-venv" / "python"), "--out", str(tmp_path)]
        )
        == 0
    )
    assert "skipped: no bergson" in capsys.readouterr().out
    assert not list(tmp_path.glob("bench_peer*"))


def test_bench_peer_scale_skips_cleanly_without_bergson_and_reads_peak_rss(
    tmp_path, monkeypatch, capsys
):
    from benchmarks import bench_peer_scale

    monkeypatch.setattr(bench_peer_scale, "PEER_PYTHON", tmp_path / "no-venv" / "python")
    assert bench_peer_scale.main(["--out", str(tmp_path)]) == 0
    assert "make peer-venv" in capsys.readouterr().out and not list(tmp_path.glob("*.json"))
    report = "\tUser time (seconds): 1.0\n\tMaximum resident set size (kbytes): 2097152\n"
    assert bench_peer_scale.peak_rss_gib(report) == 2.0
    with pytest.raises(RuntimeError, match="peak RSS"):
        bench_peer_scale.peak_rss_gib("no report")


def test_bench_peer_feeds_the_peer_our_ids_targets_and_second_moments(tmp_path):
    """What bergson is given and how its output is read, without bergson: labels are -100 off
    the targets, the optimizer state names every parameter once with our v_hat, and its
    gradients.bin columns are re-ordered into our module order."""
    import numpy as np
    import torch
    from datasets import load_from_disk

    from benchmarks import bench_peer
    from encoder.batching import Example
    from encoder.config import FingerprintConfig
    from encoder.modules import select_modules
    from encoder.optimizer_state import SecondMoments
    from tests.conftest import tiny_gpt2

    examples = [Example((5, 6, 7), (False, True, True)), Example((1, 2), (False, False))]
    assert bench_peer.write_dataset(examples, tmp_path / "ds") == 5
    ds = load_from_disk(str(tmp_path / "ds"))
    assert ds["input_ids"][:] == [[5, 6, 7], [1, 2]] and ds["labels"][:] == [
        [-100, 6, 7],
        [-100, -100],
    ]

    model = tiny_gpt2()
    v = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    bench_peer.write_optimizer_state(SecondMoments(v, 1e-7, "t"), model, tmp_path / "opt.pt")
    opt = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert [s["param_name"] for s in opt["state"].values()] == [
        n for n, _ in model.named_parameters()
    ]
    assert all(torch.equal(s["exp_avg_sq"], v[s["param_name"]]) for s in opt["state"].values())
    assert opt["param_groups"][0]["eps"] == 1e-7

    modules = select_modules(model, FingerprintConfig())
    sizes = {
        m.name.removeprefix("transformer."): m.out_features * m.in_features
        for m in reversed(modules)
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "info.json").write_text(
        json.dumps({"num_grads": 2, "grad_sizes": sizes, "base_dtype": "float32"})
    )
    flat = np.arange(2 * sum(sizes.values()), dtype=np.float32).reshape(2, -1)
    flat.tofile(run / "gradients.bin")
    got = bench_peer.peer_gradients(run, modules)
    starts = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1], strict=True))
    first = modules[0].name.removeprefix("transformer.")
    np.testing.assert_array_equal(
        got[:, : sizes[first]], flat[:, starts[first] : starts[first] + sizes[first]]
    )
    assert got.shape == (2, sum(sizes.values()))


def test_bench_plan_without_measuring(tmp_path):
    """The plans at real model sizes come from configs alone (meta device): every shape and
    both fingerprints, the 80 GB verdicts stated for the GPU shapes."""
    from benchmarks import bench_plan

    assert bench_plan.main(["--no-measure", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_plan.json").read_text())
    assert {(r["shape"], r["config"]) for r in data["rows"]} == {
        (shape, config) for shape in bench_plan.SHAPES for config in bench_plan.CONFIGS
    }
    for row in data["rows"]:
        assert row["build_GiB"] > 0 and (row["fits_build"] is None) == (row["device"] == "cpu")


@pytest.mark.slow
def test_the_plan_is_within_a_quarter_of_a_measured_encode():
    """``influence index plan``'s CPU build total against the peak RSS of a fresh process that
    encodes the same sizes (a 4 x 256 GPT-2, 8 x 256 tokens; bench_plan measures GPT-2 small)."""
    import subprocess
    import sys

    code = (
        "import json; from benchmarks.bench_plan import measure; "
        "print(json.dumps(measure(256, 8, 4, 256)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.75 <= row["plan_over_measured"] <= 1.25, row


def test_bench_fold_measures_the_folded_first_stage():
    """Unfolded, the re-ranked search is Flat's; folded, its scores carry the fold's error."""
    import numpy as np

    from benchmarks.bench_fold import measure

    rng = np.random.default_rng(0)
    fps = rng.standard_normal((300, 512)).astype(np.float32)
    fps /= np.linalg.norm(fps, axis=1, keepdims=True)
    q = fps[:20] + 0.1 * rng.standard_normal((20, 512)).astype(np.float32)
    whole = measure(fps, q, 5, 1)
    assert whole["overlap_with_flat"] == 1 and whole["score_error_sd"] == 0
    halved = measure(fps, q, 5, 2)
    assert halved["width"] == 256 and 0 < halved["score_error_sd"]
    assert 0 < halved["overlap_with_flat"] <= 1
