"""``acc = a @ b`` or ``acc += a @ b`` into an fp32 accumulator, operands possibly 16-bit.

dW (speed mode) and dH (lean mode) are sums over chunks; summing bf16 partials in bf16 makes
training diverge, so the running sum lives in fp32. PyTorch >= 2.8 exposes cuBLAS's
bf16 x bf16 -> fp32 GEMM as ``torch.mm(..., out_dtype=torch.float32)`` and
``torch.addmm(..., out_dtype=torch.float32)``; whether this PyTorch has each of the two, and
gets it right, is probed separately once per device and dtype (a build may have one and not
the other). Otherwise (older PyTorch, CPU tensors under the Triton interpreter) a Triton GEMM
does the same work: fp32 tensor-core accumulation, the accumulator tile read and written
once. Same-dtype operands (fp32/fp64 inputs) go straight to ``torch.mm``/``addmm_``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# (kind, device, dtype) -> whether cuBLAS's mixed GEMM of that kind ("mm" or "addmm") works.
_CUBLAS_MIXED: dict[tuple[str, torch.device, torch.dtype], bool] = {}
_MIXED_DTYPES = (torch.bfloat16, torch.float16)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """acc (+)= a @ b; a and b share a dtype, acc is that dtype or a wider float."""
    if a.dtype == acc.dtype:
        if accumulate:
            acc.addmm_(a, b)
        else:
            torch.mm(a, b, out=acc)
    elif cublas_mixed_ok("addmm" if accumulate else "mm", acc.device, a.dtype):
        _cublas_mixed(acc, a, b, accumulate)
    else:
        _triton_addmm(acc, a, b, accumulate)


def warm_up(device: torch.device) -> None:
    """Run every probe of ``device`` now, so that no op syncs the host for one later."""
    for dtype in _MIXED_DTYPES:
        for kind in ("mm", "addmm"):
            cublas_mixed_ok(kind, device, dtype)


def _cublas_mixed(acc, a, b, accumulate):
    if accumulate:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        torch.mm(a, b, out_dtype=acc.dtype, out=acc)


def cublas_mixed_ok(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    key = (kind, device, dtype)
    if key not in _CUBLAS_MIXED:
        _CUBLAS_MIXED[key] = device.type == "cuda" and _probe(kind, device, dtype)
    return _CUBLAS_MIXED[key]


def _probe(kind, device, dtype) -> bool:
    """One small transposed-operand GEMM of ``kind``, checked against float64 (one host sync)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(48, 40, generator=g, dtype=torch.float64)
    b = torch.randn(48, 24, generator=g, dtype=torch.float64)
    c = torch.randn(40, 24, generator=g, dtype=torch.float64)
    a16, b16 = a.to(dtype), b.to(dtype)
    accumulate = kind == "addmm"
    want = a16.double().t() @ b16.double() + (c.float().double() if accumulate else 0.0)
    try:
        acc = c.float().to(device) if accumulate else torch.empty(40, 24, dtype=torch.float32, device=device)
        _cublas_mixed(acc, a16.to(device).t(), b16.to(device), accumulate)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return torch.allclose(acc.double().cpu(), want, rtol=1e-4, atol=1e-4)


def _triton_addmm(acc, a, b, accumulate):
    m, k = a.shape
    n = b.shape[1]
    bm, bn, bk = 128, 128, 64
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    addmm_kernel[grid](acc, a, b, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                       acc.stride(0), acc.stride(1), ACCUMULATE=accumulate,
                       UPCAST=isinstance(addmm_kernel, InterpretedFunction), BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=3)


@triton.jit
def addmm_kernel(c_ptr, a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                 stride_cm, stride_cn, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """C (+)= A @ B for any strides; tiles in GROUP_M-row bands so neighbours share A in L2.

    UPCAST feeds the dot fp32 copies of the tiles (same products, exact in fp32): the Triton
    interpreter multiplies the raw bits of bf16 tiles, so it is set there and nowhere else.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_ok = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0)
    tl.store(c_ptrs, acc, mask=c_ok)
