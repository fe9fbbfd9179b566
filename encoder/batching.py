"""Examples and padded batches: which tokens are context and which carry loss.

DESIGN.md: the loss of an example is the SUM of token negative log-likelihoods over its
target positions. Training sequences: every next-token position. Queries: the prompt and
the completion are tokenized separately and their ids concatenated, so the completion's
tokens are exactly those of the completion; only they are targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from api.errors import InputError, InputTooLongError


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the project uses."""

    @property
    def pad_token_id(self) -> int | None: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    def __call__(
        self, text: str, add_special_tokens: bool = ..., **kwargs: Any
    ) -> Mapping[str, Any]: ...
    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class Example:
    """One example: token ids and which of them are loss targets.

    Attributes:
        input_ids: token ids x_1..x_T.
        target_mask: target_mask[t] is True when x_t is predicted (from x_<t) and counted.
            target_mask[0] is always False.
    """

    input_ids: tuple[int, ...]
    target_mask: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target_mask):
            raise InputError("input_ids and target_mask differ in length")
        if self.target_mask and self.target_mask[0]:
            raise InputError("the first token has no context and cannot be a target")

    @property
    def n_targets(self) -> int:
        return sum(self.target_mask)


@dataclass
class TokenBatch:
    """A right-padded batch.

    Attributes:
        input_ids: [B, T] long, padded with ``pad_id``.
        attention_mask: [B, T] long, 1 on real tokens.
        target_mask: [B, T] float, 1 where the token is a loss target (0 on padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device)
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def sequence_example(input_ids: Sequence[int]) -> Example:
    """A training sequence: every next-token position is a target."""
    ids = tuple(int(i) for i in input_ids)
    return Example(ids, tuple(t > 0 for t in range(len(ids))))


def tokenize_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A query's context tokens (no special tokens); an empty prompt is the tokenizer's
    BOS token when it has one.

    Raises:
        InputError: code ``empty_prompt``: empty prompt and no BOS token.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    if not prompt_ids:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise InputError(
                "the prompt is empty and the tokenizer has no BOS token", code="empty_prompt"
            )
        prompt_ids = [int(bos)]
    return prompt_ids


def tokenize_query(
    tokenizer: Tokenizer, prompt: str, completion: str, *, max_tokens: int | None = None
) -> Example:
    """A query: prompt tokens are context, completion tokens are targets.

    Prompt and completion are tokenized separately (no special tokens) and concatenated
    (``tokenize_prompt`` for the prompt).

    Raises:
        InputError: empty completion (code ``empty_completion``), or empty prompt without a
            BOS token (code ``empty_prompt``).
        InputTooLongError: more than ``max_tokens`` tokens in total.
    """
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise InputError("the completion is empty: nothing to attribute", code="empty_completion")
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    n = len(prompt_ids) + len(completion_ids)
    if max_tokens is not None and n > max_tokens:
        raise InputTooLongError(
            f"prompt + completion is {n} tokens, the limit is {max_tokens}",
            n_tokens=n,
            limit=max_tokens,
        )
    return Example(
        tuple(prompt_ids + completion_ids),
        tuple([False] * len(prompt_ids) + [True] * len(completion_ids)),
    )


def collate(examples: Sequence[Example], pad_id: int = 0) -> TokenBatch:
    """Right-pad examples into a batch; padding is neither attended to nor a target."""
    if not examples:
        raise InputError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.float32)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attn[b, :n] = 1
        target[b, :n] = torch.tensor(e.target_mask, dtype=torch.float32)
    return TokenBatch(ids, attn, target)
