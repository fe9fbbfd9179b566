"""The accelerator paths (issue 7): run only where CUDA is present, skipped elsewhere (CI).

- float64 on CUDA against the CPU reference (same tolerance as tests/encoder);
- float32 on CUDA against float32 on the CPU;
- the bf16 model (the default on an accelerator) against float32: fingerprint cosine and
  influence-ranking agreement on the trained fact model;
- the automatic batch size: the chosen batch's measured peak stays inside the budget;
- a whole index build on CUDA (bf16, auto batch size) that finds the stating passages.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from encoder.batching import collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.memory import auto_batch_size
from encoder.whitening import Whitener
from tests.conftest import tiny_gpt2
from tests.encoder import reference as ref
from tests.encoder.test_exactness import TOL, _examples, _queries, _random_second_moments
from tests.tolerances import abs_products, assert_within, dot_bound, recompute_bound, rounding_bound

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")


def _encode(enc: TrackStarEncoder, examples, bs: int = 4) -> torch.Tensor:
    return torch.cat(
        [enc.project(collate(examples[i : i + bs])) for i in range(0, len(examples), bs)]
    )


@pytest.mark.parametrize("k", [0, 3])
def test_cuda_float64_matches_reference(k):
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    cfg = FingerprintConfig(k=k, seed=7, correction=True, hessian="mixed")
    sm = _random_second_moments(model, seed=2)
    enc = TrackStarEncoder(model.to(CUDA), cfg, second_moments=sm)
    train, queries = _examples(3, 10, 3, 12, 40), _queries(4, 5, 40)
    phi_t, phi_q = _encode(enc, train), enc.project(collate(queries))
    assert phi_t.device.type == "cuda"
    cpu_model = tiny_gpt2(seed=1, dtype=torch.float64)
    kw = dict(k=k, seed=7, v_hat=sm.v_hat, eps=sm.eps)
    ref_t = np.stack([ref.reference_phi(cpu_model, enc.modules, e, **kw) for e in train])
    ref_q = np.stack([ref.reference_phi(cpu_model, enc.modules, e, **kw) for e in queries])
    scale = max(np.abs(ref_t).max(), 1.0)
    assert np.abs(phi_t.cpu().numpy() - ref_t).max() <= TOL * scale
    assert np.abs(phi_q.cpu().numpy() - ref_q).max() <= TOL * scale
    st, se = enc.new_statistics(), enc.new_statistics()
    st.update(phi_t)
    se.update(phi_q)
    enc.set_whitener(
        Whitener.from_statistics(
            st, se, lambda_=None, lambda_component=cfg.lambda_component, delta=cfg.delta
        )
    )
    rt, re_ = ref.block_moments(ref_t, enc.block_dims), ref.block_moments(ref_q, enc.block_dims)
    lam = ref.reference_lambda(rt, re_, cfg.lambda_component)
    wh = ref.reference_whiten(rt, re_, lam, cfg.delta)
    e = enc.finalize(phi_t).cpu().numpy()
    assert np.abs(e - ref.reference_fingerprints(ref_t, wh, enc.block_dims)).max() < TOL


CONFIGS = {  # every block kind: Exact (corrected), Factored (uncorrected), Sketched
    "gaussian-corrected": {"projection": "gaussian", "correction": True},
    "gaussian-uncorrected": {"projection": "gaussian", "correction": False},
    "sketch": {"projection": "sketch", "correction": True},
}


def _fitted(model, cfg: FingerprintConfig, sm, examples) -> TrackStarEncoder:
    """An encoder whose family state is fitted (a sketch: on ``examples``)."""
    enc = TrackStarEncoder(model, cfg, second_moments=sm)
    if enc.needs_fit:
        enc.fit_basis([collate(examples)])
    return enc


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cuda_float32_matches_cpu(config):
    cfg = FingerprintConfig(k=4, seed=3, hessian="none", **CONFIGS[config])
    model = tiny_gpt2(seed=5, n_embd=32, vocab=64)
    sm = _random_second_moments(model, seed=6)
    examples = _examples(8, 12, 5, 30, 64)
    cpu_enc = _fitted(model, cfg, sm, examples)
    cpu = _encode(cpu_enc, examples).numpy()
    gpu_enc = TrackStarEncoder(
        tiny_gpt2(seed=5, n_embd=32, vocab=64).to(CUDA), cfg, second_moments=sm
    )
    gpu_enc.family.restore(cpu_enc.family.tensors())  # the same whitening on both
    gpu = _encode(gpu_enc, examples)
    assert gpu.dtype == torch.float32 and gpu.device.type == "cuda"
    gpu = gpu.cpu().numpy()
    # float32 on both, other kernels (cuBLAS): a longer rounding chain.
    assert_within(gpu, cpu, recompute_bound(stages=2048) * np.abs(cpu).max(), "cuda vs cpu")


def _fact_scores(checkpoint, corpus, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Influence scores [Q, N] (hessian train) and the fingerprints of the train set."""
    from benchmarks.bench_encode import corpus_examples
    from encoder.model_loading import load_model, load_tokenizer
    from encoder.optimizer_state import load_second_moments

    model = load_model(checkpoint, device=CUDA, dtype=dtype)
    tok = load_tokenizer(checkpoint)
    sm = load_second_moments(checkpoint, model)
    train, queries = corpus_examples(corpus, tok, max_len=model.config.n_positions - 1)
    enc = TrackStarEncoder(model, FingerprintConfig(k=8, hessian="train"), second_moments=sm)
    phi_t, phi_q = _encode(enc, train, 32), _encode(enc, queries, 32)
    st = enc.new_statistics()
    st.update(phi_t)
    enc.set_whitener(
        Whitener.from_statistics(st, None, lambda_=0.0, lambda_component=1 / 64, delta=1e-3)
    )
    e_t, e_q = enc.finalize(phi_t), enc.finalize(phi_q)
    return (e_q @ e_t.T).cpu().double().numpy(), e_t.cpu().double().numpy()


