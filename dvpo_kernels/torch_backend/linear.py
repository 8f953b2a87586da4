"""Chunked LM-head log-probs and fused policy loss in plain PyTorch.

Nothing here allocates a [N, V] tensor: tokens are walked in blocks of at most
``MAX_BLOCK_ELEMENTS // V`` rows, and only per-token statistics (log-sum-exp, entropy,
log-prob) survive between passes. ``memory="speed"`` walks token blocks over the full vocab
with an fp32 dW accumulator; ``memory="lean"`` walks vocab slices, each slice's dW from one
GEMM over all tokens, so no fp32 [V, H] buffer exists.
"""
from __future__ import annotations

import torch

from .. import _config
from .._params import STAT_NAMES, LossParams
from .token_loss import token_terms


def _rows_per_block(width: int) -> int:
    return max(1, _config.MAX_BLOCK_ELEMENTS // max(width, 1))


def logit_transform(temperature, softcap=0.0, scale=1.0):
    """(inv_t, cap, pre): logits = cap * tanh(raw * pre) * inv_t, or raw * inv_t when cap is 0.
    The logit scale goes inside the tanh with soft-capping, into inv_t without."""
    if softcap:
        return 1.0 / temperature, softcap, scale / softcap
    return scale / temperature, 0.0, 0.0


def _logits(h, w, bias, lt, sd):
    """fp32 (or fp64) logits of one block (the GEMM runs in the input dtype like eager PyTorch),
    and d(logits)/d(raw) per element under soft-capping (None: the scalar inv_t)."""
    inv_t, cap, pre = lt
    z = (h @ w.t()).to(sd)
    if bias is not None:
        z += bias.to(sd)
    chain = None
    if cap:
        th = torch.tanh(z * pre)
        z = th * cap
        chain = (1.0 - th * th).mul_(cap * pre * inv_t)
    if inv_t != 1.0:
        z *= inv_t
    return z, chain


def _stats(z, tgt, want_ent):
    """Per-row log-sum-exp, target log-prob, entropy (or None) and the full log-softmax.

    A target outside [0, V) gets NaN: validation rejects those on CPU tensors, and on a GPU an
    out-of-range gather index would kill the process instead.
    """
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse[:, None]
    inside = (tgt >= 0) & (tgt < z.shape[1])
    logp = logp_all.gather(1, torch.where(inside, tgt, 0)[:, None]).squeeze(1)
    logp = torch.where(inside, logp, float("nan"))
    ent = None
    if want_ent:
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return lse, logp, ent, logp_all


def _dlogits(logp_all, tgt, col0, g_logp, g_ent, ent, inv_t, chain):
    """d(sum g_logp*logp + g_ent*entropy)/d(raw logits) for one block, in place."""
    p = logp_all.exp()
    if g_ent is not None:
        # d entropy / d z_j = -p_j (log p_j + entropy)
        dz = logp_all.add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])
        dz.sub_(p.mul_(g_logp[:, None]))
    else:
        dz = p.mul_(-g_logp[:, None])
    width = dz.shape[1]
    local = tgt - col0
    inside = (local >= 0) & (local < width)
    dz.scatter_add_(1, local.clamp(0, width - 1)[:, None], torch.where(inside, g_logp, 0.0)[:, None])
    if chain is not None:
        dz.mul_(chain)
    elif inv_t != 1.0:
        dz.mul_(inv_t)
    return dz


def linear_logprobs(h, w, tgt, bias, temperature, return_entropy, memory, softcap=0.0, scale=1.0):
    """Returns (logp [N], entropy [N] or empty, lse [N])."""
    sd = torch.float64 if h.dtype == torch.float64 else torch.float32
    n, v = h.shape[0], w.shape[0]
    lt = logit_transform(temperature, softcap, scale)
    logp = torch.empty(n, dtype=sd, device=h.device)
    lse = torch.empty(n, dtype=sd, device=h.device)
    ent = torch.empty(n if return_entropy else 0, dtype=sd, device=h.device)
    step = _rows_per_block(v)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z, _ = _logits(h[r0:r1], w, bias, lt, sd)
        lse[r0:r1], logp[r0:r1], e, _ = _stats(z, tgt[r0:r1], return_entropy)
        if return_entropy:
            ent[r0:r1] = e
    return logp, ent, lse


def linear_logprobs_backward(g_logp, g_ent, h, w, tgt, bias, temperature, lse, ent, memory, need, softcap=0.0,
                             scale=1.0):
    """Gradients (dh, dw, db) of sum(g_logp*logp + g_ent*entropy), by recomputing logits.

    ``need`` = (dh, dw, db) flags; a gradient not needed comes back as None.
    """
    sd = lse.dtype
    n, hdim = h.shape
    v = w.shape[0]
    lt = logit_transform(temperature, softcap, scale)
    g_logp = g_logp.to(sd)
    g_ent = None if g_ent is None else g_ent.to(sd)
    dh = torch.zeros(n, hdim, dtype=sd, device=h.device) if need[0] else None
    db = torch.zeros(v, dtype=sd, device=h.device) if (need[2] and bias is not None) else None
    if memory == "lean":
        dw = torch.empty_like(w) if need[1] else None
        vs = min(v, _config.LEAN_VOCAB_SLICE)
        step = _rows_per_block(vs)
        for c0 in range(0, v, vs):
            c1 = min(v, c0 + vs)
            ws, bs = w[c0:c1], None if bias is None else bias[c0:c1]
            dws = torch.zeros(c1 - c0, hdim, dtype=sd, device=h.device) if need[1] else None
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                z, chain = _logits(h[r0:r1], ws, bs, lt, sd)
                ent_b = None if g_ent is None else ent[r0:r1]
                dz = _dlogits(z.sub_(lse[r0:r1, None]), tgt[r0:r1], c0, g_logp[r0:r1],
                              None if g_ent is None else g_ent[r0:r1], ent_b, lt[0], chain)
                _accumulate(dz, h[r0:r1], ws, dh, dws, db, r0, r1, c0, c1)
            if dws is not None:
                dw[c0:c1] = dws
    else:
        dw_acc = torch.zeros(v, hdim, dtype=sd, device=h.device) if need[1] else None
        step = _rows_per_block(v)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            z, chain = _logits(h[r0:r1], w, bias, lt, sd)
            dz = _dlogits(z.sub_(lse[r0:r1, None]), tgt[r0:r1], 0, g_logp[r0:r1],
                          None if g_ent is None else g_ent[r0:r1], None if g_ent is None else ent[r0:r1], lt[0], chain)
            _accumulate(dz, h[r0:r1], w, dh, dw_acc, db, r0, r1, 0, v)
        dw = None if dw_acc is None else dw_acc.to(w.dtype)
    return (None if dh is None else dh.to(h.dtype)), dw, (None if db is None else db.to(bias.dtype))


