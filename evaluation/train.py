"""Train a tiny GPT-2 on a synthetic fact corpus, for end-to-end fact-tracing tests.

A byte-level BPE tokenizer is trained on the passages, a GPT-2 is built from a config in
code and trained with the HF Trainer and AdamW (one passage = one training sequence, eos
appended). The result is an ordinary Trainer checkpoint directory (weights, config,
tokenizer, optimizer.pt with AdamW's second moments), i.e. exactly what the encoder reads
for its optimizer correction (TrackStar, Chang et al. 2024, Section 3, step 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from encoder.batching import Tokenizer as EncoderTokenizer
from encoder.model_loading import as_tokenizer
from evaluation.corpus import FactCorpus, FactQuery

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class TrainSpec:
    """Tokenizer, model and optimization settings of one size."""

    vocab_size: int  # a cap: BPE stops once every word of the corpus is one token
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    epochs: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float = 0.05
    # Intra-op threads on CPU. Matmuls this small gain little from a second thread, and
    # OpenMP threads collapse when another process holds a core (a busy 2-core machine), so
    # tiny models use one.
    num_threads: int = 1


SPECS: dict[str, TrainSpec] = {
    "test": TrainSpec(
        vocab_size=1024,
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=128,
        epochs=40,
        batch_size=16,
        learning_rate=5e-3,
    ),
    "demo": TrainSpec(
        vocab_size=4096,
        n_layer=2,
        n_embd=128,
        n_head=4,
        n_positions=128,
        epochs=20,
        batch_size=16,
        learning_rate=3e-3,
    ),
    # A deeper model for fidelity measurements (bench_fidelity): the projection's noise
    # and the whitening's conditioning both change with depth and width.
    "deep": TrainSpec(
        vocab_size=4096,
        n_layer=6,
        n_embd=256,
        n_head=4,
        n_positions=128,
        epochs=30,
        batch_size=16,
        learning_rate=1e-3,
    ),
}


@dataclass
class TrainResult:
    """Outcome of train_fact_model.

    Attributes:
        checkpoint_dir: The final Trainer checkpoint ("checkpoint-N/").
        fact_accuracy: Share of queries whose completion greedy decoding reproduces.
        n_queries: Number of queries evaluated.
        train_seconds: Wall time of Trainer.train.
        final_loss: Mean training loss over the last logged interval (last epoch).
    """

    checkpoint_dir: Path
    fact_accuracy: float
    n_queries: int
    train_seconds: float
    final_loss: float


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer (no prefix space) on texts.

    Words keep their leading space inside the pre-token (" Tesk"), so a completion
    " Tesk" tokenized alone gives the same ids as inside a passage.
    """
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=bpe_trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_prefix_space=False,
        model_max_length=max_length,
    )


