"""Tail-patch influence (Chang et al. 2024, Section 4.2): does training on a retrieved
sequence make the model more likely to say the fact?

For a query (prompt, completion) and a candidate training sequence s, take one optimizer
step on s alone from the checkpoint and measure the change in the completion's
log-probability given the prompt:

    tailpatch(q, s) = log p_{theta'}(completion | prompt) - log p_theta(completion | prompt)

g_s is the gradient of the training loss on s (mean token NLL over the sequence plus eos,
exactly what the HF Trainer minimized). The step ("adam", the default) is the Adam update
the checkpoint's optimizer would apply at its next step t+1 if s were the batch, with the
checkpoint's second moment v and step count t but the first moment reset to zero:

    m' = (1 - beta1) g_s,   v' = beta2 v + (1 - beta2) g_s^2
    theta' = theta - lr * (m' / (1 - beta1^(t+1))) / (sqrt(v' / (1 - beta2^(t+1))) + eps)

The checkpoint's momentum beta1 * m is left out because it is the same for every candidate
and would swamp the differences between them. Updating v matters: at convergence some
coordinates have v ~ 0, and dividing a fresh gradient by sqrt(v) alone takes huge steps;
with v' the step per coordinate is bounded by lr (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr.
"sgd" is theta' = theta - lr * g_s. The learning rate is a parameter of the evaluation
(see ``evaluation.run.EvalSettings``): small enough that the change stays close to linear
in lr, large enough to stand out of float32 noise.

The model is restored after every step. Candidates are grouped by sequence, so each
sequence costs one backward pass whatever the number of queries that retrieved it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from api.errors import ConfigError, OptimizerStateError
from encoder.batching import Example, collate
from encoder.optimizer_state import SecondMoments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdamHyper:
    """Adam's hyperparameters and step count at the checkpoint.

    Attributes:
        beta1, beta2: moment decay rates.
        step: number of steps taken (t).
        peak_lr: the schedule's initial (peak) learning rate, for reference.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    step: int = 0
    peak_lr: float | None = None


def read_adam_hyper(checkpoint_dir: Path) -> AdamHyper:
    """Betas, step and peak lr from a Trainer checkpoint's optimizer.pt (defaults if absent)."""
    path = Path(checkpoint_dir) / "optimizer.pt"
    if not path.is_file():
        log.warning("%s missing: Adam betas (0.9, 0.999), step 0 assumed", path)
        return AdamHyper()
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    group = sd["param_groups"][0]
    steps = [float(st["step"]) for st in sd["state"].values() if "step" in st]
    beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
    peak = group.get("initial_lr", group.get("lr"))
    return AdamHyper(
        beta1, beta2, int(max(steps, default=0)), float(peak) if peak is not None else None
    )


