"""``influence index plan``: the memory a build and a server of a model will take, term by
term, and the arithmetic per token, from the model's transformers config alone (no weights
are read or allocated: the model is made on PyTorch's ``meta`` device).

The terms are the encoder's own arithmetic (the family's plan, its saved state, the
per-example gradient chunk, what the second stage keeps of a query; a side too long to whiten
is a scalar, never a dense identity) plus an estimate of the
activations a backward pass keeps (Korthikanti et al. 2022's 34 h + 5 a T bytes per token and
layer at 16 bits, scaled to the weights' dtype, plus the tracked modules' captured inputs and
output gradients and the float32 logits). A test checks each state term against the bytes a
real encoder holds; ``benchmarks/bench_plan.py`` checks the total against a measured peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from api.errors import ConfigError
from encoder.basis import MAX_SIDE, basis_bytes
from encoder.config import FingerprintConfig
from encoder.families import family_class
from encoder.memory import DEFAULT_FRACTION, fitting_batch, hessian_bytes, runtime_bytes
from encoder.modules import TrackedModule, select_modules
from encoder.products import CUDA_GRADIENT_BUDGET_BYTES, GRADIENT_BUDGET_BYTES
from encoder.projection import Plan, plan_dims
from encoder.rescoring import CANDIDATE_BATCH

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size like ``80GB``, ``80 GiB``, ``512M`` or ``1048576`` (binary units).

    Raises:
        ConfigError: text that is no size.
    """
    m = SIZE.match(text)
    if m is None:
        raise ConfigError(f"--memory takes a size like 80GB or 512M, got {text!r}")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Term:
    """One term of the plan: ``bytes`` held by ``phase`` (build, serve or both) on ``where``
    (device, host or disk), and what it is."""

    name: str
    phase: str
    where: str
    bytes: int
    what: str


@dataclass(frozen=True)
class MemoryPlan:
    """Every term of a build and a server of one model, and its arithmetic per token."""

    model: str
    params: int
    tracked_params: int
    dim: int
    terms: list[Term]
    flops_plain: float
    flops_encode: float
    device: str
    memory: int | None
    batch_size: int
    """Sequences per backward pass of the build."""
    candidate_batch: int
    """Candidates per backward pass of the exact second stage."""

    def total(self, phase: str, where: str = "device") -> int:
        return sum(t.bytes for t in self.terms if t.where == where and t.phase in (phase, "both"))

    def fits(self, phase: str) -> bool | None:
        """Whether ``phase``'s device terms fit ``memory`` (None: no memory given)."""
        return None if self.memory is None else self.total(phase) <= self.memory


def meta_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM a config (a model directory or its ``config.json``) describes, on the
    ``meta`` device: its modules and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {path}: no transformers config there ({exc})") from None
    with torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _family_terms(
    modules: list[TrackedModule], plan: Plan, fp: FingerprintConfig, cuda: bool
) -> list[Term]:
    """What the family keeps on the device: the sketch's hash (kept on the CPU, made at each
    use on an accelerator: its temporaries for the largest module) and whitening, or the
    pairs."""
    if fp.projection == "sketch":
        hashed = [
            m.out_features * m.in_features for m in modules if m.name in _hashed(modules, plan)
        ]
        sides = [n for m in modules for n in (m.out_features, m.in_features)]
        hash_term = Term(
            "sketch hash",
            "both",
            "device",
            9 * sum(hashed),
            "bucket (int64) and sign (int8) of every hashed weight",
        )
        if cuda:
            hash_term = Term(
                "sketch hash",
                "both",
                "device",
                32 * max(hashed, default=0),
                "made at each use: the largest module's, int64 temporaries",
            )
        if not fp.whiten:  # the plain gradient is sketched: no sides, no fit
            return [hash_term]
        return [
            hash_term,
            Term(
                "whitening",
                "both",
                "device",
                sum(4 * n * n for n in sides if n <= MAX_SIDE),
                f"float32 inverse square root of each side up to {MAX_SIDE}",
            ),
            Term(
                "whitening statistics",
                "build",
                "host",
                basis_bytes(modules, plan),
                "float64 side covariance sums of the fit",
            ),
        ]
    pairs = sum(
        4 * (sizes[0] * m.out_features + sizes[1] * m.in_features)
        for m in modules
        if (sizes := plan[m.name]) is not None
    )
    return [Term("projection pairs", "both", "device", pairs, "float32 Gaussian A, B per module")]


def _activation_bytes(
    model: torch.nn.Module,
    modules: list[TrackedModule],
    tokens: int,
    seq_len: int,
    elem: int,
) -> int:
    """What one backward pass over ``tokens`` tokens (sequences of ``seq_len``) keeps: the
    layers' saved activations (the attention probabilities too where the model's attention
    is eager; a fused kernel, sdpa's or flash's, on the CPU as on CUDA, keeps none), the
    tracked modules' captured inputs and output gradients, and the float32 logits with their
    gradient."""
    config: Any = model.config  # transformers maps these names for every architecture
    fused_attention = getattr(config, "_attn_implementation", "eager") != "eager"
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads, vocab = int(config.num_attention_heads), int(config.vocab_size)
    per_layer = (34 * hidden + (0 if fused_attention else 5 * heads * seq_len)) * elem // 2
    captured = sum(m.in_features + m.out_features for m in modules) * elem
    return tokens * (layers * per_layer + captured + 8 * vocab)


