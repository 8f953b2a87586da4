"""Backend selection, in one place.

A backend is a module with ``OPS`` (op name -> implementation) and ``unsupported(device)``
(None when it can run tensors on that device, else the reason). ``auto`` walks each op's
preference list and takes the first backend that can run; a forced backend that cannot run
raises and says why.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("native", "triton", "torch")
CHOICES = ("auto",) + BACKENDS
_MODULES = {
    "native": "dvpo_kernels.native_backend",
    "triton": "dvpo_kernels.triton_backend",
    "torch": "dvpo_kernels.torch_backend",
}
# Per-op preference of `auto`: the native scan kernels first for the advantage ops, the
# fused Triton LM-head kernels first for the log-prob/loss ops.
_PREFERENCE = {
    "linear_logprobs": ("triton", "torch"),
    "linear_logprobs_backward": ("triton", "torch"),
    "fused_policy_loss": ("triton", "torch"),
    "policy_loss": ("triton", "torch"),
    "value_head": ("native", "triton", "torch"),
    "gae": ("native", "triton", "torch"),
    "masked_whiten": ("native", "triton", "torch"),
    "dvpo_advantages": ("native", "triton", "torch"),
}
_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}


def _module(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        _loaded[name] = importlib.import_module(_MODULES[name])
        return _loaded[name]
    except Exception as e:  # ImportError, or a broken toolchain raising at import
        _load_errors[name] = f"{type(e).__name__}: {e}"
        return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(name: str, op: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run ``op`` on ``device``, else the reason."""
    mod = _module(name)
    if mod is None:
        return f"the {name} backend did not load ({_load_errors[name]})"
    if op not in mod.OPS:
        return f"the {name} backend has no {op} kernel"
    return mod.unsupported(device)


def requested_backend(backend: str | None) -> str:
    choice = backend if backend is not None else os.environ.get("DVPO_KERNELS_BACKEND", "auto")
    choice = choice.strip().lower()
    if choice not in CHOICES:
        src = "backend" if backend is not None else "DVPO_KERNELS_BACKEND"
        raise ValueError(f"{src} must be one of {CHOICES}, got {choice!r}")
    return choice


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """Name of the backend that will run ``op`` on ``device``."""
    choice = requested_backend(backend)
    if choice != "auto":
        reason = why_not(choice, op, device)
        if reason is not None:
            raise RuntimeError(f"backend={choice!r} cannot run {op} on {device.type} tensors: {reason}")
        return choice
    for name in _PREFERENCE[op]:
        # The Triton interpreter runs CPU tensors for testing, far slower than torch: never auto.
        if name == "triton" and device.type != "cuda":
            continue
        if why_not(name, op, device) is None:
            return name
    raise RuntimeError(f"no backend can run {op} on {device.type} tensors")


def impl(name: str, op: str):
    return _module(name).OPS[op]


def report(device: torch.device | None = None) -> dict[str, str | None]:
    """Backend name -> None if usable on ``device`` (default: cuda if present, else cpu), else why not."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for name in BACKENDS:
        mod = _module(name)
        out[name] = f"did not load ({_load_errors[name]})" if mod is None else mod.unsupported(device)
    return out
