"""Generate-and-trace: the model's own continuation of a prompt, and the part of a
completion a query traces.

The paper's released tool shows influential examples for the model's own generations; here
the generated token ids themselves are traced (never a re-tokenization of their text, which
for byte-level BPE can differ from what the model emitted).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from api.errors import InputError
from encoder.batching import Example, Tokenizer


@dataclass(frozen=True)
class Generation:
    """How to continue a prompt: at most ``max_new_tokens`` tokens, greedy when
    ``temperature`` is 0, else sampled at that temperature (full vocabulary, no top-k /
    top-p) from a generator seeded with ``seed`` (a fresh random seed when None)."""

    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class Generated:
    """A continuation: its token ids (the end-of-sequence token excluded), why it stopped
    (``eos`` or ``length``), the seed it was sampled with (None for greedy) and the prompt
    it continued."""

    ids: tuple[int, ...]
    finish_reason: str
    seed: int | None
    prompt_ids: tuple[int, ...]


class StableTemperature(LogitsProcessor):
    """Sampling temperature that no positive value can break: ``(s - max s) / T`` in
    float64. The best token scores exactly 0 and the rest are <= 0 (or -inf), so softmax
    never sees inf - inf; transformers' own warper divides first, and a temperature such
    as 1e-44 (or one below float32's range, which rounds to 0) overflows to NaN."""

    def __init__(self, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        wide = scores.double()
        scaled = (wide - wide.amax(dim=-1, keepdim=True)) / self.temperature
        return scaled.to(scores.dtype)  # type: ignore[return-value]


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    options: Generation,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
) -> Generated:
    """The model's continuation of ``prompt_ids`` (``model.generate``, one sequence, no
    padding, so greedy decoding is exactly what the model would say alone).

    The global torch RNG is left as it was: sampling runs under ``torch.random.fork_rng``.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    sample = options.temperature > 0
    seed = (options.seed if options.seed is not None else secrets.randbits(32)) if sample else None
    # Explicit values for every sampling knob, so that a model's generation_config cannot
    # add top-k / top-p filtering or its own temperature (or warn that greedy decoding
    # ignores them); the temperature itself is StableTemperature's.
    knobs: dict[str, float | None]
    if sample:
        knobs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        processors = LogitsProcessorList([StableTemperature(options.temperature)])
    else:
        knobs = {"temperature": None, "top_k": None, "top_p": None}
        processors = LogitsProcessorList()
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(  # type: ignore[operator]  # transformers' GenerationMixin
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=options.max_new_tokens,
            do_sample=sample,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            logits_processor=processors,
            **knobs,
        )
    new = [int(t) for t in out[0, ids.shape[1] :].tolist()]
    if eos_token_id is not None and eos_token_id in new:
        return Generated(tuple(new[: new.index(eos_token_id)]), "eos", seed, tuple(prompt_ids))
    return Generated(tuple(new), "length", seed, tuple(prompt_ids))


def token_spans(tokenizer: Tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character range of each of ``ids`` in ``text``, the text they spell.

    A fast tokenizer's offsets when re-tokenizing ``text`` gives back ``ids``; otherwise
    the lengths of the decoded prefixes (kept monotone and within ``text``: a prefix that
    ends inside a multi-byte character decodes to a replacement character).
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            return [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(len(ids)):
        end = min(
            len(text),
            max(
                start, len(tokenizer.decode(list(ids[: i + 1]), clean_up_tokenization_spaces=False))
            ),
        )
        spans.append((start, end))
        start = end
    return spans


def traced_example(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    spans: Sequence[tuple[int, int]],
    span: tuple[int, int] | None,
) -> tuple[Example, tuple[int, int]]:
    """The query that traces the completion tokens overlapping the character range
    ``span`` (all of them when None): earlier completion tokens become context, later ones
    are dropped (a causal model's earlier losses do not see them).

    Returns:
        the example, and the traced range snapped outward to token boundaries.
    Raises:
        InputError: code ``invalid_span``: the range, cut at the completion's end, is empty
            or covers no token.
    """
    n = len(completion_ids)
    if span is None:
        hit = list(range(n))
    else:
        length = max((e for _, e in spans), default=0)
        start, end = span[0], min(span[1], length)  # an end past the completion's: to its end
        if not 0 <= start < end:
            raise InputError(
                f"span [{span[0]}, {span[1]}) holds none of the completion's {length} characters",
                code="invalid_span",
                field="span",
                length=length,
            )
        hit = [i for i, (s, e) in enumerate(spans) if s < end and e > start]
        if not hit:
            raise InputError(
                f"span [{start}, {end}) covers no completion token",
                code="invalid_span",
                field="span",
            )
    first, last = hit[0], hit[-1]
    ids = tuple(prompt_ids) + tuple(completion_ids[: last + 1])
    mask = (False,) * (len(prompt_ids) + first) + (True,) * (last + 1 - first)
    snapped = (spans[first][0], spans[last][1]) if spans else (0, 0)
    return Example(ids, mask), snapped
