"""The TrackStar fingerprint of an example (DESIGN.md, "The fingerprint, exactly").

    G_W   = dL/dW per example                            (hooks.py)
    G~_W  = G_W / (sqrt(v_hat_W) + eps)                  (optimizer_state.py)
    phi_W = A_W G~_W B_W^T, phi = concat_W vec(phi_W)    (projection.py)
    e     = R^-1/2 phi / ||R^-1/2 phi||                  (whitening.py)

A_W, B_W are seeded Gaussians (projection.py), a fitted Kronecker eigenbasis or Gaussians times
the K-FAC whitening (basis.py: pca, kfac); ``sketch`` CountSketches the K-FAC-whitened G~_W
instead (blocks.Sketched).

``project`` returns phi (the statistics pass accumulates R from it); ``finalize`` whitens
and normalizes; ``encode`` does both. The exact path forms each example's G_W one module at
a time inside the backward pass and drops it at once; the factored path never forms it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from encoder.basis import BasisStatistics, Pairs, kfac_pairs, whole_side
from encoder.batching import TokenBatch
from encoder.blocks import Block, Exact, Factored, Precision, Sketched
from encoder.config import FingerprintConfig
from encoder.errors import ConfigError
from encoder.factored import fold_projections, rank1_correction
from encoder.hooks import GradientCapture, make_inputs_differentiable
from encoder.modules import TrackedModule, select_modules
from encoder.optimizer_state import DEFAULT_EPS, SecondMoments
from encoder.products import (
    example_gradients,
)
from encoder.projection import make_projections, plan_dims, plan_projection, sketch_hash
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
        config: the fingerprint configuration.
        second_moments: Adam second moments; required when ``config.correction``.
        whitener: R^-1/2 blocks; required by ``finalize`` unless ``config.hessian == "none"``.
        projections: fitted pairs (``config.projection`` pca or kfac, saved with the index);
            else ``fit_basis`` or ``set_projections`` before encoding.
        precision: how the products run (default ``Precision.default_for`` the model).
    """

    def __init__(
        self,
        model: nn.Module,
        config: FingerprintConfig,
        *,
        second_moments: SecondMoments | None = None,
        whitener: Whitener | None = None,
        projections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        precision: Precision | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.modules: list[TrackedModule] = select_modules(model, config)
        self.plan = plan_projection(self.modules, k=config.k, budget=config.budget, max_block=config.block_cap)
        if config.projection in WHITENED:  # a module stored exactly is still whitened: a square pair
            self.plan = {m.name: self.plan[m.name] or (m.out_features, m.in_features) for m in self.modules}
        self.block_dims = plan_dims(self.modules, self.plan)
        self.dim = sum(self.block_dims)
        starts = _cumsum(self.block_dims)
        self._spans = {
            m.name: (s, s + d) for m, s, d in zip(self.modules, starts, self.block_dims, strict=True)
        }
        first = next(model.parameters())
        self.device = first.device
        self.accum_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.precision = precision or Precision.default_for(self.device, first.dtype)
        self._blocks: dict[str, Block] = {}
        self._proj: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.second_moments: SecondMoments | None = None
        self._inv_scale: dict[str, torch.Tensor] = {}
        self._folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kfac_roots: Pairs | None = None  # kfac: the whitening the pairs fold in; sketch: its own
        self._hash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # sketch: (idx, sign) per module
        if config.projection == "sketch":
            self._hash = {m.name: tuple(t.to(self.device) for t in sketch_hash(config.seed, m, d))  # type: ignore[misc]
                          for m, d in zip(self.modules, self.block_dims, strict=True) if not self._whole(m)}  # fmt: skip
        if config.projection == "gaussian":
            self.set_projections(make_projections(config.seed, self.modules, self.plan))
        elif projections is not None:
            self.set_projections(projections)
        if second_moments is not None:
            self.set_second_moments(second_moments)
        elif config.correction:
            log.debug("no second moments yet: they must be set or estimated before encoding")
        self.whitener: Whitener | None = None
        if whitener is not None:
            self.set_whitener(whitener)
        self._choose_blocks()

    # -- state ---------------------------------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    def projections(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The projection matrices (float32, CPU) by module name, for saving."""
        return {n: (a.float().cpu(), b.float().cpu()) for n, (a, b) in self._proj.items()}

    @property
    def needs_basis(self) -> bool:
        """Whether modules are projected by a fitted basis that is not set yet."""
        return not self._proj and any(sizes is not None for sizes in self.plan.values())

    def _whole(self, m: TrackedModule) -> bool:
        """Whether the plan keeps module ``m`` whole on both sides (no projection noise)."""
        return self.plan[m.name] == (m.out_features, m.in_features)

    def set_projections(self, projections: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Install the (A, B) pair of every projected module (checked against the plan);
        ``projection: sketch``: every module's whitening (W_out, W_in), a side [n, n] or the
        [1] tensor s for s I (``encoder.basis.kfac_roots``)."""
        want = {m.name: m for m in self.modules if self.plan[m.name] is not None}
        if set(projections) != set(want):
            raise ConfigError("the projections name other modules than the plan projects")
        sketch = self.config.projection == "sketch"
        for name, m in want.items():
            k_out, k_in = (m.out_features, m.in_features) if sketch else self.plan[name] or (0, 0)
            a, b = projections[name]
            a_ok = tuple(a.shape) == (k_out, m.out_features) or (sketch and a.numel() == 1)
            b_ok = tuple(b.shape) == (k_in, m.in_features) or (sketch and b.numel() == 1)
            if not (a_ok and b_ok):
                raise ConfigError(f"the projection of {name} is {tuple(a.shape)} x {tuple(b.shape)}, the plan "
                                  f"needs {(k_out, m.out_features)} x {(k_in, m.in_features)}")  # fmt: skip
        self._proj = {n: (a.to(self.device, self.accum_dtype), b.to(self.device, self.accum_dtype))
                      for n, (a, b) in projections.items()}  # fmt: skip
        if sketch:
            self.kfac_roots = self.projections()
        if self.second_moments is not None:
            self.set_second_moments(self.second_moments)  # the factored path folds into A, B
        self._choose_blocks()

    def basis_statistics(self, batches: Iterable[TokenBatch]) -> BasisStatistics:
        """C_out / C_in sums of the corrected per-example gradients over ``batches``, for
        the fitted basis (``encoder.basis``); one backward pass per batch."""
        if self.config.correction and self.second_moments is None:
            raise ConfigError("optimizer correction is on but no second moments were given")
        stats = BasisStatistics.empty(self.modules, self.plan)
        inv: dict[str, torch.Tensor] = {}  # 1 / (sqrt(v_hat) + eps), once per module
        if self.config.correction and self.second_moments is not None:
            sm = self.second_moments
            v = sm.for_modules([m for m in self.modules if m.name in stats.sums])
            inv = {n: (t.to(self.device, self.accum_dtype).sqrt() + sm.eps).reciprocal() for n, t in v.items()}

        def sink(m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> None:
            if m.name not in stats.sums:
                return
            scale = inv.get(m.name)
            for g in example_gradients(m, acts, grads):
                stats.add(m.name, g if scale is None else g.mul_(scale))

        for batch in batches:
            self._backward(batch, GradientCapture(self.modules, sink, self.accum_dtype))
            stats.count += len(batch)
        return stats

    def fit_basis(self, batches: Iterable[TokenBatch]) -> None:
        """Fit and install the basis from ``batches`` (``basis_statistics``; pca or kfac)."""
        if self.config.projection == "gaussian":
            raise ConfigError("the gaussian projection has no basis to fit")
        self.set_projections(self.fitted_projections(self.basis_statistics(batches)))

    def fitted_projections(self, stats: BasisStatistics) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The (A, B) pairs ``stats`` give this config: a pca basis or the kfac whitening."""
        cfg = self.config
        if cfg.projection == "pca":
            return stats.projections(self.modules, self.plan, cfg.seed)
        if cfg.projection == "kfac":
            self.kfac_roots = stats.kfac_roots(self.modules, cfg.delta)
            return kfac_pairs(self.kfac_roots, self.modules, self.plan, cfg.seed)
        if cfg.projection == "sketch":  # the whitening is the whole fit; the hash is seeded
            return stats.kfac_roots(self.modules, cfg.delta)
        raise ConfigError(f"the {cfg.projection} projection has no basis to fit")

    def saved_fit(self) -> tuple[Pairs, Pairs | None]:
        """What an index saves of the installed fit (``encoder.basis.save_projections``): the
        (A, B) pairs, and kfac's whitening beside them; a sketch saves its whitening alone."""
        if self.config.projection == "sketch":
            return {}, self.projections()
        return self.projections(), self.kfac_roots

    def install_fit(self, pairs: Pairs, roots: Pairs | None) -> None:
        """Install what ``saved_fit`` saved (``encoder.basis.load_fitted``)."""
        if self.config.projection == "sketch":
            self.set_projections(roots or {})
            return
        self.set_projections(pairs)
        if self.config.projection == "kfac":
            self.kfac_roots = roots

    def set_second_moments(self, sm: SecondMoments) -> None:
        """Install second moments; precomputes 1 / (sqrt(v_hat) + eps) per module [out, in]."""
        v = sm.for_modules(self.modules)
        self._inv_scale = {
            n: (t.to(self.device, self.accum_dtype).sqrt() + sm.eps).reciprocal()
            for n, t in v.items()
        }
        if self.config.mode == "factored":
            # Rank-1 correction folded into A, B (encoder/factored.py); no [out, in] scale kept.
            self._folded = {
                n: fold_projections(*self._proj[n], *rank1_correction(t.to(self.device), sm.eps))
                for n, t in v.items() if n in self._proj
            }
            # Modules stored exactly keep the exact correction (nothing to fold into).
            self._inv_scale = {n: s for n, s in self._inv_scale.items() if n not in self._proj}
        self.second_moments = sm
        self._choose_blocks()

    def _choose_blocks(self) -> None:
        """Each module's block (``encoder.blocks``), from its projection and correction."""
        lowp = self.precision.low_precision_products
        blocks: dict[str, Block] = {}
        for m in self.modules:
            proj = self._proj.get(m.name)
            inv = self._inv_scale.get(m.name) if self.config.correction else None
            if m.name in self._hash and proj is not None:
                sizes = self.plan[m.name] or (0, 0)
                blocks[m.name] = Sketched(m, *proj, *self._hash[m.name], sizes[0] * sizes[1], inv, self.precision)
                continue
            if proj is not None and self.config.projection == "sketch":  # kept whole: W_out G~ W_in exactly
                proj = (whole_side(proj[0], m.out_features), whole_side(proj[1], m.in_features))
            if self.config.correction and m.name in self._folded:
                blocks[m.name] = Factored(*self._folded[m.name], lowp)
            elif inv is None and proj is not None:  # A G B^T = sum_t (A g_t)(B a_t)^T: no G needed
                blocks[m.name] = Factored(*proj, lowp)
            else:
                blocks[m.name] = Exact(m, inv, proj, self.precision)
        self._blocks = blocks

    @property
    def low_precision_products(self) -> bool:
        """The hooks hand the model-dtype tensors to the blocks (``Precision``)."""
        return self.precision.low_precision_products

    def set_whitener(self, whitener: Whitener) -> None:
        if whitener.names != self.module_names or [m.shape[0] for m in whitener.matrices] != self.block_dims:
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

    def project(self, batch: TokenBatch) -> torch.Tensor:
        """phi for a batch: corrected, projected, not whitened.

        Args:
            batch: [B, T] token batch.
        Returns:
            phi [B, d] in the accumulation dtype (float32; float64 for a float64 model).
        """
        out = torch.zeros(len(batch), self.dim, dtype=self.accum_dtype, device=self.device)

        def put(name: str, phi_w: torch.Tensor) -> None:
            start, stop = self._spans[name]
            out[:, start:stop] = phi_w

        self.stream_blocks(batch, put)
        return out

    def stream_blocks(self, batch: TokenBatch, fn: Callable[[str, torch.Tensor], None]) -> None:
        """One backward pass calling ``fn(module name, phi_W [B, d_W])`` as each module's
        block is formed, so a caller can reduce blocks without keeping the full phi
        (``encoder.rescoring`` with no projection: phi_W is the whole corrected gradient)."""
        if self.config.correction and self.second_moments is None:
            raise ConfigError("optimizer correction is on but no second moments were given")
        if self.needs_basis:
            raise ConfigError("the projection basis is not fitted yet (fit_basis, or the index's projections)")

        def sink(m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> None:
            fn(m.name, self._phi_block(m, acts, grads))

        accum = None if self.low_precision_products else self.accum_dtype
        self._backward(batch, GradientCapture(self.modules, sink, accum))

    def _phi_block(self, m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """phi_W [B, d_W] from acts [B, T, in] and grads [B, T, out] (accumulation dtype, or
        the model's bf16/fp16 on the low-precision fast path)."""
        return self._blocks[m.name](acts, grads)

    def weight_directions(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weight-space direction V of a fingerprint-space vector u [d]: for every
        per-example gradient G, u . phi(G) = sum_W <V_W, G_W> (phi is linear in G).

        phi_W = A (C o G) B^T gives V_W = C o (A^T U_W B), U_W the block of u as [k, k] (the
        row-major vec of phi_W); without projection V_W = C o U_W; the factored path folds C
        into A', B' (V_W = A'^T U_W B'). So the derivative of a loss along V is u . phi of
        that loss's gradient: one forward-mode pass gives it for every token at once.

        Returns:
            parameter name -> V_W in the weight's stored orientation and dtype.
        """
        out = {}
        for m in self.modules:
            start, stop = self._spans[m.name]
            v = self._blocks[m.name].direction(u[start:stop].to(self.device, self.accum_dtype))
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

    def encode(self, batch: TokenBatch) -> torch.Tensor:
        """Fingerprints e [B, d] (float32 unless the model is float64), on the model's device."""
        return self.finalize(self.project(batch))

    def estimate_second_moments(self, batches: Iterable[TokenBatch]) -> SecondMoments:
        """v as the mean squared per-example gradient over the given batches (no optimizer
        state available). eps is Adam's default 1e-8."""
        sums = {m.name: torch.zeros(m.out_features, m.in_features, dtype=torch.float64) for m in self.modules}
        count = 0

        def sink(m: TrackedModule, acts: torch.Tensor, grads: torch.Tensor) -> None:
            total = torch.zeros(m.out_features, m.in_features, dtype=torch.float64, device=acts.device)
            for g in example_gradients(m, acts, grads):
                total += (g * g).sum(0).double()
            sums[m.name] += total.cpu()

        for batch in batches:
            self._backward(batch, GradientCapture(self.modules, sink, self.accum_dtype))
            count += len(batch)
        if count == 0:
            raise ConfigError("no sequences to estimate the second moments from")
        v_hat = {}
        for m in self.modules:
            v = (sums[m.name] / count).float()
            v_hat[m.param_name] = v.t().contiguous() if m.transposed else v
        return SecondMoments(v_hat=v_hat, eps=DEFAULT_EPS, source=f"estimated(n={count})")


WHITENED = ("kfac", "sketch")
"""Projection families that whiten each module by its K-FAC factors before projecting."""


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        out.append(total)
        total += x
    return out
