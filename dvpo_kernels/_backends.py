"""Backend selection, in one place.

A backend is a module with ``OPS`` (op name -> implementation) and ``unsupported(device)``
(None when it can run tensors on that device, else the reason); it may also have
``probe(device)``, a first-use check on a CUDA device (compile and launch a tiny kernel), run
once per device and cached. ``auto`` walks each op's preference list and takes the first
backend that can run, warning once when a probe sends it past one; a forced backend that
cannot run raises and says why.

``why_not`` imports backends and runs probes. Under ``torch.compile`` it runs eagerly at trace
time (``assume_constant_result``): dynamo cannot trace an import or a kernel launch, and its
answer does not change for a given backend, op and device.
"""
from __future__ import annotations

import importlib
import os
import warnings

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
_probed: dict[tuple[str, str], str | None] = {}


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


def _probe(name: str, mod, device: torch.device) -> str | None:
    """The backend's first-use check on a CUDA device, once per device; warns when it fails."""
    if device.type != "cuda" or not hasattr(mod, "probe"):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (name, f"cuda:{index}")
    if key not in _probed:
        _probed[key] = mod.probe(torch.device("cuda", index))
        if _probed[key] is not None:
            warnings.warn(f"dvpo_kernels: the {name} backend cannot run on {key[1]} ({_probed[key]}); "
                          "its ops there run on the torch backend", RuntimeWarning,
                          stacklevel=2)
    return _probed[key]


def _device_why_not(name: str, device: torch.device) -> str | None:
    mod = _module(name)
    if mod is None:
        return f"did not load ({_load_errors[name]})"
    return mod.unsupported(device) or _probe(name, mod, device)


@torch.compiler.assume_constant_result
def why_not(name: str, op: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run ``op`` on ``device``, else the reason."""
    mod = _module(name)
    if mod is None:
        return f"the {name} backend did not load ({_load_errors[name]})"
    if op not in mod.OPS:
        return f"the {name} backend has no {op} kernel"
    return _device_why_not(name, device)


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
        # The Triton interpreter (CPU tensors, or any tensors under TRITON_INTERPRET=1) is a
        # testing tool, far slower than torch: never auto.
        if name == "triton" and (device.type != "cuda" or _interpreting()):
            continue
        if why_not(name, op, device) is None:
            return name
    raise RuntimeError(f"no backend can run {op} on {device.type} tensors")


def impl(name: str, op: str):
    return _module(name).OPS[op]


def report(device: torch.device | None = None) -> dict[str, str | None]:
    """Backend name -> None if usable on ``device`` (default: cuda if present, else cpu), else why not."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {name: _device_why_not(name, device) for name in BACKENDS}