def completion_logprobs(
    model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 64
) -> np.ndarray:
    """Sum of log-probabilities of each example's target tokens given the tokens before.

    Args:
        model: a causal LM.
        examples: Q queries (``tokenize_query``: the completion tokens are the targets).
        pad_id: padding id.
        batch_size: examples per forward pass.
    Returns:
        [Q] float64 log p(completion | prompt).
    """
    device = next(model.parameters()).device
    out = np.zeros(len(examples), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
            token_logp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
            summed = (token_logp * batch.target_mask[:, 1:]).sum(-1).double()
            out[start : start + len(batch)] = summed.cpu().numpy()
    return out


class TailPatcher:
    """One-step tail-patch scores on a trainable copy of the checkpoint's model.

    Args:
        model: the checkpoint's model; its parameters are updated in place and restored.
        second_moments: the checkpoint's bias-corrected Adam second moments (for ``adam``).
        lr: step size (see the module docstring for how it is used).
        hyper: the checkpoint's Adam betas and step count (for ``adam``).
        optimizer: ``adam`` (gradient / (sqrt(v_hat) + eps)) or ``sgd`` (plain gradient).
        pad_id: padding id of the tokenizer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        second_moments: SecondMoments | None,
        lr: float,
        optimizer: str = "adam",
        hyper: AdamHyper | None = None,
        pad_id: int = 0,
    ) -> None:
        if lr <= 0:
            raise ConfigError(f"the tail-patch learning rate must be positive, got {lr}")
        if optimizer not in ("adam", "sgd"):
            raise ConfigError(f"tail-patch optimizer must be adam|sgd, got {optimizer!r}")
        self.model = model.eval()
        self.lr = lr
        self.optimizer = optimizer
        self.pad_id = pad_id
        self.params = {n: p for n, p in model.named_parameters()}
        for p in self.params.values():
            p.requires_grad_(True)
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        self.hyper = hyper or AdamHyper()
        self.v_raw: dict[str, torch.Tensor] = {}
        if optimizer == "adam":
            if second_moments is None:
                raise OptimizerStateError(
                    "the adam tail-patch needs the checkpoint's second moments"
                )
            missing = [n for n in self.params if n not in second_moments.v_hat]
            if missing:
                raise OptimizerStateError(
                    f"no second moments for {missing[:3]} (of {len(missing)})"
                )
            self.eps = second_moments.eps
            # Undo the bias correction: v = v_hat (1 - beta2^t).
            keep = 1.0 - self.hyper.beta2**self.hyper.step if self.hyper.step > 0 else 0.0
            self.v_raw = {
                n: second_moments.v_hat[n].to(p.device, torch.float32) * keep
                for n, p in self.params.items()
            }

    def _update(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The parameter change for one gradient (module docstring), before the minus sign."""
        if self.optimizer == "sgd":
            return self.lr * grad
        h = self.hyper
        t = h.step + 1
        m_hat = (1.0 - h.beta1) * grad / (1.0 - h.beta1**t)
        v_hat = (h.beta2 * self.v_raw[name] + (1.0 - h.beta2) * grad * grad) / (1.0 - h.beta2**t)
        return self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def _step(self, sequence: Sequence[int]) -> None:
        """theta <- theta - update(grad of the mean token NLL on one sequence)."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([list(sequence)], dtype=torch.long, device=device)
        logits = self.model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for n, g in zip(names, grads, strict=True):
                if g is None:
                    continue
                self.params[n].sub_(self._update(n, g))

    def _restore(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.original[n])

    def scores(
        self,
        queries: Sequence[Example],
        sequences: Mapping[int, Sequence[int]],
        pairs: Mapping[int, Sequence[int]],
        *,
        on_sequence: Callable[[], None] | None = None,
    ) -> dict[tuple[int, int], float]:
        """Tail-patch score of every requested (query, sequence) pair.

        Args:
            queries: Q query examples (completion tokens are targets).
            sequences: sequence id -> token ids (as trained: text tokens + eos).
            pairs: sequence id -> indices of the queries to score after a step on it.
            on_sequence: called after each sequence (progress reporting).
        Returns:
            (query index, sequence id) -> change in log p(completion | prompt), in nats.
        """
        base = completion_logprobs(self.model, queries, self.pad_id)
        out: dict[tuple[int, int], float] = {}
        for seq_id, query_idx in pairs.items():
            idx = sorted(set(query_idx))
            if idx:
                try:
                    self._step(sequences[seq_id])
                    after = completion_logprobs(self.model, [queries[i] for i in idx], self.pad_id)
                finally:
                    self._restore()
                for i, value in zip(idx, after, strict=True):
                    out[(i, seq_id)] = float(value - base[i])
            if on_sequence is not None:
                on_sequence()
        return out


def load_trainable_model(model_dir: Path, device: torch.device | str = "cpu") -> nn.Module:
    """A float32 copy of the checkpoint's model for tail-patching (eval mode: no dropout)."""
    from encoder.model_loading import load_model

    return load_model(model_dir, device=device, dtype=torch.float32)