def _terms(
    model: torch.nn.Module,
    modules: list[TrackedModule],
    fp: FingerprintConfig,
    plan: Plan,
    runtime: bool = True,
    /,
    *,
    dtype: torch.dtype,
    seq_len: int,
    batch_size: int,
    sequences: int,
    device: str,
    candidate_batch: int = CANDIDATE_BATCH,
) -> list[Term]:
    """Every term at these sizes (``runtime``: with the runtime term)."""
    dim = sum(plan_dims(modules, plan))
    elem = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in model.parameters())
    tracked = sum(m.out_features * m.in_features for m in modules)
    cuda = device.startswith("cuda")
    chunk = CUDA_GRADIENT_BUDGET_BYTES if cuda else GRADIENT_BUDGET_BYTES
    build_act = _activation_bytes(model, modules, batch_size * seq_len, seq_len, elem)
    serve_act = _activation_bytes(model, modules, candidate_batch * seq_len, seq_len, elem)
    name = str(dtype).replace("torch.", "")
    terms = [
        *([_runtime_term(device)] if runtime else []),
        Term("weights", "both", "device", params * elem, f"{params:,} parameters, {name}"),
        *_family_terms(modules, plan, fp, cuda),
        Term("gradient chunk", "both", "device", 2 * chunk, "per-example gradients at once, x2"),
        Term(
            "activations",
            "build",
            "device",
            build_act,
            f"a backward pass, {batch_size} x {seq_len}",
        ),
        Term(
            "activations",
            "serve",
            "device",
            serve_act,
            f"{candidate_batch} candidates of {seq_len} tokens per pass",
        ),
        _query_term(modules, fp, seq_len, tracked),
        Term("fingerprints", "both", "disk", 2 * dim * sequences, f"float16, d = {dim:,}"),
        Term("FAISS Flat", "serve", "host", 4 * dim * sequences, "float32 vectors in RAM"),
    ]
    if family_class(fp.projection).exact_norms:
        terms.append(
            Term("exact norms", "both", "disk", 8 * sequences, "float64, one per sequence")
        )
    if fp.correction:
        terms.append(Term("correction", "both", "device", 4 * tracked, "1 / (sqrt(v_hat) + eps)"))
    if fp.hessian != "none":
        r = hessian_bytes(plan_dims(modules, plan), with_eval=fp.hessian == "mixed")
        terms.append(Term("Hessian statistics", "build", "host", r, "float64 R sums, eigh"))
    return terms


def _runtime_term(device: str) -> Term:
    """``runtime_bytes`` in RAM: the device's memory on the CPU, the host's on an accelerator."""
    where = "host" if device.startswith("cuda") else "device"
    return Term("runtime", "both", where, runtime_bytes(), "python, torch and transformers")


def _hashed(modules: list[TrackedModule], plan: Plan) -> set[str]:
    return {m.name for m in modules if plan[m.name] != (m.out_features, m.in_features)}


def _query_term(
    modules: list[TrackedModule], fp: FingerprintConfig, seq_len: int, tracked: int
) -> Term:
    """What the second stage keeps of a query: its corrected gradient (with the correction),
    else per module its whitened token factors M_out g', M_in a' or, where smaller, their
    product (``encoder.rescoring.FactorScorer``)."""
    if fp.correction:
        return Term(
            "query gradient", "serve", "device", 4 * tracked, "the second stage's float32 query"
        )
    kept = sum(  # per module its factors, or their [out, in] product where that is smaller
        min(seq_len * (m.out_features + m.in_features), m.out_features * m.in_features)
        for m in modules
    )
    return Term("query factors", "serve", "device", 4 * kept, f"float32, a {seq_len}-token query")


def build_device_terms(
    encoder_model: torch.nn.Module,
    modules: list[TrackedModule],
    fp: FingerprintConfig,
    plan: Plan,
    *,
    seq_len: int,
    batch_size: int,
    device: str,
) -> list[Term]:
    """What a build holds on its device (the preflight's check): every build or both-phase
    device term; the activations only for a fixed batch (auto batches are sized to fit); not
    the runtime, which the measured free memory has already left out."""
    dtype = next(encoder_model.parameters()).dtype
    sizes = {"seq_len": seq_len, "batch_size": max(batch_size, 1), "sequences": 0}
    terms = _terms(encoder_model, modules, fp, plan, False, dtype=dtype, device=device, **sizes)
    keep = [t for t in terms if t.where == "device" and t.phase in ("build", "both")]
    return [t for t in keep if batch_size > 0 or t.name != "activations"]