def test_bf16_model_agrees_with_float32(trained_checkpoint, fact_corpus):
    ck = trained_checkpoint.checkpoint_dir
    s32, e32 = _fact_scores(ck, fact_corpus, torch.float32)
    s16, e16 = _fact_scores(ck, fact_corpus, torch.bfloat16)
    cos = (e32 * e16).sum(1)
    rho = [spearmanr(a, b).statistic for a, b in zip(s32, s16, strict=True)]
    top1 = np.mean(s32.argmax(1) == s16.argmax(1))
    print(
        f"bf16 vs fp32: cosine mean {cos.mean():.4f} min {cos.min():.4f}; "
        f"spearman mean {np.mean(rho):.4f} min {np.min(rho):.4f}; top-1 agreement {top1:.3f}"
    )
    assert cos.mean() >= 0.95 and np.mean(rho) >= 0.9 and top1 >= 0.8


def test_auto_batch_size_peak_stays_in_budget():
    from benchmarks.bench_encode import build_model, random_second_moments

    model = build_model("gpt2-4x256", 256)
    sm = random_second_moments(model)
    model = model.to(CUDA, torch.bfloat16)
    budget = 2 << 30
    for name, family in CONFIGS.items():
        enc = TrackStarEncoder(
            model, FingerprintConfig(k=16, hessian="none", **family), second_moments=sm
        )
        bs, est = auto_batch_size(
            enc, 256, free=budget, fraction=0.5, max_batch=4096
        )  # before any fit
        g = torch.Generator().manual_seed(9)
        ids = torch.randint(1, model.config.vocab_size, (bs, 256), generator=g)
        batch = collate([sequence_example(r.tolist()) for r in ids])
        if enc.needs_fit:
            enc.fit_basis([collate([sequence_example(r.tolist()) for r in ids[:4]])])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        enc.project(batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        print(
            f"{name}: batch {bs}, estimate {est.bytes_for(bs) / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB"
        )
        assert bs >= 8
        assert peak <= 0.5 * budget
        assert abs(peak - est.bytes_for(bs)) <= 0.25 * est.bytes_for(bs)


def test_index_build_on_cuda_finds_stating_passages(
    trained_checkpoint, fact_corpus, fact_corpus_files, tmp_path
):
    from engine.index import InfluenceIndex
    from indexer.build import BuildConfig, run_build

    corpus, queries = fact_corpus_files
    cfg = BuildConfig(
        model=trained_checkpoint.checkpoint_dir,
        corpus=corpus,
        queries=queries,
        out=tmp_path / "index",
        fingerprint=FingerprintConfig(k=8),
        shard_size=64,
        batch_size=0,
        device="cuda",
    )
    out = run_build(cfg)
    idx = InfluenceIndex.open(out)
    try:
        assert idx.encoder.device.type == "cuda"
        assert next(idx.encoder.model.parameters()).dtype == torch.bfloat16
        assert idx.manifest.build["batch_size"] >= 8
        qs = fact_corpus.queries
        _, ids = idx.search(idx.encode_queries([(q.prompt, q.completion) for q in qs]), 10)
        hits = []
        for q, row in zip(qs, ids, strict=True):
            docs = [r.document_id for r in idx.examples([int(i) for i in row if i >= 0])]
            hits.append(any(d in q.relevant_ids for d in docs))
        recall = float(np.mean(hits))
        print(f"CUDA bf16 index: batch {idx.manifest.build['batch_size']}, recall@10 {recall:.3f}")
        assert recall >= 0.7
    finally:
        idx.close()


@pytest.mark.parametrize("config", ["gaussian-corrected", "gaussian-uncorrected"])
def test_low_precision_products_match_float32_copies(config):
    """The bf16 fast path (bf16 operands, float32 outputs) against converting activations
    and gradients to float32 first: exact up to summation order for a corrected block; the
    uncorrected (factored) block's bf16-rounded projections cost < 1e-4 in cosine."""
    from benchmarks.bench_encode import build_model, random_second_moments

    model = build_model("gpt2-2x128", 64)
    sm = random_second_moments(model)
    model = model.to(CUDA, torch.bfloat16)
    enc = TrackStarEncoder(
        model, FingerprintConfig(k=8, hessian="none", **CONFIGS[config]), second_moments=sm
    )
    assert enc.low_precision_products
    batch = collate(_examples(11, 6, 20, 64, model.config.vocab_size))
    fast = enc.project(batch)
    copies = replace(enc.precision, low_precision_products=False)
    slow = TrackStarEncoder(model, enc.config, second_moments=sm, precision=copies).project(batch)
    assert fast.dtype == slow.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fast, slow, dim=1)
    rel = ((fast - slow).abs().max() / slow.abs().max()).item()
    print(
        f"{config}: fast vs float32 copies: min cosine {cos.min().item():.7f}, max rel diff {rel:.2e}"
    )
    if config == "gaussian-corrected":
        assert rel < 1e-4
    assert cos.min().item() > 1 - 1e-4


