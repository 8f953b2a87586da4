"""LM-head log-probs, their backward and the fused policy loss: cuBLAS GEMMs + Triton row kernels.

No [N, V] tensor: one [rows, V] logits block, in the input dtype like the torch twin and eager
PyTorch, is reused for every chunk; the row kernels read it for the softmax statistics and
overwrite it with dlogits in place, ready for the dH and dW GEMMs.

memory="speed": token chunks over the full vocab; per chunk one logits GEMM, one dH GEMM (K = V,
so dH needs no running sum) and one dW GEMM into an fp32 [V, H] accumulator.
memory="lean": a loss / log-sum-exp pass over token chunks, then vocab slices spanning all
tokens: the slice's logits again, dH summed over slices in fp32 [N, H], and the slice's dW from
one GEMM over all tokens straight into the output, so there is no fp32 [V, H] buffer.
"""
from __future__ import annotations

import contextlib

import torch

from .._params import KL_TYPE_IDS, STAT_NAMES, LossParams
from ..torch_backend.linear import logit_transform
from . import tiles
from .gemm import accumulate_mm
from .row_kernels import dlogits_rows_kernel, logprob_rows_kernel, policy_rows_kernel
from .token_kernels import KL_NONE, N_TERMS


def _stat_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _work(like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """The reused logits buffer of ``rows`` rows of ``width`` columns, rows padded (tiles.row_stride)."""
    return like.new_empty(rows * tiles.row_stride(width))


def _block(work: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """[rows, width] view of ``work`` with the padded row stride; the GEMMs write it through ld."""
    ld = tiles.row_stride(width)
    return work[: rows * ld].view(rows, ld)[:, :width]


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _from(t, r0):
    """t[r0:] (a pointer to row r0 for the kernels), or None."""
    return None if t is None else t[r0:]


def linear_logprobs(h, w, tgt, bias, temperature, return_entropy, memory, softcap=0.0, scale=1.0):
    """Returns (logp [N], entropy [N] or empty, lse [N]); both memory modes walk token chunks.
    ``softcap`` (0 = off) and ``scale`` act on the raw logits before the temperature."""
    sd = _stat_dtype(h)
    n, v = h.shape[0], w.shape[0]
    logp = h.new_empty(n, dtype=sd)
    lse = h.new_empty(n, dtype=sd)
    ent = h.new_empty(n if return_entropy else 0, dtype=sd)
    if n == 0:
        return logp, ent, lse
    tgt = tgt.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = tiles.token_rows(h, n, v)
    launch = tiles.row_launch(v)
    with on_device(h):
        work = _work(h, rows, v)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            z = _block(work, r1 - r0, v)
            torch.mm(h[r0:r1], w.t(), out=z)
            logprob_rows_kernel[(r1 - r0,)](
                z, z.stride(0), bias, tgt[r0:], logp[r0:], lse[r0:], ent[r0:] if return_entropy else None, v,
                *logit_transform(temperature, softcap, scale), HAS_BIAS=bias is not None, SOFTCAP=bool(softcap),
                WANT_ENT=return_entropy, **launch)
    return logp, ent, lse


def linear_logprobs_backward(g_logp, g_ent, h, w, tgt, bias, temperature, lse, ent, memory, need, softcap=0.0,
                             scale=1.0):
    """Gradients (dh, dw, db) of sum(g_logp*logp + g_ent*entropy), recomputing the logits.

    ``need`` = (dh, dw, db) flags; a gradient not needed comes back as None.
    """
    sd = lse.dtype
    need = (need[0], need[1], need[2] and bias is not None)
    if h.shape[0] == 0 or not any(need):
        return _zero_grads(h, w, bias, need)
    g_logp = g_logp.to(sd).contiguous()
    g_ent = None if g_ent is None else g_ent.to(sd).contiguous()
    args = (g_logp, g_ent, h, w, tgt.contiguous(), None if bias is None else bias.contiguous(),
            logit_transform(temperature, softcap, scale), lse.contiguous(),
            None if g_ent is None else ent.contiguous(), need)
    with on_device(h):
        return _backward_lean(*args) if memory == "lean" else _backward_speed(*args)


def _zero_grads(h, w, bias, need):
    return (torch.zeros(h.shape, dtype=h.dtype, device=h.device) if need[0] else None,
            torch.zeros(w.shape, dtype=w.dtype, device=w.device) if need[1] else None,
            torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if need[2] else None)


def _chunk_grads(dz, h_rows, w, dh_rows, dw_acc, db_acc, accumulate):
    """dh[rows] = dz @ w (one GEMM over the full vocab); dw_acc (+)= dz^T @ h[rows]; db_acc += sum(dz)."""
    if dh_rows is not None:
        torch.mm(dz, w, out=dh_rows)
    if dw_acc is not None:
        accumulate_mm(dw_acc, dz.t(), h_rows, accumulate)
    if db_acc is not None:
        db_acc += dz.sum(0, dtype=db_acc.dtype)


def _backward_speed(g_logp, g_ent, h, w, tgt, bias, lt, lse, ent, need):
    n, hdim = h.shape
    v = w.shape[0]
    sd = lse.dtype
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need[0] else None
    dw_acc = torch.empty(v, hdim, dtype=sd, device=h.device) if need[1] else None
    db_acc = torch.zeros(v, dtype=sd, device=h.device) if need[2] else None
    rows = tiles.token_rows(h, n, v)
    launch = tiles.row_launch(v)
    work = _work(h, rows, v)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = _block(work, r1 - r0, v)
        torch.mm(h[r0:r1], w.t(), out=z)
        dlogits_rows_kernel[(r1 - r0,)](
            z, z.stride(0), bias, tgt[r0:], lse[r0:], _from(ent, r0), g_logp[r0:], _from(g_ent, r0), 0, v, *lt,
            HAS_BIAS=bias is not None, SOFTCAP=bool(lt[1]), HAS_ENT=g_ent is not None, **launch)
        _chunk_grads(z, h[r0:r1], w, None if dh is None else dh[r0:r1], dw_acc, db_acc, r0 > 0)
    del work
    return dh, _cast(dw_acc, w.dtype), _cast(db_acc, None if bias is None else bias.dtype)


def _backward_lean(g_logp, g_ent, h, w, tgt, bias, lt, lse, ent, need):
    n, hdim = h.shape
    v = w.shape[0]
    sd = lse.dtype
    width = tiles.vocab_slice(h, n, v)
    launch = tiles.row_launch(width)
    dh_acc = torch.empty(n, hdim, dtype=sd, device=h.device) if need[0] else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need[1] else None
    db = torch.empty(v, dtype=sd, device=h.device) if need[2] else None
    work = _work(h, n, width)
    for c0 in range(0, v, width):
        c1 = min(v, c0 + width)
        z = _block(work, n, c1 - c0)
        w_slice = w[c0:c1]
        torch.mm(h, w_slice.t(), out=z)
        dlogits_rows_kernel[(n,)](
            z, z.stride(0), _from(bias, c0), tgt, lse, ent, g_logp, g_ent, c0, c1 - c0, *lt,
            HAS_BIAS=bias is not None, SOFTCAP=bool(lt[1]), HAS_ENT=g_ent is not None, **launch)
        if dh_acc is not None:
            accumulate_mm(dh_acc, z, w_slice, c0 > 0)
        if dw is not None:
            torch.mm(z.t(), h, out=dw[c0:c1])
        if db is not None:
            db[c0:c1] = z.sum(0, dtype=sd)
    del work
    return _cast(dh_acc, h.dtype), dw, _cast(db, None if bias is None else bias.dtype)


def fused_policy_loss(h, w, tgt, old, adv, weight, mask, ref, bias, p: LossParams,
                      temperature, memory, need, softcap=0.0, scale=1.0):
    """Returns (loss, stat sums [6], dh, dw, db); ``need`` = (dh, dw, db) flags, None where unset.
    ``old`` None = on-policy (old = logp, taken inside the kernel).

    Masked tokens are compacted away before any GEMM (one host sync for the count, as in the
    torch twin). The op owns the scalar loss, so each token's gradient coefficient is known as
    soon as its row statistics are: speed mode writes dlogits in the same kernel.
    """
    sd = _stat_dtype(h)
    n, hdim = h.shape
    v = w.shape[0]
    need = (need[0], need[1], need[2] and bias is not None)
    with on_device(h):
        idx = mask.nonzero().squeeze(1)
        nv = idx.numel()
        if nv == 0:
            zero = h.new_zeros((), dtype=sd)
            return (zero, h.new_zeros(len(STAT_NAMES), dtype=sd)) + _zero_grads(h, w, bias, need)
        every = nv == n

        def pick(t, dtype=None):
            t = t if every else t.index_select(0, idx)
            return (t if dtype is None else t.to(dtype)).contiguous()

        hv, tv = pick(h), pick(tgt)
        advv, wv = pick(adv, sd), pick(weight, sd)
        oldv = None if old is None else pick(old, sd)
        refv = None if ref is None else pick(ref, sd)
        bias = None if bias is None else bias.contiguous()
        grad = any(need)
        lean = grad and memory == "lean"
        want_ent = p.entropy_coef != 0.0
        terms = h.new_empty((N_TERMS, nv), dtype=sd)
        lse = h.new_empty(nv, dtype=sd) if lean else None
        g_logp = h.new_empty(nv, dtype=sd) if lean else None
        ent = h.new_empty(nv, dtype=sd) if lean and want_ent else None
        g_ent = h.new_empty(nv, dtype=sd) if lean and want_ent else None
        speed_grads = grad and not lean
        dhv = torch.empty(nv, hdim, dtype=h.dtype, device=h.device) if speed_grads and need[0] else None
        dw_acc = torch.empty(v, hdim, dtype=sd, device=h.device) if speed_grads and need[1] else None
        db_acc = torch.zeros(v, dtype=sd, device=h.device) if speed_grads and need[2] else None
        lt = logit_transform(temperature, softcap, scale)
        rows = tiles.token_rows(h, nv, v)
        launch = tiles.row_launch(v)
        work = _work(h, rows, v)
        for r0 in range(0, nv, rows):
            r1 = min(nv, r0 + rows)
            z = _block(work, r1 - r0, v)
            torch.mm(hv[r0:r1], w.t(), out=z)
            policy_rows_kernel[(r1 - r0,)](
                z, z.stride(0), bias, tv[r0:], _from(oldv, r0), advv[r0:], wv[r0:], _from(refv, r0), terms[:, r0:], nv,
                _from(lse, r0), _from(ent, r0), _from(g_logp, r0), _from(g_ent, r0), v, *lt,
                1.0 - p.clip_low, 1.0 + p.clip_high, p.dual_clip, p.kl_coef, p.entropy_coef,
                HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), WANT_ENT=want_ent, ON_POLICY=oldv is None,
                KL_TYPE=KL_NONE if refv is None else KL_TYPE_IDS[p.kl_type], DUAL=bool(p.dual_clip),
                KL_IN_LOSS=refv is not None and bool(p.kl_coef), WRITE_GRAD=speed_grads, SAVE_COEF=lean,
                **launch)
            if speed_grads:
                _chunk_grads(z, hv[r0:r1], w, None if dhv is None else dhv[r0:r1], dw_acc, db_acc, r0 > 0)
        del work
        if lean:
            dhv, dw, db = _backward_lean(g_logp, g_ent, hv, w, tv, bias, lt, lse, ent, need)
        else:
            dw, db = _cast(dw_acc, w.dtype), _cast(db_acc, None if bias is None else bias.dtype)
        dh = None
        if dhv is not None:
            dh = dhv if every else torch.zeros(h.shape, dtype=h.dtype, device=h.device).index_copy_(0, idx, dhv)
        return terms[0].sum(), terms[1:].sum(1), dh, dw, db
