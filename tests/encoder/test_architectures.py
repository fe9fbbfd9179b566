"""Every supported architecture on the exact path against the torch.func reference: tiny
configs built in code (random weights, float64), k = 0, no correction, no Hessian, so phi is
vec(dL/dW) of every tracked linear map and must equal the reference per example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from encoder.batching import Example, collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from tests.encoder import reference as ref
from tests.tolerances import unit_roundoff

COMMON = dict(vocab_size=48, bos_token_id=0, eos_token_id=0, pad_token_id=0)
DECODER = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=64,
)
ARCHITECTURES = {
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
    "gpt_neox": ("GPTNeoXConfig", dict(DECODER, hidden_dropout=0.0, attention_dropout=0.0)),
    "llama": ("LlamaConfig", dict(DECODER, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", dict(DECODER, num_key_value_heads=1)),
    "mistral": ("MistralConfig", dict(DECODER, num_key_value_heads=1, sliding_window=None)),
    "gemma2": ("Gemma2Config", dict(DECODER, num_key_value_heads=1, head_dim=8, sliding_window=16)),
    "olmo2": ("Olmo2Config", dict(DECODER, num_key_value_heads=1)),
    "phi3": (
        "Phi3Config",
        dict(
            DECODER, num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
}


def tiny_model(name: str) -> torch.nn.Module:
    config_class, kwargs = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**COMMON, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(torch.float64).eval().requires_grad_(False)


def _examples() -> list[Example]:
    g = torch.Generator().manual_seed(5)
    lengths = [7, 4, 9]  # uneven: the batch is right-padded
    return [sequence_example(torch.randint(1, 48, (n,), generator=g).tolist()) for n in lengths]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_exact_fingerprints_match_reference(name):
    model = tiny_model(name)
    enc = TrackStarEncoder(
        model, FingerprintConfig(k=0, correction=False, hessian="none", projection="gaussian")
    )
    assert len(enc.modules) >= 8, [m.name for m in enc.modules]  # attention + MLP maps of 2 blocks
    examples = _examples()
    phi = enc.project(collate(examples, pad_id=0)).numpy()
    want = np.stack([ref.reference_phi(model, enc.modules, ex, k=0, seed=0) for ex in examples])
    # transformers computes softmax (and RMSNorm) in float32 whatever the weights' dtype, so
    # the two sides (a padded batch, one example alone) round there differently: a relative
    # u32 per rounding, chained through 2 blocks forward and backward (~16 stages, x4 margin).
    tol = 64 * unit_roundoff(np.float32) * np.abs(want).max()
    err = np.abs(phi - want).max()
    assert err <= tol, f"{name}: max |phi - reference| {err:.3g} > {tol:.3g}"
    assert np.abs(want).max() > 0
