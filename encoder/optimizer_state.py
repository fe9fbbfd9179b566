"""Adam second moments for the optimizer correction (DESIGN.md step 2, paper Sec. 3).

G~_W = G_W / (sqrt(v_hat_W) + eps) with v_hat the optimizer's bias-corrected second moment
``exp_avg_sq / (1 - beta2^step)`` and eps the optimizer's own eps: the gradient as the
optimizer would have applied it.

Sources, by what the path holds:
- an HF Trainer checkpoint directory (``optimizer.pt``; parameter indices mapped to names
  the way ``Trainer.create_optimizer`` orders them: weight-decay group, then the rest);
- a torch optimizer state dict file (``{"state", "param_groups"}``);
- a safetensors file of second moments keyed by parameter name (metadata may give ``eps``
  and, for raw ``exp_avg_sq``, ``step`` and ``beta2``).
Without any of these the caller estimates v as the mean squared per-example gradient
(``TrackStarEncoder.estimate_second_moments``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from api.errors import OptimizerStateError
from encoder.modules import TrackedModule
from encoder.tensor_files import save_tensors

log = logging.getLogger(__name__)

DEFAULT_EPS = 1e-8


@dataclass
class SecondMoments:
    """Bias-corrected second moments by parameter name (stored orientation), plus eps.

    Attributes:
        v_hat: parameter name -> tensor shaped like the parameter.
        eps: the optimizer's epsilon.
        source: where they came from, reported in the manifest
            (e.g. ``trainer-checkpoint``, ``estimated(n=512)``).
    """

    v_hat: dict[str, torch.Tensor]
    eps: float
    source: str

    def for_modules(self, modules: list[TrackedModule]) -> dict[str, torch.Tensor]:
        """v_hat of each tracked module in [out, in] orientation, keyed by module name.

        Raises:
            OptimizerStateError: a tracked weight is missing or has the wrong shape.
        """
        out: dict[str, torch.Tensor] = {}
        for m in modules:
            v = self.v_hat.get(m.param_name)
            if v is None:
                raise OptimizerStateError(
                    f"optimizer state has no second moment for {m.param_name!r} "
                    f"(source: {self.source})"
                )
            v = m.weight_as_out_in(v)
            if tuple(v.shape) != (m.out_features, m.in_features):
                raise OptimizerStateError(
                    f"second moment of {m.param_name!r} has shape {tuple(v.shape)}, "
                    f"the model's weight is {(m.out_features, m.in_features)} (out, in)"
                )
            out[m.name] = v.float()
        return out

    def save(self, path: Path, param_names: Iterable[str] | None = None) -> None:
        """Write (a subset of) v_hat as safetensors with eps in the metadata."""
        names = list(param_names) if param_names is not None else list(self.v_hat)
        tensors = {n: self.v_hat[n].float().contiguous() for n in names}
        save_tensors(tensors, str(path), metadata={"eps": repr(self.eps), "source": self.source})


def _trainer_param_order(model: nn.Module) -> list[str]:
    """Parameter names in the order HF Trainer's default optimizer numbers them."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    # Trainer filters on requires_grad at training time, when every parameter trains; the
    # encoder freezes the model, so the filter is not replayed here.
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n in decay] + [n for n in names if n not in decay]


