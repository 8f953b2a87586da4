"""The native backend: the compiled extension ``dvpo_kernels._C`` from ``csrc/`` -- CUDA
kernels for CUDA tensors, their C++ twins (rows in parallel) for CPU tensors.

``pip install -e . --no-build-isolation`` builds the extension (setup.py). A checkout
installed without it can compile it just in time: ``dvpo_kernels.native_backend.build()``,
or ``DVPO_KERNELS_JIT=1`` to build on first use. Until then ``unsupported()`` says why the
backend cannot run, and ``python -m dvpo_kernels`` prints that reason.

The ops take what the torch backend takes (dvpo_kernels/torch_backend/advantages.py); this
layer casts the small operands (weight, bias, log-probs, score) to the statistics dtype and
leaves the large ones (hidden states) to the kernels.
"""
from __future__ import annotations

import os

import torch

from . import _native_build

_ext = None
_why: str | None = None
_why_no_cuda = ("dvpo_kernels._C was built without its CUDA kernels (at build time torch had no CUDA or nvcc "
                "was not found); rebuild with `pip install -e . --no-build-isolation` on a CUDA machine")


def _import_prebuilt() -> None:
    global _ext, _why
    try:
        from . import _C
    except ImportError as e:
        _why = (f"the extension dvpo_kernels._C is not built ({e}); install with `pip install -e . "
                "--no-build-isolation` (torch installed first), or call dvpo_kernels.native_backend.build() "
                "or set DVPO_KERNELS_JIT=1 to compile it just in time")
    else:
        _ext, _why = _C, None


def build(verbose: bool = False):
    """Compile the extension just in time (CUDA kernels too where nvcc and a CUDA torch exist) and
    use it. Returns the module; raises RuntimeError, naming the reason, when no compiler works."""
    global _ext, _why, _why_no_cuda
    if _ext is not None:
        return _ext
    with_cuda, why_no_cuda = _native_build.cuda_support()
    errors = []
    for cuda in ((True, False) if with_cuda else (False,)):
        try:
            _ext = _native_build.jit_load(cuda, verbose=verbose)
        except Exception as e:  # a missing or broken toolchain: report it, do not crash the import
            errors.append(f"{'CUDA' if cuda else 'C++'} build failed: {type(e).__name__}: {e}")
            continue
        _why = None
        if not cuda:
            _why_no_cuda = (f"the just-in-time build has no CUDA kernels ({'; '.join(errors) or why_no_cuda})")
        return _ext
    _why = "just-in-time build of dvpo_kernels._C failed: " + " | ".join(errors)
    raise RuntimeError(_why)


def unsupported(device) -> str | None:
    device = torch.device(device)
    if _ext is None:
        return _why
    if device.type == "cuda":
        return None if _ext.with_cuda else _why_no_cuda
    if device.type == "cpu":
        return None
    return f"dvpo_kernels._C has no kernels for {device.type} tensors"


def _sd(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def value_head(h, w, bias):
    """h [N, H] (fp16/bf16/fp32/fp64), w [H] -> values [N] (fp32, fp64 for fp64 h)."""
    sd = _sd(h)
    return _ext.value_head(h, w.reshape(-1).to(sd), _cast(bias, sd))


def gae(values, rewards, mask, gamma, lam):
    sd = torch.float64 if torch.float64 in (values.dtype, rewards.dtype) else torch.float32
    adv, ret = _ext.gae(values.to(sd), rewards.to(sd), mask.bool(), float(gamma), float(lam))
    return adv, ret


def masked_whiten(x, mask, shift_mean, eps, dim=None):
    if dim is not None and not (x.dim() == 2 and dim in (1, -1)):
        raise ValueError(f"the native masked_whiten whitens all entries (dim=None) or each row of a 2-D x "
                         f"(dim=1), got dim={dim} for shape {tuple(x.shape)}")
    return _ext.masked_whiten(x.to(_sd(x)), mask.bool(), bool(shift_mean), float(eps), dim is not None)


def dvpo_advantages(h, w, bias, mask, old, ref, kl_coef, score, gamma, lam, value_norm, whiten_adv):
    sd = _sd(h)
    use_kl = ref is not None and kl_coef != 0.0
    adv, ret, values = _ext.dvpo_advantages(
        h, w.reshape(-1).to(sd), _cast(bias, sd), mask.bool(), _cast(old, sd) if use_kl else None,
        _cast(ref, sd) if use_kl else None, float(kl_coef), _cast(score, sd), float(gamma), float(lam),
        value_norm, bool(whiten_adv))
    return adv, ret, values


OPS = {
    "value_head": value_head,
    "gae": gae,
    "masked_whiten": masked_whiten,
    "dvpo_advantages": dvpo_advantages,
}

_import_prebuilt()
if _ext is None and os.environ.get("DVPO_KERNELS_JIT", "0") == "1":
    try:
        build()
    except RuntimeError:
        pass  # the reason is kept in _why and reported by unsupported()
