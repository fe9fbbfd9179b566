"""Tail-patch on the trained test model: a step on a passage that states the fact makes the
model more likely to say it; a step on random passages does not, on average."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from api.errors import ConfigError
from encoder.batching import tokenize_query
from encoder.model_loading import load_tokenizer
from encoder.optimizer_state import load_second_moments
from evaluation.inputs import training_sequences
from evaluation.tailpatch import (
    TailPatcher,
    completion_logprobs,
    load_trainable_model,
    read_adam_hyper,
)

N_QUERIES = 12


@pytest.fixture(scope="module")
def setup(trained_checkpoint, fact_corpus):
    ckpt = trained_checkpoint.checkpoint_dir
    tokenizer = load_tokenizer(ckpt)
    model = load_trainable_model(ckpt)
    texts = [p.text for p in fact_corpus.passages]
    sequences = dict(enumerate(training_sequences(tokenizer, texts, model.config.n_positions)))
    queries = fact_corpus.queries[:N_QUERIES]
    examples = [tokenize_query(tokenizer, q.prompt, q.completion) for q in queries]
    row_of = {p.id: i for i, p in enumerate(fact_corpus.passages)}
    # The passage that opens with the query's own statement (canonical template).
    canonical = [
        next(
            row_of[r]
            for r in q.relevant_ids
            if texts[row_of[r]].startswith(q.prompt + q.completion)
        )
        for q in queries
    ]
    # One intra-op thread: OpenMP threads collapse on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ckpt, tokenizer, model, sequences, examples, canonical
    torch.set_num_threads(threads)


def test_stating_passage_raises_the_completion_and_random_does_not(setup):
    ckpt, tokenizer, model, sequences, examples, canonical = setup
    patcher = TailPatcher(
        model,
        second_moments=load_second_moments(ckpt, model),
        lr=1e-4,
        hyper=read_adam_hyper(ckpt),
        pad_id=tokenizer.pad_token_id,
    )
    before = completion_logprobs(model, examples, tokenizer.pad_token_id)
    pairs: dict[int, list[int]] = {}
    for qi, sid in enumerate(canonical):
        pairs.setdefault(sid, []).append(qi)
    stating = patcher.scores(examples, sequences, pairs)
    rng = np.random.default_rng(0)
    stated = set(canonical)
    others = [s for s in sequences if s not in stated]
    random_pairs: dict[int, list[int]] = {}
    for qi in range(len(examples)):
        for sid in rng.choice(others, 3, replace=False).tolist():
            random_pairs.setdefault(sid, []).append(qi)
    random = patcher.scores(examples, sequences, random_pairs)

    values = np.array([stating[(qi, sid)] for qi, sid in enumerate(canonical)])
    assert values.mean() > 0
    assert (values > 0).mean() >= 0.75
    assert values.mean() > 5 * abs(np.mean(list(random.values())))
    # The model is restored after every step.
    np.testing.assert_array_equal(
        completion_logprobs(model, examples, tokenizer.pad_token_id), before
    )  # bit for bit


def test_sgd_step_also_positive_and_lr_validated(setup):
    ckpt, tokenizer, model, sequences, examples, canonical = setup
    patcher = TailPatcher(
        model, second_moments=None, lr=1e-2, optimizer="sgd", pad_id=tokenizer.pad_token_id
    )
    scores = patcher.scores(examples, sequences, {sid: [qi] for qi, sid in enumerate(canonical)})
    assert np.mean(list(scores.values())) > 0
    with pytest.raises(ConfigError):
        TailPatcher(model, second_moments=None, lr=0.0, optimizer="sgd")
    with pytest.raises(ConfigError):
        TailPatcher(model, second_moments=None, lr=1e-3, optimizer="lion")


def test_adam_hyperparameters_come_from_the_checkpoint(setup):
    ckpt = setup[0]
    hyper = read_adam_hyper(ckpt)
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert hyper.step == int(next(iter(state["state"].values()))["step"]) > 0
    assert (hyper.beta1, hyper.beta2) == tuple(state["param_groups"][0]["betas"])