def build_model(spec: TrainSpec, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialized GPT-2 (no dropout) sized by spec."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    # The Trainer's loss: transformers derives the loss from the class name, which for
    # GPT2LMHeadModel names none, and warns on every run before using this one.
    model.loss_type = "ForCausalLM"
    return model


class _PadCollator:
    """Right-pad a batch of {"input_ids"}; labels are -100 on padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            input_ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            attention_mask[i, : len(f["input_ids"])] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _LogCallback(TrainerCallback):
    """Send the Trainer's log dicts to logging instead of stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs:
            logger.debug("step %d/%d: %s", state.global_step, state.max_steps, logs)


@contextlib.contextmanager
def _quiet_torch(n_threads: int | None, progress: bool) -> Iterator[None]:
    """Set torch's CPU threads (None: leave as is) and silence transformers' bars."""
    previous_threads = torch.get_num_threads()
    previous_bars = hf_logging.is_progress_bar_enabled()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        if previous_bars:
            hf_logging.enable_progress_bar()


def _training_arguments(
    spec: TrainSpec,
    out_dir: Path,
    n_epochs: int,
    n_passages: int,
    seed: int,
    *,
    use_cpu: bool,
    progress: bool,
) -> TrainingArguments:
    """The Trainer's arguments: AdamW with a cosine schedule, batches grouped by length, one
    checkpoint at the end."""
    steps = n_epochs * math.ceil(n_passages / spec.batch_size)
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=n_epochs,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=spec.warmup_ratio,
        weight_decay=0.0,
        optim="adamw_torch",
        train_sampling_strategy="group_by_length",  # less padding per batch
        # One checkpoint, at the end: DefaultFlowCallback saves on the last step.
        save_strategy="steps",
        save_steps=steps + 1,
        logging_strategy="steps",
        logging_steps=max(1, math.ceil(n_passages / spec.batch_size)),
        report_to=[],
        use_cpu=use_cpu,
        seed=seed,
        data_seed=seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def train_fact_model(
    corpus: FactCorpus,
    out_dir: Path,
    size: str = "test",
    seed: int = 0,
    *,
    epochs: int | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train tokenizer and GPT-2 on the corpus passages and save a Trainer checkpoint.

    Args:
        corpus: The passages to train on and the queries to score.
        out_dir: Trainer output directory; the checkpoint lands in out_dir/checkpoint-N.
        size: "test" (seconds on CPU), "demo" (minutes on CPU) or "deep" (6 x 256, minutes).
        seed: Seed of initialization and data order.
        epochs: Overrides the size's number of epochs.
        progress: Show the Trainer's tqdm progress bar.

    Returns:
        TrainResult with the checkpoint path and the measured fact accuracy.
    """
    if size not in SPECS:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SPECS)}")
    spec = SPECS[size]
    n_epochs = spec.epochs if epochs is None else epochs
    out_dir = Path(out_dir)
    use_cpu = not torch.cuda.is_available()

    set_seed(seed)
    texts = [p.text for p in corpus.passages]
    tokenizer = train_tokenizer(texts, spec.vocab_size, spec.n_positions)
    model = build_model(spec, tokenizer)
    dataset = _training_rows(tokenizer, texts, spec.n_positions - 1)
    logger.info(
        "training %s model: %d passages, vocab %d, %d parameters, %d epochs",
        size,
        len(dataset),
        len(tokenizer),
        model.num_parameters(),
        n_epochs,
    )

    args = _training_arguments(
        spec, out_dir, n_epochs, len(dataset), seed, use_cpu=use_cpu, progress=progress
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,  # type: ignore[arg-type]
        data_collator=_PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_LogCallback())

    with _quiet_torch(spec.num_threads if use_cpu else None, progress):
        start = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - start
        accuracy = fact_accuracy(model, as_tokenizer(tokenizer), corpus.queries)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final_loss = float(losses[-1]) if losses else float(output.training_loss)
    checkpoint_dir = out_dir / f"checkpoint-{trainer.state.global_step}"
    logger.info(
        "trained in %.1fs, final loss %.3f, fact accuracy %.3f (%d queries), saved %s",
        train_seconds,
        final_loss,
        accuracy,
        len(corpus.queries),
        checkpoint_dir,
    )
    return TrainResult(
        checkpoint_dir=checkpoint_dir,
        fact_accuracy=accuracy,
        n_queries=len(corpus.queries),
        train_seconds=train_seconds,
        final_loss=final_loss,
    )


def _training_rows(tokenizer: Any, texts: list[str], max_len: int) -> list[dict[str, list[int]]]:
    """One training row per passage: its tokens (truncated to ``max_len``) and EOS."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_truncated = sum(len(ids) > max_len for ids in encoded)
    if n_truncated:
        logger.warning("%d passages longer than %d tokens were truncated", n_truncated, max_len)
    return [{"input_ids": ids[:max_len] + [tokenizer.eos_token_id]} for ids in encoded]


def fact_accuracy(
    model: torch.nn.Module,
    tokenizer: EncoderTokenizer,
    queries: list[FactQuery],
    batch_size: int = 64,
) -> float:
    """Top-1 fact accuracy: the share of ``facts_learned`` (0.0 for no queries)."""
    learned = facts_learned(model, tokenizer, queries, batch_size)
    return sum(learned) / len(learned) if learned else 0.0


@torch.no_grad()
def facts_learned(
    model: torch.nn.Module,
    tokenizer: EncoderTokenizer,
    queries: list[FactQuery],
    batch_size: int = 64,
) -> list[bool]:
    """Whether greedy decoding after each query's prompt reproduces its completion (the fact
    is learned in the query's wording).

    Prompt and completion are tokenized separately and concatenated, as the encoder does.
    One teacher-forced forward pass suffices: greedy decoding yields the completion iff
    the argmax at every completion position equals the completion's next token.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    learned: list[bool] = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        prompts = [list(tokenizer(q.prompt, add_special_tokens=False)["input_ids"]) for q in batch]
        answers = [
            list(tokenizer(q.completion, add_special_tokens=False)["input_ids"]) for q in batch
        ]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            attention_mask[i, : len(p) + len(a)] = 1
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
        ).logits  # [B, T, V]
        predicted = logits.argmax(dim=-1).cpu()  # [B, T]: prediction for position t + 1
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            guess = predicted[i, len(p) - 1 : len(p) + len(a) - 1]
            learned.append(bool(torch.equal(guess, torch.tensor(a))))
    model.train(was_training)
    return learned
