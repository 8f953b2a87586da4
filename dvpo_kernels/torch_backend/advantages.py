"""Value head, masked whitening, GAE and the fused DVPO advantage recipe in plain PyTorch.

Rows are vectorised; the reverse scan walks the time axis once.
"""
from __future__ import annotations

import torch


def value_head(h, w, bias):
    """h [N, H], w [H] -> fp32 (fp64 for fp64 input) values [N]."""
    sd = torch.float64 if h.dtype == torch.float64 else torch.float32
    v = h.to(sd) @ w.to(sd)
    return v + bias.to(sd) if bias is not None else v


def masked_whiten(x, mask, shift_mean, eps, dim=None):
    """Whiten over valid entries (all of them, or each row along ``dim``); masked entries 0."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xm = torch.where(mask, x, zero)
    kw = {} if dim is None else {"dim": dim, "keepdim": True}
    count = mask.sum(**kw).to(x.dtype)
    mean = xm.sum(**kw) / count.clamp(min=1)
    centered = torch.where(mask, x - mean, zero)
    var = (centered * centered).sum(**kw) / (count - 1).clamp(min=1)
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)


def gae(values, rewards, mask, gamma, lam):
    """Masked reverse GAE scan over [B, T]; masked positions are skipped and get 0."""
    b, t = values.shape
    adv = torch.zeros_like(values)
    next_v = torch.zeros(b, dtype=values.dtype, device=values.device)
    next_a = torch.zeros_like(next_v)
    for i in range(t - 1, -1, -1):
        m = mask[:, i]
        v = values[:, i]
        a = rewards[:, i] + gamma * next_v - v + (gamma * lam) * next_a
        adv[:, i] = torch.where(m, a, 0.0)
        next_v = torch.where(m, v, next_v)
        next_a = torch.where(m, a, next_a)
    returns = torch.where(mask, adv + values, 0.0)
    return adv, returns


def kl_score_rewards(mask, old, ref, kl_coef, score, dtype):
    """Per-token reward: -kl_coef*(old-ref) on valid tokens, + score[b] on row b's last valid token."""
    r = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if ref is not None and kl_coef != 0.0:
        r = torch.where(mask, -kl_coef * (old.to(dtype) - ref.to(dtype)), r)
    if score is not None:
        t = mask.shape[1]
        pos = torch.arange(t, device=mask.device).expand_as(mask)
        last = torch.where(mask, pos, -1).amax(dim=1)  # -1 for an empty row
        add = torch.where(last >= 0, score.to(dtype), 0.0)
        r = r.scatter_add(1, last.clamp(min=0)[:, None], add[:, None])
    return r


def dvpo_advantages(h, w, bias, mask, old, ref, kl_coef, score, gamma, lam, value_norm, whiten_adv):
    b, t, hdim = h.shape
    values = value_head(h.reshape(b * t, hdim), w, bias).view(b, t)
    if value_norm == "seq":
        values = masked_whiten(values, mask, True, 1e-8, dim=1)
    elif value_norm == "batch":
        values = masked_whiten(values, mask, True, 1e-8)
    else:
        values = torch.where(mask, values, 0.0)
    rewards = kl_score_rewards(mask, old, ref, kl_coef, score, values.dtype)
    adv, ret = gae(values, rewards, mask, gamma, lam)
    if whiten_adv:
        adv = masked_whiten(adv, mask, True, 1e-8)
    return adv, ret, values
