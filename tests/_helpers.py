"""Shared test utilities: random inputs and the largest-tensor tracker."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0


def make_lm_inputs(n, h, v, *, dtype=torch.float64, seed=0, lead=None, bias=True, grad=True, device="cpu"):
    """hidden [*lead or n, h], weight [v, h], bias [v], targets; scaled so log-probs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead is not None else (n,)
    hidden = torch.randn(*shape, h, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2).to(device=device, dtype=dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    tgt = torch.randint(0, v, shape, generator=g).to(device)
    if grad:
        hidden.requires_grad_()
        weight.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return hidden, weight, b, tgt


def make_token_inputs(shape, *, seed=1, p_mask=0.3, dtype=torch.float64, device="cpu"):
    """old log-probs, advantages, mask, ref log-probs for per-token tensors of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    old = (-torch.rand(*shape, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    mask = (torch.rand(*shape, generator=g) > p_mask).to(device)
    ref = (-torch.rand(*shape, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    return old, adv, mask, ref


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
