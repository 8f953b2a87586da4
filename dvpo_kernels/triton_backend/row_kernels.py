"""Triton row kernels over a [rows, V] block of logits (the softmax/loss epilogues of the GEMMs).

One program per token row (grid axis 0, so any token count works); each walks the vocab in
BLOCK_V tiles, masking the ragged last one. Raw logits ``z`` come from a cuBLAS GEMM in the
input dtype; ``(z + bias) * inv_t`` and all statistics are computed in the stat dtype (fp32,
fp64 for fp64 inputs). The log-sum-exp is online with one running max per row and per-lane
sums that are merged once at the end; the entropy sum is kept relative to the running max so
that logits of 1e4 do not cancel. Gradients overwrite the logits block in place, in its dtype,
ready for the dH and dW GEMMs. SOFTCAP: ``cap * tanh(z * pre)`` between the bias and the
temperature (Gemma's final-logit soft-capping; a logit scale is folded into ``pre``, or into
``inv_t`` without soft-capping), its derivative applied to dlogits. Offsets into the block are int64; rows may be padded (stride_z >=
width, a multiple of 16 so that loads vectorise), the padding is never read.

A target outside [0, width) is never read: its logit is NaN (validation rejects such targets on
CPU tensors; on a GPU they poison the result instead of reading out of bounds). logp <= 0 and
entropy >= 0 are clamped: contracted multiply-adds may otherwise round them 1 ulp past the bound.
"""
import triton
import triton.language as tl

from .token_kernels import stat_scalar, token_terms


@triton.jit
def _softcap(z, cap, pre):
    """(cap * tanh(z * pre), 1 - tanh^2); tanh from exp(-2|x|), which never overflows."""
    x = z * pre
    e = tl.exp(-2.0 * tl.abs(x))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(x < 0, -th, th)
    return cap * th, 1.0 - th * th


@triton.jit
def _logits(row_ptr, bias_ptr, cols, msk, inv_t, cap, pre, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
            ACC: tl.constexpr, EVICT: tl.constexpr):
    """One tile's logits after bias, soft-capping and temperature (-inf past the row end), and
    their derivative with respect to the raw GEMM output."""
    z = tl.load(row_ptr + cols, mask=msk, other=float("-inf"), eviction_policy=EVICT).to(ACC)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=msk, other=0.0).to(ACC)
    dz = tl.zeros_like(z) + inv_t
    if SOFTCAP:
        z, d = _softcap(z, cap, pre)
        z = tl.where(msk, z, float("-inf"))
        dz = d * (cap * pre * inv_t)
    return z * inv_t, dz


