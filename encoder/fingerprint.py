"""The TrackStar fingerprint of an example (DESIGN.md, "The fingerprint, exactly").

    G_W   = dL/dW per example                            (hooks.py)
    G~_W  = G_W / (sqrt(v_hat_W) + eps)                  (optimizer_state.py)
    phi_W = A_W G~_W B_W^T, phi = concat_W vec(phi_W)    (projection.py)
    e     = R^-1/2 phi / ||R^-1/2 phi||                  (whitening.py)

The projection step is the family's (``encoder.families``): the default ``sketch``
CountSketches the K-FAC-whitened G~_W (basis.py, blocks.Sketched); the paper's ``gaussian``
projects by seeded Gaussian pairs A_W, B_W (projection.py).

``project`` returns phi (the statistics pass accumulates R from it); ``finalize`` whitens
and normalizes; ``encode`` does both. A corrected or sketched block forms each example's G_W
one module at a time inside the backward pass and drops it at once; an uncorrected projected
block never forms it (blocks.Factored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from api.errors import ConfigError
from encoder.basis import BasisStatistics
from encoder.batching import TokenBatch
from encoder.blocks import Block, Precision
from encoder.config import FingerprintConfig
from encoder.families import family_class
from encoder.families.base import Family
from encoder.hooks import GradientCapture, Sink, make_inputs_differentiable
from encoder.modules import TrackedModule, select_modules
from encoder.optimizer_state import DEFAULT_EPS, SecondMoments
from encoder.products import example_gradients
from encoder.projection import plan_dims
from encoder.whitening import RStatistics, Whitener

log = logging.getLogger(__name__)


def sequence_loss(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Sum over the batch of each example's summed target-token NLL (a scalar).

    Summing over examples keeps them separable: d(sum)/d(output of example b) is example
    b's own output gradient.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return (nll * batch.target_mask[:, 1:].to(nll.dtype)).sum()


class TrackStarEncoder:
    """Encodes token batches into TrackStar fingerprints.

    Args:
        model: a frozen causal LM (``encoder.model_loading.load_model``).
        config: the fingerprint configuration; ``config.projection`` names the family
            (``encoder.families``) whose state ``family`` holds: a sketch's whitening is
            fitted (``fit_basis``) or restored (``family.restore``) before encoding.
        second_moments: Adam second moments; required when ``config.correction``.
        whitener: R^-1/2 blocks; required by ``finalize`` unless ``config.hessian == "none"``.
        precision: how the products run (default ``Precision.default_for`` the model).
    """

    def __init__(
        self,
        model: nn.Module,
        config: FingerprintConfig,
        *,
        second_moments: SecondMoments | None = None,
        whitener: Whitener | None = None,
        precision: Precision | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.modules: list[TrackedModule] = select_modules(model, config)
        first = next(model.parameters())
        self.device = first.device
        self.accum_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.precision = precision or Precision.default_for(self.device, first.dtype)
        self.family: Family = family_class(config.projection)(
            config, self.modules, self.device, self.accum_dtype
        )
        self.plan = self.family.plan
        self.block_dims = plan_dims(self.modules, self.plan)
        self.dim = sum(self.block_dims)
        starts = _cumsum(self.block_dims)
        self._spans = {
            m.name: (s, s + d)
            for m, s, d in zip(self.modules, starts, self.block_dims, strict=True)
        }
        self.second_moments: SecondMoments | None = None
        self._inv_scale: dict[str, torch.Tensor] = {}
        if second_moments is not None:
            self.set_second_moments(second_moments)
        elif config.correction:
            log.debug("no second moments yet: they must be set or estimated before encoding")
        self.whitener: Whitener | None = None
        if whitener is not None:
            self.set_whitener(whitener)

    # -- state ---------------------------------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def needs_fit(self) -> bool:
        """Whether the family's state must be fitted or restored before encoding."""
        return self.family.needs_fit

    def basis_statistics(self, batches: Iterable[TokenBatch]) -> BasisStatistics:
        """C_out / C_in sums of the corrected per-example gradients over ``batches``, for
        the sketch's whitening (``encoder.basis``); one backward pass per batch."""
        if self.config.correction and self.second_moments is None:
            raise ConfigError("optimizer correction is on but no second moments were given")
        stats = BasisStatistics.empty(self.modules, self.plan)
        inv = self._inv_scale if self.config.correction else {}

        def sink(m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> None:
            if m.name not in stats.sums:
                return
            scale = inv.get(m.name)
            _, t, n_out = grads.shape
            if scale is None and stats.factors_pay(m.name, t, n_out, acts.shape[-1]):
                stats.add_factors(m.name, acts, grads)  # uncorrected: G never formed
                return
            for g in example_gradients(m, acts, grads):
                stats.add(m.name, g if scale is None else g.mul_(scale))

        for batch in batches:
            self.stream_factors(batch, sink)
            stats.count += len(batch)
        return stats

    def fit_basis(self, batches: Iterable[TokenBatch]) -> None:
        """Fit the family's state from ``batches`` (``basis_statistics``)."""
        self.family.fit(self.basis_statistics(batches))

    def set_second_moments(self, sm: SecondMoments) -> None:
        """Install second moments; precomputes 1 / (sqrt(v_hat) + eps) per module [out, in]."""
        v = sm.for_modules(self.modules)
        self._inv_scale = {
            n: (t.to(self.device, self.accum_dtype).sqrt() + sm.eps).reciprocal()
            for n, t in v.items()
        }
        self.second_moments = sm

    @property
    def low_precision_products(self) -> bool:
        """The hooks hand the model-dtype tensors to the blocks (``Precision``)."""
        return self.precision.low_precision_products

    def set_whitener(self, whitener: Whitener) -> None:
        if (
            whitener.names != self.module_names
            or [m.shape[0] for m in whitener.matrices] != self.block_dims
        ):
            raise ConfigError("the whitener's blocks do not match the tracked modules")
        self.whitener = whitener

    def new_statistics(self) -> RStatistics:
        """Empty R statistics with this encoder's blocks."""
        return RStatistics(self.module_names, self.block_dims)

    # -- encoding ------------------------------------------------------------------------
    def _backward(self, batch: TokenBatch, capture: GradientCapture) -> None:
        batch = batch.to(self.device)
        handle = make_inputs_differentiable(self.model)
        try:
            with torch.enable_grad(), capture:
                capture.set_mask(batch.attention_mask)
                loss = sequence_loss(self.model, batch)
                if loss.requires_grad:
                    loss.backward()
        finally:
            handle.remove()

    def project(self, batch: TokenBatch, sq: torch.Tensor | None = None) -> torch.Tensor:
        """phi for a batch: corrected, projected, not whitened.

        Args:
            batch: [B, T] token batch.
            sq: [B] (on the device) to which each example's squared norm of its unsketched
                blocks is added (``encoder.blocks``; the exact stage's norm where
                ``Family.exact_norms``).
        Returns:
            phi [B, d] in the accumulation dtype (float32; float64 for a float64 model).
        """
        out = torch.zeros(len(batch), self.dim, dtype=self.accum_dtype, device=self.device)

        def put(name: str, phi_w: torch.Tensor) -> None:
            start, stop = self._spans[name]
            out[:, start:stop] = phi_w

        self.stream_blocks(batch, put, sq)
        return out

    def stream_blocks(
        self,
        batch: TokenBatch,
        fn: Callable[[str, torch.Tensor], None],
        sq: torch.Tensor | None = None,
    ) -> None:
        """One backward pass calling ``fn(module name, phi_W [B, d_W])`` as each module's
        block is formed, so a caller can reduce blocks without keeping the full phi
        (``encoder.rescoring`` with correction: phi_W is the whole corrected gradient)."""
        if self.config.correction and self.second_moments is None:
            raise ConfigError("optimizer correction is on but no second moments were given")
        blocks = self._blocks()

        def sink(m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> None:
            fn(m.name, blocks[m.name](acts, grads, sq))

        accum = None if self.low_precision_products else self.accum_dtype
        self._backward(batch, GradientCapture(self.modules, sink, accum))

    def stream_factors(self, batch: TokenBatch, sink: Sink) -> None:
        """One backward pass handing each module's token factors to ``sink(module, acts
        [B, T, in], grads [B, T, out])`` in the accumulation dtype, padding zeroed: what
        every block is made from (``encoder.rescoring`` scores from them directly)."""
        self._backward(batch, GradientCapture(self.modules, sink, self.accum_dtype))

    def _blocks(self) -> dict[str, Block]:
        """Each module's block (``encoder.blocks``), from the family's state and the correction."""
        if self.family.needs_fit:
            raise ConfigError(
                "the fingerprint's whitening is not fitted yet (fit_basis, or the index's saved state)"
            )
        inv = self._inv_scale if self.config.correction else {}
        return {m.name: self.family.block(m, inv.get(m.name), self.precision) for m in self.modules}

    def weight_directions(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weight-space direction V of a fingerprint-space vector u [d]: for every
        per-example gradient G, u . phi(G) = sum_W <V_W, G_W> (phi is linear in G).

        phi_W = A (C o G) B^T gives V_W = C o (A^T U_W B), U_W the block of u as [k, k] (the
        row-major vec of phi_W); without projection V_W = C o U_W. So the derivative of a loss along V is u . phi of
        that loss's gradient: one forward-mode pass gives it for every token at once.

        Returns:
            parameter name -> V_W in the weight's stored orientation and dtype.
        """
        out, blocks = {}, self._blocks()
        for m in self.modules:
            start, stop = self._spans[m.name]
            v = blocks[m.name].direction(u[start:stop].to(self.device, self.accum_dtype))
            weight: torch.Tensor = m.module.weight  # type: ignore[assignment]
            out[m.param_name] = (v.T if m.transposed else v).to(weight.dtype).contiguous()
        return out

    def finalize(self, phi: torch.Tensor) -> torch.Tensor:
        """Whiten (unless hessian none) and unit-normalize (unless the ablation) phi [B, d].

        A zero phi (an example without targets) stays zero.
        """
        if self.config.hessian != "none":
            if self.whitener is None:
                raise ConfigError("hessian is on but no whitener was built (statistics pass)")
            phi = self.whitener.apply(phi)
        if self.config.unit_norm:
            phi = phi / phi.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(phi.dtype).tiny)
        return phi

    def encode(self, batch: TokenBatch, sq: torch.Tensor | None = None) -> torch.Tensor:
        """Fingerprints e [B, d] (float32 unless the model is float64), on the model's device;
        ``sq`` as in ``project``."""
        return self.finalize(self.project(batch, sq))

    def estimate_second_moments(self, batches: Iterable[TokenBatch]) -> SecondMoments:
        """v as the mean squared per-example gradient over the given batches (no optimizer
        state available). eps is Adam's default 1e-8."""
        sums = {
            m.name: torch.zeros(m.out_features, m.in_features, dtype=torch.float64)
            for m in self.modules
        }
        count = 0

        def sink(m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> None:
            total = torch.zeros(
                m.out_features, m.in_features, dtype=torch.float64, device=acts.device
            )
            for g in example_gradients(m, acts, grads):
                total += (g * g).sum(0).double()
            sums[m.name] += total.cpu()

        for batch in batches:
            self.stream_factors(batch, sink)
            count += len(batch)
        if count == 0:
            raise ConfigError("no sequences to estimate the second moments from")
        v_hat = {}
        for m in self.modules:
            v = (sums[m.name] / count).float()
            v_hat[m.param_name] = v.t().contiguous() if m.transposed else v
        return SecondMoments(v_hat=v_hat, eps=DEFAULT_EPS, source=f"estimated(n={count})")


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        out.append(total)
        total += x
    return out
