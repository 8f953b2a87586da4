"""First-use check of the Triton backend on a CUDA device (run once per device by _backends).

``import triton`` working says nothing about the GPU: an old architecture, a driver the
bundled ptxas does not know or a broken cache only show when a kernel is compiled and run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gemm

MIN_CAPABILITY = (8, 0)  # bf16 tensor cores and the launch configurations the kernels are tuned for


def probe(device: torch.device) -> str | None:
    """None when the backend runs on ``device``, else why not. Syncs the host: call it outside
    any CUDA-graph capture (the ops' first resolve does)."""
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"compute capability {cap[0]}.{cap[1]} is below "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, which the Triton kernels need")
    try:
        x = torch.arange(100, dtype=torch.float32, device=device)
        out = torch.empty_like(x)
        with torch.cuda.device(device):
            _axpb_kernel[(1,)](x, out, x.numel(), 2.0, 1.0, BLOCK=128)
        ok = torch.equal(out, 2.0 * x + 1.0)
    except Exception as e:  # a compiler, driver or cache failure, whatever its type
        return f"a test kernel failed to compile or run: {type(e).__name__}: {e}"
    if not ok:
        return "a test kernel ran but returned wrong values"
    gemm.warm_up(device)
    return None


@triton.jit
def _axpb_kernel(x_ptr, out_ptr, n, a, b, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, a * tl.load(x_ptr + offs, mask=ok) + b, mask=ok)
