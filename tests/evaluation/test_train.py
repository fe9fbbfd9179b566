"""The tiny GPT-2 trainer: a real Trainer checkpoint that memorizes the test facts.

Training happens once per session through the `trained_checkpoint` fixture (conftest).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.corpus import FactCorpus
from evaluation.train import (
    EOS_TOKEN,
    PAD_TOKEN,
    SPECS,
    TrainResult,
    build_model,
    fact_accuracy,
    train_fact_model,
)

# Measured 0.925-1.0 over seeds 0-2 at test size; a margin keeps the test stable.
MIN_TEST_ACCURACY = 0.6


@pytest.fixture(scope="module")
def loaded(trained_checkpoint: TrainResult):  # type: ignore[no-untyped-def]
    ckpt = trained_checkpoint.checkpoint_dir
    return AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)


def test_checkpoint_layout(trained_checkpoint: TrainResult) -> None:
    ckpt = trained_checkpoint.checkpoint_dir
    assert ckpt.name.startswith("checkpoint-") and int(ckpt.name.split("-")[1]) > 0
    names = {p.name for p in ckpt.iterdir()}
    expected = {
        "model.safetensors",
        "config.json",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert expected <= names
    # Only the final checkpoint is saved.
    assert [p.name for p in ckpt.parent.glob("checkpoint-*")] == [ckpt.name]


def test_model_and_tokenizer_load(trained_checkpoint: TrainResult, loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    assert model.config.model_type == "gpt2"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # No special tokens are added implicitly: training sequences are text + eos only.
    assert tokenizer("a b")["input_ids"] == tokenizer("a b", add_special_tokens=False)["input_ids"]


def test_optimizer_state_is_adamw(trained_checkpoint: TrainResult, loaded) -> None:  # type: ignore[no-untyped-def]
    model, _ = loaded
    state = torch.load(
        trained_checkpoint.checkpoint_dir / "optimizer.pt", map_location="cpu", weights_only=True
    )
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights counted once
    assert len(state["state"]) == len(params)
    assert sum(len(g["params"]) for g in state["param_groups"]) == len(params)
    assert all(g["eps"] > 0 and len(g["betas"]) == 2 for g in state["param_groups"])
    shapes = sorted(tuple(p.shape) for p in params)
    assert sorted(tuple(s["exp_avg_sq"].shape) for s in state["state"].values()) == shapes
    for s in state["state"].values():
        assert float(s["step"]) > 0
        assert bool((s["exp_avg_sq"] >= 0).all()) and float(s["exp_avg_sq"].sum()) > 0


def test_queries_tokenize_like_passages(fact_corpus: FactCorpus, loaded) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = loaded
    for q in fact_corpus.queries:
        prompt = tokenizer(q.prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer(q.completion, add_special_tokens=False)["input_ids"]
        sentence = tokenizer(q.prompt + q.completion + ".", add_special_tokens=False)["input_ids"]
        assert sentence[: len(prompt) + len(completion)] == prompt + completion


def test_memorizes_facts(trained_checkpoint: TrainResult, fact_corpus: FactCorpus, loaded) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = loaded
    assert trained_checkpoint.n_queries == len(fact_corpus.queries)
    assert trained_checkpoint.fact_accuracy >= MIN_TEST_ACCURACY
    assert math.isfinite(trained_checkpoint.final_loss) and trained_checkpoint.final_loss < 1.0
    assert trained_checkpoint.train_seconds > 0
    reloaded = fact_accuracy(model, tokenizer, fact_corpus.queries)
    assert reloaded == pytest.approx(trained_checkpoint.fact_accuracy, abs=1 / 40)


def test_untrained_model_is_at_chance(fact_corpus: FactCorpus, loaded) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = loaded
    torch.manual_seed(0)
    fresh = build_model(SPECS["test"], tokenizer)
    assert fact_accuracy(fresh, tokenizer, fact_corpus.queries) <= 0.1
    assert fact_accuracy(fresh, tokenizer, []) == 0.0


def test_unknown_size_rejected(fact_corpus: FactCorpus, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        train_fact_model(fact_corpus, tmp_path, size="huge")


def test_train_command_on_any_corpus_reports_fact_accuracy(fact_corpus_files, tmp_path, capsys):
    import json

    from evaluation.cli import TRAIN_SIZES
    from evaluation.train import SPECS
    from service.cli import main

    assert set(TRAIN_SIZES) == set(SPECS)
    corpus, queries = fact_corpus_files
    out = tmp_path / "run"
    # Two epochs learn little: the accuracy check fails with a one-line hint, exit 1.
    rc = main(
        [
            "train",
            "--corpus",
            str(corpus),
            "--queries",
            str(queries),
            "--out",
            str(out),
            "--size",
            "test",
            "--epochs",
            "2",
            "--min-accuracy",
            "0.99",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1 and "below --min-accuracy 0.99" in captured.err
    summary = json.loads((out / "train.json").read_text())
    assert summary == json.loads(captured.out)
    assert (
        0.0 <= summary["fact_accuracy"] < 0.99
        and summary["queries"] > 0
        and summary["sequences"] > 100
    )
    assert (Path(summary["checkpoint"]) / "optimizer.pt").is_file()  # ready for index build / eval
    # Bad input: a one-line message, exit 2.
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert main(["train", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def test_the_trainers_loss_is_named_so_transformers_does_not_warn(loaded) -> None:  # type: ignore[no-untyped-def]
    """GPT2LMHeadModel's class name names no loss: transformers warned `loss_type=None` on
    every training run before falling back to the causal-LM loss, which is now named."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    _, tokenizer = loaded
    model = build_model(SPECS["test"], tokenizer)
    assert model.loss_type == "ForCausalLM"
    assert model.loss_function is LOSS_MAPPING["ForCausalLM"]