def _from_optimizer_state_dict(sd: dict[str, Any], model: nn.Module, source: str) -> SecondMoments:
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise OptimizerStateError(f"{source}: not a torch optimizer state dict")
    groups = sd["param_groups"]
    state = sd["state"]
    indices = [i for g in groups for i in g["params"]]
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}

    explicit = [n for g in groups for n in g.get("param_names", [])]
    orders = [explicit] if len(explicit) == len(indices) else []
    orders += [_trainer_param_order(model), list(params)]
    names: list[str] | None = None
    for order in orders:
        if len(order) != len(indices):
            continue
        if all(
            i not in state
            or "exp_avg_sq" not in state[i]
            or tuple(state[i]["exp_avg_sq"].shape) == shapes[n]
            for i, n in zip(indices, order, strict=True)
        ):
            names = order
            break
    if names is None:
        raise OptimizerStateError(
            f"{source}: optimizer state for {len(indices)} parameters does not match the "
            f"model's {len(params)} parameters (count or shapes differ)"
        )
    index_group = {i: g for g in groups for i in g["params"]}
    v_hat: dict[str, torch.Tensor] = {}
    eps = None
    for i, name in zip(indices, names, strict=True):
        st = state.get(i)
        if not st or "exp_avg_sq" not in st:
            continue
        group = index_group[i]
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        step = float(st["step"]) if "step" in st else 1.0
        if step <= 0:
            raise OptimizerStateError(f"{source}: step {step} for {name!r}; no update was taken")
        v_hat[name] = st["exp_avg_sq"].float() / (1.0 - beta2**step)
        eps = float(group.get("eps", DEFAULT_EPS))
    if not v_hat:
        raise OptimizerStateError(f"{source}: no exp_avg_sq in the state (not Adam/AdamW?)")
    return SecondMoments(v_hat=v_hat, eps=eps if eps is not None else DEFAULT_EPS, source=source)


def _from_safetensors(path: Path) -> SecondMoments:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    eps = float(meta.get("eps", DEFAULT_EPS))
    if "step" in meta:
        beta2 = float(meta.get("beta2", 0.999))
        corr = 1.0 - beta2 ** float(meta["step"])
        tensors = {n: t / corr for n, t in tensors.items()}
    return SecondMoments(
        v_hat={n: t.float() for n, t in tensors.items()},
        eps=eps,
        source=meta.get("source", f"safetensors:{path.name}"),
    )


def load_second_moments(path: str | Path, model: nn.Module) -> SecondMoments:
    """Load Adam second moments from a Trainer checkpoint dir, state dict or safetensors.

    Args:
        path: a checkpoint directory holding ``optimizer.pt``, an ``optimizer.pt``-style
            file, or a ``.safetensors`` file keyed by parameter name.
        model: the model the state belongs to (for the index -> name mapping and shapes).
    Returns:
        bias-corrected second moments keyed by parameter name.
    Raises:
        OptimizerStateError: missing, unreadable, or not matching the model.
    """
    return _validated(_load(Path(path), model), model)


def _validated(sm: SecondMoments, model: nn.Module) -> SecondMoments:
    """Second moments are the model's (names and shapes), finite and non-negative: a
    negative entry would make sqrt(v) NaN and every fingerprint with it."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    unknown = sorted(set(sm.v_hat) - set(shapes))
    if unknown:
        raise OptimizerStateError(
            f"{sm.source}: {len(unknown)} entries name no parameter of the model (e.g. {unknown[0]!r}): "
            "not this model's optimizer state"
        )
    for name, v in sm.v_hat.items():
        if tuple(v.shape) != shapes[name]:
            raise OptimizerStateError(
                f"{sm.source}: {name!r} has shape {tuple(v.shape)}, the model's parameter {shapes[name]}"
            )
        if not torch.isfinite(v).all():
            raise OptimizerStateError(
                f"{sm.source}: the second moment of {name!r} holds NaN or inf"
            )
        if (v < 0).any():
            raise OptimizerStateError(
                f"{sm.source}: the second moment of {name!r} holds negative values, which a second moment "
                "cannot: is this the model's weights rather than its optimizer state?"
            )
    if not (sm.eps >= 0 and math.isfinite(sm.eps)):
        raise OptimizerStateError(f"{sm.source}: eps {sm.eps} is not a finite non-negative number")
    return sm


def _load(path: Path, model: nn.Module) -> SecondMoments:
    if path.is_dir():
        if not (path / "optimizer.pt").is_file():
            raise OptimizerStateError(f"{path} holds no optimizer.pt (not a Trainer checkpoint?)")
        path = path / "optimizer.pt"
        kind = "trainer-checkpoint"
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise OptimizerStateError(f"optimizer state file {path} does not exist")
        return _from_safetensors(path)
    elif path.is_file():
        kind = "optimizer-state-dict"
    else:
        raise OptimizerStateError(f"optimizer state {path} does not exist")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        raise OptimizerStateError(f"cannot read optimizer state {path}: {exc}") from exc
    return _from_optimizer_state_dict(sd, model, f"{kind}:{path.parent.name}/{path.name}")
