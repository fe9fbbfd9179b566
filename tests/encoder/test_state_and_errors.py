"""Optimizer state round trip, streaming statistics, and clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from api.errors import ConfigError, InputError, InputTooLongError, OptimizerStateError
from encoder.batching import collate, sequence_example, tokenize_query
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.model_loading import load_model, load_tokenizer
from encoder.optimizer_state import load_second_moments
from encoder.whitening import RStatistics, Whitener
from tests.conftest import tiny_gpt2


def test_trainer_checkpoint_round_trip(trained_checkpoint):
    """Second moments loaded from a real Trainer checkpoint equal exp_avg_sq / (1 - b2^t)
    of the parameter the Trainer's own optimizer numbering points at."""
    from transformers import Trainer, TrainingArguments

    ckpt = trained_checkpoint.checkpoint_dir
    model = load_model(ckpt, device="cpu")
    sm = load_second_moments(ckpt, model)
    assert sm.source.startswith("trainer-checkpoint")

    # Independent mapping: let a Trainer build its optimizer on this model and match the
    # parameter objects of its groups to the indices of the saved state.
    args = TrainingArguments(output_dir=str(ckpt.parent / "probe"), report_to=[], use_cpu=True)
    probe = Trainer(model=model.requires_grad_(True), args=args)
    opt = probe.create_optimizer()
    by_id = {id(p): n for n, p in model.named_parameters()}
    ordered = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
    model.requires_grad_(False)
    raw = torch.load(ckpt / "optimizer.pt", weights_only=True)
    idx = [i for g in raw["param_groups"] for i in g["params"]]
    beta2 = raw["param_groups"][0]["betas"][1]
    assert sm.eps == raw["param_groups"][0]["eps"]
    checked = 0
    for i, name in zip(idx, ordered, strict=True):
        st = raw["state"][i]
        expected = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
        assert torch.allclose(sm.v_hat[name], expected, rtol=1e-6, atol=0), name
        checked += 1
    assert checked == len(list(model.parameters()))

    # And it drives an encoder: fingerprints are finite unit vectors.
    enc = TrackStarEncoder(
        model,
        FingerprintConfig(k=4, hessian="none", projection="gaussian", correction=True),
        second_moments=sm,
    )
    tok = load_tokenizer(ckpt)
    q = tokenize_query(tok, "The capital of", " Nowhere")
    e = enc.encode(collate([q], pad_id=tok.pad_token_id))
    assert torch.isfinite(e).all() and torch.allclose(e.norm(dim=-1), torch.ones(1))


def test_safetensors_second_moments_round_trip(tmp_path):
    model = tiny_gpt2()
    enc = TrackStarEncoder(
        model, FingerprintConfig(k=2, hessian="none", projection="gaussian", correction=True)
    )
    batches = [collate([sequence_example([1, 2, 3, 4]), sequence_example([5, 6, 7])])]
    sm = enc.estimate_second_moments(batches)
    assert sm.source == "estimated(n=2)"
    path = tmp_path / "v.safetensors"
    sm.save(path)
    back = load_second_moments(path, model)
    assert back.eps == sm.eps
    for name, v in sm.v_hat.items():
        assert torch.equal(back.v_hat[name], v)
    # Raw exp_avg_sq with step/beta2 metadata is bias-corrected on load.
    raw = {n: v * (1 - 0.999**10) for n, v in sm.v_hat.items()}
    save_file(raw, str(tmp_path / "raw.safetensors"), metadata={"step": "10", "beta2": "0.999"})
    corrected = load_second_moments(tmp_path / "raw.safetensors", model)
    for name, v in sm.v_hat.items():
        assert torch.allclose(corrected.v_hat[name], v, rtol=1e-5)


def test_estimated_second_moments_are_mean_squared_gradients():
    model = tiny_gpt2(dtype=torch.float64)
    enc = TrackStarEncoder(
        model, FingerprintConfig(k=0, hessian="none", correction=False, projection="gaussian")
    )
    exs = [sequence_example([1, 2, 3, 4, 9]), sequence_example([5, 6, 7])]
    sm = enc.estimate_second_moments([collate(exs)])
    phi = enc.project(collate(exs))  # k=0, no correction: phi = vec(G) per example
    m = enc.modules[0]
    g = phi[:, : m.out_features * m.in_features].view(2, m.out_features, m.in_features)
    expected = (g**2).mean(0)
    got = m.weight_as_out_in(sm.v_hat[m.param_name]).double()
    assert torch.allclose(got, expected.float().double(), rtol=1e-5)


