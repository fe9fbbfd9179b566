"""Shared fixtures: tiny models built in code, artifacts built once per session."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_gpt2(seed: int = 0, *, n_embd: int = 8, n_layer: int = 2, vocab: int = 40, dtype=torch.float32):
    """A randomly initialized, frozen GPT-2 small enough for dense references."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=32,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(dtype)
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_model():
    return tiny_gpt2()