@triton.jit
def _target_logit(row_ptr, bias_ptr, col, width, inv_t, cap, pre, HAS_BIAS: tl.constexpr,
                  SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """The same arithmetic as ``_logits`` for one column; NaN for a column outside [0, width)."""
    inside = (col >= 0) & (col < width)
    col = tl.where(inside, col, 0)
    z = tl.load(row_ptr + col, mask=inside, other=float("nan")).to(ACC)
    if HAS_BIAS:
        z += tl.load(bias_ptr + col, mask=inside, other=0.0).to(ACC)
    if SOFTCAP:
        z, _ = _softcap(z, cap, pre)
    return z * inv_t


@triton.jit
def _nonpositive(x):
    return tl.where(x > 0, 0.0, x)  # a NaN stays NaN (tl.minimum would drop it)


@triton.jit
def _nonnegative(x):
    return tl.where(x < 0, 0.0, x)


@triton.jit
def _row_stats(row_ptr, bias_ptr, width, inv_t, cap, pre, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
               WANT_ENT: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """(lse, entropy) of one row in one pass; entropy is 0 unless WANT_ENT.

    With s = sum exp(z - m) and t = sum exp(z - m) * (z - m) for the running max m,
    lse = m + log s and entropy = log s - t / s (t <= 0, s >= 1, so entropy >= 0).
    """
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([BLOCK_V], ACC)
    t = tl.zeros([BLOCK_V], ACC)
    for v0 in range(0, width, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        msk = cols < width
        z, _ = _logits(row_ptr, bias_ptr, cols, msk, inv_t, cap, pre, HAS_BIAS, SOFTCAP, ACC, "evict_last")
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Until a finite logit has been seen the shift is 0 (avoids -inf - -inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        p = tl.exp(z - shift)
        if WANT_ENT:
            moved = tl.where(m == float("-inf"), 0.0, m - shift)
            t = alpha * (t + moved * s) + p * tl.where(p > 0, z - shift, 0.0)
        s = s * alpha + p
        m = m_new
    total = tl.sum(s, axis=0)
    lse = m + tl.log(total)
    ent = tl.zeros_like(lse)
    if WANT_ENT:
        ent = _nonnegative(tl.log(total) - tl.sum(t, axis=0) / total)
    return lse, ent


@triton.jit
def _write_dlogits(row_ptr, bias_ptr, width, tgt_col, lse, ent, g_logp, g_ent, inv_t, cap, pre,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """Overwrite the row's logits with d(g_logp*logp + g_ent*entropy)/d(raw logits):
    (g_logp * (onehot - p) - g_ent * p * (log p + entropy)) * dlogits/draw."""
    for v0 in range(0, width, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        msk = cols < width
        y, dy = _logits(row_ptr, bias_ptr, cols, msk, inv_t, cap, pre, HAS_BIAS, SOFTCAP, ACC, "evict_first")
        lp = y - lse
        p = tl.exp(lp)
        dz = -g_logp * p
        if HAS_ENT:
            dz -= g_ent * p * tl.where(p > 0, lp + ent, 0.0)
        dz = tl.where(cols == tgt_col, dz + g_logp, dz) * dy
        tl.store(row_ptr + cols, dz.to(row_ptr.dtype.element_ty), mask=msk)


@triton.jit
def logprob_rows_kernel(z_ptr, stride_z, bias_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, width,
                        inv_t: tl.float64, cap: tl.float64, pre: tl.float64, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_ENT: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    """logp, lse (and entropy) of each row of a full-vocab logits block."""
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    inv_t, cap, pre = stat_scalar(inv_t, ACC), stat_scalar(cap, ACC), stat_scalar(pre, ACC)
    row_ptr = z_ptr + row * stride_z
    zt = _target_logit(row_ptr, bias_ptr, tl.load(tgt_ptr + row), width, inv_t, cap, pre, HAS_BIAS, SOFTCAP, ACC)
    lse, ent = _row_stats(row_ptr, bias_ptr, width, inv_t, cap, pre, HAS_BIAS, SOFTCAP, WANT_ENT, ACC, BLOCK_V)
    tl.store(logp_ptr + row, _nonpositive(zt - lse))
    tl.store(lse_ptr + row, lse)
    if WANT_ENT:
        tl.store(ent_ptr + row, ent)


@triton.jit
def dlogits_rows_kernel(z_ptr, stride_z, bias_ptr, tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                        col0, width, inv_t: tl.float64, cap: tl.float64, pre: tl.float64,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Backward of linear_logprobs on the vocab columns [col0, col0 + width) of each row, given
    the row's lse (and entropy) from the forward pass; bias_ptr points at bias[col0]."""
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    inv_t, cap, pre = stat_scalar(inv_t, ACC), stat_scalar(cap, ACC), stat_scalar(pre, ACC)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(g_logp_ptr + row).to(ACC)
    ent = tl.zeros_like(lse)
    g_ent = tl.zeros_like(lse)
    if HAS_ENT:
        ent = tl.load(ent_ptr + row)
        g_ent = tl.load(g_ent_ptr + row).to(ACC)
    tgt_col = tl.load(tgt_ptr + row) - col0
    _write_dlogits(z_ptr + row * stride_z, bias_ptr, width, tgt_col, lse, ent, g_logp, g_ent, inv_t, cap, pre,
                   HAS_BIAS, SOFTCAP, HAS_ENT, ACC, BLOCK_V)


@triton.jit
def policy_rows_kernel(z_ptr, stride_z, bias_ptr, tgt_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr,
                       terms_ptr, stride_terms, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                       width, inv_t: tl.float64, cap: tl.float64, pre: tl.float64, ratio_lo: tl.float64,
                       ratio_hi: tl.float64, dual: tl.float64, kl_coef: tl.float64, ent_coef: tl.float64,
                       HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_ENT: tl.constexpr,
                       KL_TYPE: tl.constexpr, DUAL: tl.constexpr, KL_IN_LOSS: tl.constexpr,
                       ON_POLICY: tl.constexpr, WRITE_GRAD: tl.constexpr, SAVE_COEF: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    """Fused policy loss of each (valid) token row of a full-vocab logits block.

    Pass 1 gives lse, logp, entropy; then the token's loss terms land in terms[k, row]
    (k = weighted loss, then STAT_NAMES) and its gradient coefficients are known, since the
    op owns the scalar loss. WRITE_GRAD: pass 2 turns the row into dlogits in place.
    SAVE_COEF: lse, entropy and the coefficients are stored for a later backward (lean mode).
    ON_POLICY: no old log-probs; old = logp (a value, so the ratio is 1 with the gradient of logp).
    """
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = terms_ptr.dtype.element_ty
    inv_t, cap, pre = stat_scalar(inv_t, ACC), stat_scalar(cap, ACC), stat_scalar(pre, ACC)
    ratio_lo, ratio_hi, dual = stat_scalar(ratio_lo, ACC), stat_scalar(ratio_hi, ACC), stat_scalar(dual, ACC)
    kl_coef, ent_coef = stat_scalar(kl_coef, ACC), stat_scalar(ent_coef, ACC)
    row_ptr = z_ptr + row * stride_z
    # In-place hazard: WRITE_GRAD overwrites this row, and another warp of the program may reach
    # the target's column first. So the target logit is read before the statistics (whose
    # reductions end in barriers), and a barrier precedes the overwrite.
    tgt = tl.load(tgt_ptr + row)
    zt = _target_logit(row_ptr, bias_ptr, tgt, width, inv_t, cap, pre, HAS_BIAS, SOFTCAP, ACC)
    lse, ent = _row_stats(row_ptr, bias_ptr, width, inv_t, cap, pre, HAS_BIAS, SOFTCAP, WANT_ENT, ACC, BLOCK_V)
    logp = _nonpositive(zt - lse)
    if ON_POLICY:
        old = logp
    else:
        old = tl.load(old_ptr + row).to(ACC)
    adv = tl.load(adv_ptr + row).to(ACC)
    w = tl.load(w_ptr + row).to(ACC)
    ref = tl.zeros_like(logp)
    if KL_TYPE != 0:
        ref = tl.load(ref_ptr + row).to(ACC)
    loss, grad, clipped, ratio, ppo_kl, kl, lower = token_terms(
        logp, ent, old, adv, ref, ratio_lo, ratio_hi, dual, kl_coef, ent_coef,
        KL_TYPE, DUAL, KL_IN_LOSS, WANT_ENT)
    out = terms_ptr + row
    tl.store(out, w * loss)
    tl.store(out + stride_terms, clipped)
    tl.store(out + 2 * stride_terms, ratio)
    tl.store(out + 3 * stride_terms, ppo_kl)
    tl.store(out + 4 * stride_terms, kl)
    tl.store(out + 5 * stride_terms, ent)
    tl.store(out + 6 * stride_terms, lower)
    g_logp = w * grad
    g_ent = -ent_coef * w
    if SAVE_COEF:
        tl.store(lse_ptr + row, lse)
        tl.store(g_logp_ptr + row, g_logp)
        if WANT_ENT:
            tl.store(ent_ptr + row, ent)
            tl.store(g_ent_ptr + row, g_ent)
    if WRITE_GRAD:
        tl.debug_barrier()
        _write_dlogits(row_ptr, bias_ptr, width, tgt, lse, ent, g_logp, g_ent, inv_t, cap, pre,
                       HAS_BIAS, SOFTCAP, WANT_ENT, ACC, BLOCK_V)