def test_streaming_statistics_merge_equals_whole(tmp_path):
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(50, 12, generator=g)
    names, dims = ["a", "b", "c"], [4, 3, 5]
    whole = RStatistics(names, dims)
    whole.update(phi)
    left, right = RStatistics(names, dims), RStatistics(names, dims)
    for i in range(0, 20, 7):
        left.update(phi[i : min(i + 7, 20)])
    right.update(phi[20:])
    right.save(tmp_path / "right.safetensors")
    merged = left.merge(RStatistics.load(tmp_path / "right.safetensors"))
    assert merged.count == whole.count == 50
    for a, b in zip(merged.sums, whole.sums, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    w1 = Whitener.from_statistics(merged, None, lambda_=None, lambda_component=1 / 64, delta=1e-3)
    w2 = Whitener.from_statistics(whole, None, lambda_=None, lambda_component=1 / 64, delta=1e-3)
    w1.save(tmp_path / "w.safetensors")
    w3 = Whitener.load(tmp_path / "w.safetensors")
    assert torch.allclose(w3.apply(phi.double()), w2.apply(phi.double()), atol=1e-10)
    with pytest.raises(ConfigError):
        merged.merge(RStatistics(["a"], [12]))


def test_unknown_module_glob_is_a_clear_error():
    with pytest.raises(ConfigError) as exc:
        TrackStarEncoder(tiny_gpt2(), FingerprintConfig(include=("*.nonexistent_proj",)))
    assert exc.value.code == "unknown_module_glob"
    assert "nonexistent_proj" in str(exc.value)


def test_module_globs_select_and_exclude():
    enc = TrackStarEncoder(
        tiny_gpt2(),
        FingerprintConfig(
            include=("*.mlp.*",), exclude=("*.h.1.*",), hessian="none", correction=False
        ),
    )
    assert enc.module_names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    with_head = TrackStarEncoder(
        tiny_gpt2(), FingerprintConfig(track_lm_head=True, hessian="none", correction=False)
    )
    assert with_head.module_names[-1] == "lm_head"


def test_optimizer_state_of_another_model_is_refused(tmp_path):
    small, other = tiny_gpt2(n_embd=8), tiny_gpt2(n_embd=16)
    opt = torch.optim.AdamW(other.requires_grad_(True).parameters())
    other(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(OptimizerStateError) as exc:
        load_second_moments(tmp_path, small)
    assert "does not match" in str(exc.value)
    with pytest.raises(OptimizerStateError):
        load_second_moments(tmp_path / "missing.pt", small)
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    with pytest.raises(OptimizerStateError):
        load_second_moments(tmp_path / "garbage.pt", small)


def test_query_errors(trained_checkpoint):
    tok = load_tokenizer(trained_checkpoint.checkpoint_dir)
    with pytest.raises(InputError) as exc:
        tokenize_query(tok, "The capital of", "")
    assert exc.value.code == "empty_completion"
    with pytest.raises(InputTooLongError) as exc:
        tokenize_query(tok, "word " * 50, " x", max_tokens=10)
    assert exc.value.http_status == 413
    q = tokenize_query(tok, "", " x")  # empty prompt: BOS is the context
    assert q.input_ids[0] == tok.bos_token_id and not q.target_mask[0]
    # Completion tokens are exactly the completion tokenized alone.
    q = tokenize_query(tok, "Alpha beta", " gamma delta")
    alone = tok(" gamma delta", add_special_tokens=False)["input_ids"]
    assert list(q.input_ids[-len(alone) :]) == alone and sum(q.target_mask) == len(alone)


def test_model_dir_without_tokenizer(tmp_path):
    from api.errors import ModelLoadError

    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as exc:
        load_tokenizer(tmp_path)
    assert exc.value.code == "missing_tokenizer"
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "nope")
