"""encoder.fused on the CPU: its fallback (the kernel itself is checked in tests/gpu)."""

from __future__ import annotations

import torch


def test_fused_kernel_failure_falls_back_to_torch(monkeypatch):
    """encoder.fused: a kernel that fails at a new shape is switched off and torch answers
    (simulated on the CPU: the kernel itself only runs on CUDA, tests/gpu)."""
    from encoder import fused

    calls = []

    def broken(a, g, s):
        calls.append(g.shape)
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(fused, "_launch", broken)
    monkeypatch.setitem(fused._CHECKED, "cpu", True)
    monkeypatch.setattr(fused, "available", lambda device: fused._CHECKED.get(str(device), False))
    gen = torch.Generator().manual_seed(0)
    a, g, s = torch.randn(4, 6, generator=gen), torch.randn(2, 6, 5, generator=gen), torch.rand(6, 5, generator=gen)
    want = torch.einsum("ko,noi->nki", a, g * s)
    torch.testing.assert_close(fused.scale_project(a, g, s), want)
    torch.testing.assert_close(fused.scale_project(a, g, s), want)
    assert len(calls) == 1 and fused._CHECKED["cpu"] is False