def _accumulate(dz, hb, wb, dh, dw, db, r0, r1, c0, c1):
    """dh[rows] += dz @ w_slice; dw[slice] += dz^T @ h_rows (fp32/fp64 accumulators)."""
    if dh is not None:
        dh[r0:r1] += (dz.to(wb.dtype) @ wb).to(dh.dtype)
    if dw is not None:
        dw.addmm_(dz.t(), hb.to(dw.dtype))
    if db is not None:
        db[c0:c1] += dz.sum(0)


def fused_policy_loss(h, w, tgt, old, adv, weight, mask, ref, bias, p: LossParams,
                      temperature, memory, need, softcap=0.0, scale=1.0):
    """Returns (loss, stat sums [6], dh, dw, db); ``need`` = (dh, dw, db) flags, None where unset.
    ``old`` None = on-policy: old = logp as a value (ratio 1, the gradient of logp).

    Masked tokens are compacted away before any GEMM. In speed mode the three GEMMs run in one
    pass (the op owns the scalar loss, so its gradient is known as soon as a block's logits are).
    """
    sd = torch.float64 if h.dtype == torch.float64 else torch.float32
    n, hdim = h.shape
    v = w.shape[0]
    lt = logit_transform(temperature, softcap, scale)
    idx = mask.nonzero().squeeze(1)
    hv, tv = h.index_select(0, idx), tgt.index_select(0, idx)
    advv, wv = (x.index_select(0, idx).to(sd) for x in (adv, weight))
    oldv = None if old is None else old.index_select(0, idx).to(sd)
    refv = None if ref is None else ref.index_select(0, idx).to(sd)
    want_ent = p.entropy_coef != 0.0
    nv = idx.numel()
    loss = torch.zeros((), dtype=sd, device=h.device)
    stats = torch.zeros(len(STAT_NAMES), dtype=sd, device=h.device)
    need = (need[0], need[1], need[2] and bias is not None)
    compute_grad = any(need)
    dh = dw = db = None
    if not compute_grad or memory == "speed":
        dhv = torch.empty(nv, hdim, dtype=h.dtype, device=h.device) if need[0] else None
        dw_acc = torch.zeros(v, hdim, dtype=sd, device=h.device) if need[1] else None
        db = torch.zeros(v, dtype=sd, device=h.device) if need[2] else None
        step = _rows_per_block(v)
        for r0 in range(0, nv, step):
            r1 = min(nv, r0 + step)
            z, chain = _logits(hv[r0:r1], w, bias, lt, sd)
            _, logp, ent, logp_all = _stats(z, tv[r0:r1], want_ent)
            del z
            ref_b = None if refv is None else refv[r0:r1]
            old_b = logp if oldv is None else oldv[r0:r1]
            l, g, st = token_terms(logp, ent, old_b, advv[r0:r1], ref_b, p)
            wb = wv[r0:r1]
            loss += (wb * l).sum()
            stats += st.sum(1)
            if compute_grad:
                g_ent = -p.entropy_coef * wb if want_ent else None
                dz = _dlogits(logp_all, tv[r0:r1], 0, wb * g, g_ent, ent, lt[0], chain)
                if dhv is not None:
                    dhv[r0:r1] = dz.to(w.dtype) @ w
                if dw_acc is not None:
                    dw_acc.addmm_(dz.t(), hv[r0:r1].to(sd))
                if db is not None:
                    db += dz.sum(0)
        dw = None if dw_acc is None else dw_acc.to(w.dtype)
        dh = None if dhv is None else torch.zeros_like(h).index_copy_(0, idx, dhv)
        db = None if db is None else db.to(bias.dtype)
        return loss, stats, dh, dw, db
    logp, ent, lse = linear_logprobs(hv, w, tv, bias, temperature, want_ent, memory, softcap, scale)
    l, g, st = token_terms(logp, ent if want_ent else None, logp if oldv is None else oldv, advv, refv, p)
    loss, stats = (wv * l).sum(), st.sum(1)
    g_ent = -p.entropy_coef * wv if want_ent else None
    dhv, dw, db = linear_logprobs_backward(wv * g, g_ent, hv, w, tv, bias, temperature, lse, ent,
                                           "lean", need, softcap, scale)
    dh = None if dhv is None else torch.zeros_like(h).index_copy_(0, idx, dhv)
    return loss, stats, dh, dw, db
