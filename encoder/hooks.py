"""Per-example gradient capture with forward/backward hooks, one module at a time.

The model is never edited. A forward hook on each tracked module keeps its input
activations ``acts [B, T, in]`` and registers a tensor hook on its output; during the
backward pass that hook receives ``grads [B, T, out]`` = dL/d(output) and hands both to a
sink, which turns them into whatever it accumulates (a projected gradient, a squared
gradient, ...) and lets them go. Since the loss is a sum of per-example losses and examples
do not interact, ``grads[b]`` is exactly example b's output gradient, and example b's
weight gradient is ``G_b = sum_t grads[b, t] acts[b, t]^T`` ([out, in]).

Padding positions get their activations zeroed, so they contribute exactly nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from encoder.modules import TrackedModule

Sink = Callable[[TrackedModule, torch.Tensor, torch.Tensor], None]
"""sink(module, acts [B, T, in], grads [B, T, out]); both in the accumulation dtype."""


class GradientCapture:
    """Context manager routing each tracked module's (acts, grads) to a sink.

    Args:
        modules: the tracked modules.
        sink: called once per module per backward pass, inside the backward pass.
        token_mask: [B, T] mask of real tokens for the current batch (set via ``set_mask``).
        accum_dtype: dtype handed to the sink (float32, or float64 for exactness tests);
            None hands over the model's own dtype (the bf16 fast path converts inside its
            matrix products, with float32 outputs).
    """

    def __init__(self, modules: list[TrackedModule], sink: Sink, accum_dtype: torch.dtype | None):
        self.modules = modules
        self.sink = sink
        self.accum_dtype = accum_dtype
        self._mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: set[str] = set()

    def set_mask(self, token_mask: torch.Tensor) -> None:
        """Set the [B, T] real-token mask of the next forward pass."""
        self._mask = token_mask
        self._seen.clear()

    def __enter__(self) -> GradientCapture:
        for m in self.modules:
            self._handles.append(m.module.register_forward_hook(self._forward_hook(m)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(
        self, tracked: TrackedModule
    ) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return None
            if tracked.name in self._seen:
                raise RuntimeError(
                    f"module {tracked.name} ran twice in one forward pass; weight sharing "
                    "across calls is not supported by the per-example hooks"
                )
            self._seen.add(tracked.name)
            acts = inputs[0].detach()
            mask = self._mask
            if mask is not None:
                acts = as_tokens(acts, mask.shape, tracked.name)
                acts = acts * mask.to(acts.dtype).unsqueeze(-1)

            def on_grad(grad: torch.Tensor) -> None:
                if mask is not None:
                    grad = as_tokens(grad, mask.shape, tracked.name)
                if self.accum_dtype is None:
                    self.sink(tracked, acts, grad)
                else:
                    self.sink(tracked, acts.to(self.accum_dtype), grad.to(self.accum_dtype))

            output.register_hook(on_grad)
            return None

        return hook


def as_tokens(x: torch.Tensor, batch_tokens: torch.Size, name: str) -> torch.Tensor:
    """A linear map's input or output gradient on any leading shape as [B, T, features].

    Most models call their linear maps on [B, T, in]; some flatten first (OPT's fc1/fc2 see
    [B*T, in]). Both hold one row per token, in token order.
    """
    b, t = batch_tokens
    if x.dim() == 3 and x.shape[0] == b and x.shape[1] == t:
        return x
    if x.shape[:-1].numel() != b * t:
        raise RuntimeError(
            f"module {name} saw input {tuple(x.shape)}, not one row per token of a [{b}, {t}] batch"
        )
    return x.reshape(b, t, x.shape[-1])


def make_inputs_differentiable(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Let gradients flow through a frozen model: mark the input embeddings' output.

    The model's parameters do not require grad (no weight gradient is ever summed over the
    batch); the backward pass then computes activation gradients only, and the per-example
    weight gradients are formed by the sinks.
    """

    def hook(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        return output

    embeddings: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    return embeddings.register_forward_hook(hook)
