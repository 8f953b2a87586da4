"""Argument validation shared by the public ops. Every failure is a ValueError naming the argument.

Data-dependent checks (target range, 0/1 masks) read tensor values. They always run on CPU
tensors; on accelerators they would force a host sync, so they run there only when
``DVPO_KERNELS_CHECK_VALUES=1`` (kernels never read out of bounds either way), and never
while ``torch.compile`` traces.
"""
from __future__ import annotations

import math
import os

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3", "abs", "low_var_kl", "kl", "mse")
VALUE_NORMS = ("seq", "batch", "none")
MEMORY_MODES = ("speed", "lean")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_values(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("DVPO_KERNELS_CHECK_VALUES", "0") == "1"


def tensor(name: str, t, *, ndim=None, floating=True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    return t


def same_shape(name: str, t: torch.Tensor, shape, ref_name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of {ref_name})")


def same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def optional(name: str, t, shape, ref_name: str, device) -> torch.Tensor | None:
    if t is None:
        return None
    tensor(name, t)
    same_shape(name, t, shape, ref_name)
    same_device(name, t, device)
    return t


def mask(name: str, m, shape, ref_name: str, device) -> torch.Tensor:
    """Validate a 0/1 or bool mask; returns it as bool."""
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    same_shape(name, m, shape, ref_name)
    same_device(name, m, device)
    if m.dtype == torch.bool:
        return m
    if m.is_complex():
        raise ValueError(f"{name} must be bool or 0/1, got dtype {m.dtype}")
    if _check_values(m) and m.numel() and not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    return m != 0


def targets(name: str, t, shape, ref_name: str, vocab: int, device, valid=None) -> torch.Tensor:
    """Integer targets in [0, vocab) where ``valid`` (a bool mask) is set; elsewhere any value
    (Hugging Face's -100) is allowed, as every op ignores the targets of masked tokens."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    same_shape(name, t, shape, ref_name)
    same_device(name, t, device)
    if _check_values(t) and t.numel():
        bad = (t < 0) | (t >= vocab)
        if valid is not None:
            bad &= valid
        if bool(bad.any()):
            where = "" if valid is None else " at unmasked positions"
            raise ValueError(f"{name} must lie in [0, {vocab}) (the vocab size){where}, got "
                             f"{int(t[bad][0])} at flat index {int(bad.reshape(-1).nonzero()[0])}")
    return t.long()


def finite(name: str, x, *, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a Python number, got a tensor")
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {x}")
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {x}")
    return x


def choice(name: str, x, options) -> str:
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")
    return x


def stat_dtype(*ts) -> torch.dtype:
    """Statistics are fp32, or fp64 when an input is fp64 (so the oracle can be matched exactly)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32