def build_plan(
    path: Path,
    fp: FingerprintConfig,
    *,
    dtype: torch.dtype,
    seq_len: int,
    batch_size: int,
    sequences: int,
    device: str,
    memory: int | None,
) -> MemoryPlan:
    """Every term of building an index of ``sequences`` sequences and of serving it.

    ``batch_size`` 0 (auto) is the batch the build's ``--batch-size auto`` takes on a device
    of ``memory`` bytes; on an accelerator of ``memory`` bytes the exact stage's candidates
    per pass are sized the same way (``encoder.memory.candidate_batch_size``).

    Raises:
        ConfigError: auto without ``memory``.
    """
    if batch_size == 0 and memory is None:
        raise ConfigError("--batch-size auto needs --memory: the device's size to fit")
    model = meta_model(path, dtype)
    modules = select_modules(model, fp)
    plan = family_class(fp.projection).plan_for(fp, modules)
    sizes = {"seq_len": seq_len, "batch_size": max(batch_size, 1), "sequences": sequences}
    one = {**sizes, "batch_size": 1, "candidate_batch": 1}
    terms = _terms(model, modules, fp, plan, dtype=dtype, device=device, **one)
    candidates = CANDIDATE_BATCH
    if memory is not None:
        build, serve = _fitted_batches(terms, memory)
        if batch_size == 0:
            sizes["batch_size"] = max(build, 1)
        if device.startswith("cuda"):
            candidates = max(min(serve, CANDIDATE_BATCH), 1)
    terms = _terms(
        model, modules, fp, plan, dtype=dtype, device=device, candidate_batch=candidates, **sizes
    )
    if batch_size == 0:
        terms = [
            replace(t, what=f"{t.what} (auto: the largest batch that fits)")
            if (t.name, t.phase) == ("activations", "build")
            else t
            for t in terms
        ]
    params = sum(p.numel() for p in model.parameters())
    tracked = sum(m.out_features * m.in_features for m in modules)
    # Per token: a plain step is ~6 flops per parameter; the encode is the frozen forward and
    # input backward (4 per parameter), each example's weight gradients (2 per tracked weight),
    # and, with --whiten, the sketch's whitening of the per-token factors (2 (out^2 + in^2)
    # per module).
    whiten = sum(2 * (m.out_features**2 + m.in_features**2) for m in modules)
    return MemoryPlan(
        model=str(path),
        params=params,
        tracked_params=tracked,
        dim=sum(plan_dims(modules, plan)),
        terms=terms,
        flops_plain=6.0 * params,
        flops_encode=4.0 * params + 2.0 * tracked + (whiten if fp.whiten else 0),
        device=device,
        memory=memory,
        batch_size=sizes["batch_size"],
        candidate_batch=candidates,
    )


def _fitted_batches(terms: list[Term], memory: int) -> tuple[int, int]:
    """The build's batch and the exact stage's candidates per pass that fit ``memory`` by
    ``encoder.memory.auto_batch_size``'s rule, from ``terms`` made at one of each: what stays
    resident (weights, the family's state, the query's factors) leaves the free memory, of
    which ``DEFAULT_FRACTION`` holds the pass (its gradient chunk, then its activations)."""

    def device(phase: str, name: str) -> int:
        return sum(
            t.bytes
            for t in terms
            if t.where == "device" and t.phase in (phase, "both") and t.name == name
        )

    batches = []
    for phase in ("build", "serve"):
        per, chunk = device(phase, "activations"), device(phase, "gradient chunk")
        resident = sum(  # every other device term of the phase
            t.bytes for t in terms if t.where == "device" and t.phase in (phase, "both")
        ) - (per + chunk)
        batches.append(fitting_batch(DEFAULT_FRACTION * (memory - resident), chunk, per, 256))
    return batches[0], batches[1]


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def plan_lines(p: MemoryPlan) -> list[str]:
    """The plan as ``influence index plan`` prints it."""
    lines = [
        f"model: {p.model}: {p.params:,} parameters, {p.tracked_params:,} tracked; d = {p.dim:,}"
    ]
    lines.append(f"{'term':<22} {'phase':<6} {'where':<7} {'size':>13}  what")
    for t in p.terms:
        lines.append(f"{t.name:<22} {t.phase:<6} {t.where:<7} {_gib(t.bytes):>13}  {t.what}")
    for phase in ("build", "serve"):
        total = p.total(phase)
        verdict = {None: "", True: " (fits)", False: " (does NOT fit)"}[p.fits(phase)]
        memory = "" if p.memory is None else f" of {_gib(p.memory)}"
        lines.append(
            f"{phase} on the {p.device}: {_gib(total)}{memory}{verdict}; host {_gib(p.total(phase, 'host'))}"
        )
    ratio = p.flops_encode / p.flops_plain
    lines.append(
        f"flops per token: plain training step {p.flops_plain:.3g}, encode {p.flops_encode:.3g} ({ratio:.2f}x)"
    )
    return lines