def test_torch_exact_search_on_cuda_matches_faiss_flat():
    """placement torch on CUDA: float16 blocks, float16 products with float32 accumulation
    and a two-part query give FAISS Flat's ids and scores."""
    import faiss

    from engine.torch_search import TorchFlatSearch

    rng = np.random.default_rng(0)
    fps = rng.standard_normal((20_000, 256)).astype(np.float32)
    fps = (fps / np.linalg.norm(fps, axis=1, keepdims=True)).astype(np.float16)
    q = rng.standard_normal((33, 256)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(256)
    flat.add(fps.astype(np.float32))
    want_s, want_i = flat.search(q, 50)
    search = TorchFlatSearch(fps)
    assert all(d.type == "cuda" for d in search.devices)
    assert all(block.dtype == torch.float16 for _, block in search.blocks)
    got_s, got_i = search.search(q, 50)
    # float32 sums in other orders, plus the float16 tail of the two-part query.
    bound = dot_bound(q, fps.astype(np.float32)) + abs_products(
        rounding_bound(rounding_bound(q)), fps.astype(np.float32)
    )
    assert_within(got_s, want_s, np.take_along_axis(bound, want_i, axis=1), "scores")
    assert (got_i == want_i).mean() > 0.999  # a score tie at 1e-7 may swap a pair
