"""Triton kernels of the per-token clipped policy loss (the twin of torch_backend/token_loss.py).

``token_terms`` is shared with the fused LM-head kernels of ``row_kernels.py``; it works on
blocks of tokens and on the scalars of one row alike. Hyper-parameters (bounds precomputed in
Python, like the scalar arguments of the PyTorch twin) are fp64 launch arguments, so fp64 kernels
see them exactly, and ``stat_scalar`` rounds them once to the stat dtype; the switches
that change the computed expression (dual clip on, KL type, whether KL/entropy enter the
loss) are constexpr.
"""
import triton
import triton.language as tl

KL_NONE = 0  # no reference log-probs: kl is 0 (KL_TYPE_IDS gives 1..5: k1, k2, k3, abs, low_var_kl)
N_TERMS = 7  # weighted loss + the 6 statistics of STAT_NAMES


@triton.jit
def stat_scalar(x, ACC: tl.constexpr):
    """A float launch argument (tl.float64; a Python float under the interpreter) in the stat dtype."""
    return tl.full((), x, ACC)


@triton.jit
def token_terms(logp, ent, old, adv, ref, ratio_lo, ratio_hi, dual, kl_coef, ent_coef,
                KL_TYPE: tl.constexpr, DUAL: tl.constexpr, KL_IN_LOSS: tl.constexpr,
                ENT_IN_LOSS: tl.constexpr):
    """Loss, dloss/dlogp and the statistics (clipped, ratio, old-logp, kl, entropy, lower) of tokens.

    Tie rules follow the twin: where s1 == s2 the unclipped branch carries the gradient,
    outside +-20 the clamped log-ratio has none, a binding dual clip has none.
    """
    zero = tl.zeros_like(logp)
    lr_raw = logp - old
    ratio = tl.exp(tl.minimum(tl.maximum(lr_raw, -20.0), 20.0))
    s1 = -adv * ratio
    s2 = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
    loss = tl.maximum(s1, s2)
    in_range = (lr_raw >= -20.0) & (lr_raw <= 20.0)
    grad = tl.where((s1 >= s2) & in_range, s1, zero)
    lower = zero
    if DUAL:
        cap = -adv * dual
        binds = (adv < 0) & (loss > cap)
        loss = tl.where(binds, cap, loss)
        grad = tl.where(binds, zero, grad)
        lower = binds.to(logp.dtype)
    kl = zero
    if KL_TYPE != 0:
        d = ref - logp
        if KL_TYPE == 1:
            kl = -d
            dkl = zero + 1.0
        elif KL_TYPE == 2:
            kl = 0.5 * d * d
            dkl = -d
        elif KL_TYPE == 3:
            e = tl.exp(d)
            kl = e - d - 1.0
            dkl = 1.0 - e
        elif KL_TYPE == 4:
            kl = tl.abs(d)
            dkl = tl.where(d > 0, zero - 1.0, tl.where(d < 0, zero + 1.0, zero))
        else:
            # verl's low_var_kl: k3 of d clamped to [-20, 20], the result clamped to <= 10; no
            # gradient where a clamp binds (k3 >= 0, so its lower clamp at -10 never does).
            dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
            e = tl.exp(dc)
            k3 = e - dc - 1.0
            kl = tl.minimum(k3, 10.0)
            dkl = tl.where((d >= -20.0) & (d <= 20.0) & (k3 <= 10.0), 1.0 - e, zero)
        if KL_IN_LOSS:
            loss = loss + kl_coef * kl
            grad = grad + kl_coef * dkl
    if ENT_IN_LOSS:
        loss = loss - ent_coef * ent
    clipped = (s2 > s1).to(logp.dtype)
    return loss, grad, clipped, ratio, old - logp, kl, lower


@triton.jit
def policy_loss_kernel(logp_ptr, ent_ptr, old_ptr, adv_ptr, w_ptr, mask_ptr, ref_ptr,
                       part_ptr, g_logp_ptr, g_ent_ptr, n,
                       ratio_lo: tl.float64, ratio_hi: tl.float64, dual: tl.float64, kl_coef: tl.float64,
                       ent_coef: tl.float64, HAS_ENT: tl.constexpr, KL_TYPE: tl.constexpr, DUAL: tl.constexpr,
                       KL_IN_LOSS: tl.constexpr, ENT_IN_LOSS: tl.constexpr, BLOCK: tl.constexpr):
    """One block of tokens: per-token gradients, and this block's sums of the weighted loss and
    statistics in part[pid, 0:7] (summed on the host side of the op, so the result is deterministic).
    Masked tokens are selected away with where(), so garbage there never leaks."""
    pid = tl.program_id(0)
    ACC: tl.constexpr = g_logp_ptr.dtype.element_ty
    ratio_lo, ratio_hi, dual = stat_scalar(ratio_lo, ACC), stat_scalar(ratio_hi, ACC), stat_scalar(dual, ACC)
    kl_coef, ent_coef = stat_scalar(kl_coef, ACC), stat_scalar(ent_coef, ACC)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    valid = inb & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0)
    zero = tl.zeros_like(logp)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    ent = zero
    if HAS_ENT:
        ent = tl.load(ent_ptr + offs, mask=inb, other=0.0)
    ref = zero
    if KL_TYPE != 0:
        ref = tl.load(ref_ptr + offs, mask=inb, other=0.0)
    loss, grad, clipped, ratio, ppo_kl, kl, lower = token_terms(
        logp, ent, old, adv, ref, ratio_lo, ratio_hi, dual, kl_coef, ent_coef,
        KL_TYPE, DUAL, KL_IN_LOSS, ENT_IN_LOSS)
    tl.store(g_logp_ptr + offs, tl.where(valid, w * grad, zero), mask=inb)
    if HAS_ENT:
        tl.store(g_ent_ptr + offs, tl.where(valid, -ent_coef * w, zero), mask=inb)
    part = part_ptr + pid.to(tl.int64) * 7
    tl.store(part + 0, tl.sum(tl.where(valid, w * loss, zero), axis=0))
    tl.store(part + 1, tl.sum(tl.where(valid, clipped, zero), axis=0))
    tl.store(part + 2, tl.sum(tl.where(valid, ratio, zero), axis=0))
    tl.store(part + 3, tl.sum(tl.where(valid, ppo_kl, zero), axis=0))
    tl.store(part + 4, tl.sum(tl.where(valid, kl, zero), axis=0))
    tl.store(part + 5, tl.sum(tl.where(valid, ent, zero), axis=0))
    tl.store(part + 6, tl.sum(tl.where(valid, lower, zero), axis=0))
