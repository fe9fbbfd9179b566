"""The exact second stage of a search: re-score a query's candidates without projection noise.

The first stage ranks by e_q . e_t, whose random projection decides much of a small-d
top-10 (``benchmarks/bench_fidelity.py``). The second stage scores the query against each of
its top-C candidates by their unprojected gradients:

    s(q, t) = sum_W <X_q,W, X_t,W> / (||X_q|| ||X_t||)     (unit norm; the dot without)

with X_W = G~_W = G_W / (sqrt(v_hat) + eps) (the paper's configuration with k = 0, hessian
none: the re-ranked top-10 equals that configuration's whenever its members are among the C
candidates), or, for a family that whitens before projecting (the sketch), X_W = W_out G~_W
W_in (``Family.whitening``, saved with the index): the score its projection estimates. No
projected R: it lives in the projected space.

Without the optimizer correction, G_W = sum_t g_t a_t^T over the tokens and

    <W_out G_q W_in, W_out G_t W_in> = sum_{s,t} (g'_s^T M_out g_t) (a'_s^T M_in a_t),

M = W^2, so ``FactorScorer`` keeps the query's M_out g'_s and M_in a'_s and scores a candidate
from its own token factors (``TrackStarEncoder.stream_factors``): T T' (out + in) per module,
no [out, in] tensor of the query or of a candidate, no whitening of a candidate. A candidate's
norm comes from the index (the build's ``Family.exact_norms``) or from its whitened factors'
Gram matrices. With the correction (elementwise on G_W) ``GradientScorer`` forms each
candidate's corrected gradient one module at a time inside the backward pass and dots it
with the query's (one full-size query gradient).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch
from torch import nn

from api.errors import ConfigError
from encoder.basis import Pairs
from encoder.batching import Example, collate
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.memory import candidate_batch_size
from encoder.modules import TrackedModule
from encoder.optimizer_state import SecondMoments
from encoder.products import thin

CANDIDATE_BATCH = 8
"""Candidates per backward pass, at most (``ExactRescorer.candidate_batch``: fewer where the
device's memory holds fewer)."""


def exact_config(config: FingerprintConfig) -> FingerprintConfig:
    """The unprojected, unwhitened configuration the second stage scores with."""
    return replace(config, k=0, hessian="none")


class ExactRescorer:
    """Scores candidates against a query by their unprojected (whitened) corrected gradients.

    Args:
        model: the frozen model of the index.
        config: the index's fingerprint configuration (correction and unit norm apply).
        second_moments: the index's second moments (when ``config.correction``).
        whitening: the index's whitening (``Family.whitening``); required by a family that
            whitens.
        candidate_batch: candidates per backward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        config: FingerprintConfig,
        second_moments: SecondMoments | None,
        whitening: Pairs | None = None,
        candidate_batch: int = CANDIDATE_BATCH,
    ) -> None:
        if candidate_batch < 1:
            raise ConfigError(f"candidate_batch must be >= 1, got {candidate_batch}")
        self.candidate_batch = candidate_batch
        self.unit_norm = config.unit_norm
        self.correction = config.correction
        self.encoder = TrackStarEncoder(
            model,
            exact_config(config),
            second_moments=second_moments if config.correction else None,
        )
        if whitening is not None:
            self.encoder.family.set_whitening(whitening)
        if self.encoder.needs_fit:
            raise ConfigError(f"the exact stage of a {config.projection} index needs its whitening")
        pairs, enc = self.encoder.family.whitening(), self.encoder
        self.sides: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {
            m.name: None for m in enc.modules
        }
        for name, (w_out, w_in) in (pairs or {}).items():
            self.sides[name] = (
                w_out.to(enc.device, enc.accum_dtype),
                w_in.to(enc.device, enc.accum_dtype),
            )

    @classmethod
    def of(cls, encoder: TrackStarEncoder, seq_len: int) -> ExactRescorer:
        """The exact stage of an index's ``encoder`` (its model, configuration, second
        moments and whitening), taking as many candidates of ``seq_len`` tokens per pass as
        the device holds (``encoder.memory.candidate_batch_size``)."""
        return cls(
            encoder.model,
            encoder.config,
            encoder.second_moments,
            encoder.family.whitening(),
            candidate_batch_size(encoder, seq_len, CANDIDATE_BATCH),
        )

    def scores(
        self,
        query: Example,
        candidates: Sequence[Example],
        pad_id: int,
        sq: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """s(query, candidate) for each candidate; [C] float64 on the CPU (``sq``: their
        known squared norms, as ``QueryScorer.__call__``)."""
        return self.for_query(query, pad_id)(candidates, sq)

    def for_query(self, query: Example, pad_id: int) -> QueryScorer:
        """A scorer of candidates against ``query`` whose side is computed once, here, so
        that candidates can be scored a chunk at a time (the certified second stage)."""
        if self.correction:
            return GradientScorer(self, query, pad_id)
        return FactorScorer(self, query, pad_id)


Hold = Callable[[], AbstractContextManager[object]]


class QueryScorer(ABC):
    """Scores candidates against one query (``ExactRescorer.for_query``)."""

    def __init__(self, rescorer: ExactRescorer, query: Example, pad_id: int) -> None:
        self.rescorer = rescorer
        self.pad_id = pad_id
        self.q_norm = self._prepare(query) ** 0.5

    @abstractmethod
    def _prepare(self, query: Example) -> float:
        """Keep what scoring needs of the query; its squared norm."""

    @abstractmethod
    def _stream(self, batch: Sequence[Example], sink: Callable[..., None]) -> None:
        """One backward pass over ``batch`` calling ``sink(*per-module arguments)``."""

    @abstractmethod
    def _dot(self, rows: torch.Tensor | None, *args: object) -> torch.Tensor:
        """<query, candidate> of one module for the batch rows ``rows`` (None: all) from a
        sink's arguments; [rows] float64 on the CPU."""

    @abstractmethod
    def _sq(self, *args: object) -> torch.Tensor:
        """||candidate||^2 of one module for every batch row; [b] float64 on the CPU."""

    def __call__(
        self, candidates: Sequence[Example], sq: torch.Tensor | None = None
    ) -> torch.Tensor:
        """s(query, candidate) for each candidate; [C] float64 on the CPU. ``sq``: the
        candidates' squared norms where the index stores them (not recomputed then)."""
        dots, own = self.dots(candidates, need_sq=sq is None and self.rescorer.unit_norm)
        return self.scores(dots, own if sq is None else sq.double())

    def scores(self, dots: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        """The candidates' scores from their dots with the query and squared norms (unused
        without unit norm): cosines, or the dots themselves; [C] float64."""
        if not self.rescorer.unit_norm:
            return dots
        tiny = torch.finfo(torch.float64).tiny
        cosines: torch.Tensor = dots / (sq.sqrt() * self.q_norm).clamp_min(tiny)
        return cosines

    def token_contributions(
        self, sequence: Example, hold: Hold = nullcontext
    ) -> tuple[torch.Tensor, float]:
        """The exact score of ``sequence`` split over its target tokens' loss terms.

        The gradient is linear in the loss terms, so the sequence scored once per target
        token with only that token's loss gives dots that sum to the whole sequence's dot;
        divided by the query's and the whole sequence's norms (unit norm) they sum to its
        score. One candidate pass per target token; ``hold()`` is entered around each
        backward pass (the caller's model lock, so other work runs in between).

        Returns:
            [T] float64 contributions (0 where a token is no target) and the score: their sum,
            which equals the whole sequence's score up to float32 rounding of the passes.
        """
        targets = [t for t, on in enumerate(sequence.target_mask) if on]
        alone = [
            Example(sequence.input_ids, tuple(i == t for i in range(len(sequence.input_ids))))
            for t in targets
        ]
        dots, sq = self.dots([*alone, sequence], hold)  # the last: the whole sequence
        scale = 1.0
        if self.rescorer.unit_norm:
            scale = 1.0 / max(float(sq[-1].sqrt()) * self.q_norm, torch.finfo(torch.float64).tiny)
        contributions = torch.zeros(len(sequence.input_ids), dtype=torch.float64)
        contributions[targets] = dots[: len(targets)] * scale
        # Their sum is the score (the whole pass's own dot differs by float32 rounding only).
        return contributions, float(contributions.sum())

    def dots(
        self, candidates: Sequence[Example], hold: Hold = nullcontext, need_sq: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """<q, candidate> and (with ``need_sq``; zeros without) ||candidate||^2 of each
        candidate; [C] float64 (``passes``)."""
        wanted = [torch.ones(len(candidates), dtype=torch.bool)]
        dots, sq = passes([self], candidates, wanted, hold, need_sq)
        return dots[0], sq


def passes(
    scorers: Sequence[QueryScorer],
    candidates: Sequence[Example],
    wanted: Sequence[torch.Tensor],
    hold: Hold = nullcontext,
    need_sq: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of candidates for several queries of one rescorer from one backward pass per
    batch: query k's dot is formed only for the candidates ``wanted[k]`` ([C] bool) asks.

    Candidates run the rescorer's ``candidate_batch`` per pass, longest first (a batch pads to
    its own longest member); ``hold()`` is entered around each pass.

    Returns:
        dots [K, C] float64 (0 where not wanted) and, with ``need_sq``, ||candidate||^2 [C]
        (zeros without).
    """
    dots = torch.zeros(len(scorers), len(candidates), dtype=torch.float64)
    sq = torch.zeros(len(candidates), dtype=torch.float64)
    order = sorted(range(len(candidates)), key=lambda i: (-len(candidates[i].input_ids), i))
    step = scorers[0].rescorer.candidate_batch if scorers else CANDIDATE_BATCH
    for s in range(0, len(order), step):
        rows = torch.tensor(order[s : s + step])
        subsets: list[tuple[int, torch.Tensor | None]] = []
        for k, want in enumerate(wanted):
            sub = torch.nonzero(want[rows]).flatten()
            if len(sub):
                subsets.append((k, None if len(sub) == len(rows) else sub))
        if not subsets and not need_sq:
            continue
        part = torch.zeros(len(scorers), len(rows), dtype=torch.float64)
        part_sq = torch.zeros(len(rows), dtype=torch.float64)

        def sink(
            *args: object,
            subsets: list[tuple[int, torch.Tensor | None]] = subsets,
            part: torch.Tensor = part,
            part_sq: torch.Tensor = part_sq,
        ) -> None:
            for k, sub in subsets:
                part[k, slice(None) if sub is None else sub] += scorers[k]._dot(sub, *args)
            if need_sq:
                part_sq.add_(scorers[0]._sq(*args))

        with hold():
            scorers[0]._stream([candidates[i] for i in rows], sink)
        dots[:, rows] = part
        sq[rows] = part_sq
    return dots, sq


class FactorScorer(QueryScorer):
    """The uncorrected exact stage from token factors (the module docstring). Per module the
    query keeps M_out g'_s [T', out] and M_in a'_s [T', in], or, where that is more than the
    module's size (a query longer than out in / (out + in) tokens), their product
    H = sum_s M_out g'_s (M_in a'_s)^T [out, in], which scores a candidate as
    sum_t g_t^T H a_t: the cheaper of T T' (out + in) and T out in per candidate, and never
    more than T' (out + in) floats kept."""

    def _prepare(self, query: Example) -> float:
        self.q_factors: dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}
        total = 0.0

        def keep(m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> None:
            nonlocal total
            x, y = self._whitened(m, acts[0], grads[0])
            total += float(((x @ x.T) * (y @ y.T)).double().sum())
            w_out, w_in = self._sides(m)
            p, q = _apply(w_out, x), _apply(w_in, y)
            wide = p.shape[0] * (m.out_features + m.in_features) > m.out_features * m.in_features
            self.q_factors[m.name] = p.T @ q if wide else (p, q)

        encoder = self.rescorer.encoder
        encoder.stream_factors(collate([query], self.pad_id), keep)
        return total

    def _sides(self, m: TrackedModule) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pair = self.rescorer.sides[m.name]
        return (None, None) if pair is None else pair

    def _whitened(
        self, m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_out g_t, W_in a_t) over the last axis of grads and acts."""
        w_out, w_in = self._sides(m)
        return _apply(w_out, grads), _apply(w_in, acts)

    def _stream(self, batch: Sequence[Example], sink: Callable[..., None]) -> None:
        self.rescorer.encoder.stream_factors(collate(list(batch), self.pad_id), sink)

    def _dot(self, rows: torch.Tensor | None, *args: object) -> torch.Tensor:
        m, acts, grads = args
        assert isinstance(m, TrackedModule)
        assert isinstance(acts, torch.Tensor) and isinstance(grads, torch.Tensor)
        if rows is not None:
            acts, grads = acts[rows], grads[rows]
        kept = self.q_factors[m.name]
        if isinstance(kept, torch.Tensor):  # H [out, in]
            dot = ((grads @ kept) * acts).sum((1, 2))
        else:
            p, q = kept
            dot = ((grads @ p.T) * (acts @ q.T)).sum((1, 2))
        return dot.double().cpu()

    def _sq(self, *args: object) -> torch.Tensor:
        m, acts, grads = args
        assert isinstance(m, TrackedModule)
        assert isinstance(acts, torch.Tensor) and isinstance(grads, torch.Tensor)
        x, y = self._whitened(m, acts, grads)
        gram = (x @ x.transpose(1, 2)) * (y @ y.transpose(1, 2))
        return gram.sum((1, 2)).double().cpu()


def _apply(w: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x w over the last axis for a symmetric side w (x W^T = x W), the [1] scale s of s I, or
    None (no whitening)."""
    return x if w is None else thin(x, w)


class GradientScorer(QueryScorer):
    """The corrected exact stage: the query's per-module corrected (whitened) gradient blocks
    are kept (one full-size gradient); each candidate's are formed and dotted in the pass."""

    def _prepare(self, query: Example) -> float:
        self.q_blocks: dict[str, torch.Tensor] = {}
        self.rescorer.encoder.stream_blocks(
            collate([query], self.pad_id), lambda name, g: self.q_blocks.__setitem__(name, g[0])
        )
        return sum(float(b.double().square().sum()) for b in self.q_blocks.values())

    def _stream(self, batch: Sequence[Example], sink: Callable[..., None]) -> None:
        self.rescorer.encoder.stream_blocks(collate(list(batch), self.pad_id), sink)

    def _dot(self, rows: torch.Tensor | None, *args: object) -> torch.Tensor:
        # Per module in the gradient's own dtype (no float64 copy of a [B, out*in] block),
        # summed over modules in float64.
        name, g = args
        assert isinstance(name, str) and isinstance(g, torch.Tensor)
        dot: torch.Tensor = (g if rows is None else g[rows]) @ self.q_blocks[name]
        return dot.double().cpu()

    def _sq(self, *args: object) -> torch.Tensor:
        _, g = args
        assert isinstance(g, torch.Tensor)
        norms: torch.Tensor = torch.linalg.vector_norm(g, dim=1)
        return norms.double().square().cpu()
