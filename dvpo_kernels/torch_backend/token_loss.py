"""Per-token clipped policy loss and its derivative, in plain PyTorch (the twin of the kernels)."""
from __future__ import annotations

import torch

from .._params import LossParams

LOG_RATIO_BOUND = 20.0
LOW_VAR_KL_BOUND = 10.0


def token_terms(logp, entropy, old, adv, ref, p: LossParams):
    """Per-token loss ``l``, ``dl/dlogp`` and the 6 statistic rows of STAT_NAMES.

    All inputs share one float dtype. ``dl/dentropy`` is the constant ``-entropy_coef``.
    """
    lr_raw = logp - old
    lr = lr_raw.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = lr.exp()
    s1 = -adv * ratio
    s2 = -adv * ratio.clamp(1.0 - p.clip_low, 1.0 + p.clip_high)
    loss = torch.maximum(s1, s2)
    # Inside the clip range s1 == s2 and both carry -A*ratio; outside, the clipped branch
    # wins only when it is constant. The log-ratio clamp stops the gradient past +-20.
    in_range = (lr_raw >= -LOG_RATIO_BOUND) & (lr_raw <= LOG_RATIO_BOUND)
    grad = torch.where((s1 >= s2) & in_range, s1, torch.zeros_like(s1))
    zeros = torch.zeros_like(logp)
    lower = zeros
    if p.dual_clip:
        cap = -adv * p.dual_clip
        binds = (adv < 0) & (loss > cap)
        loss = torch.where(binds, cap, loss)
        grad = torch.where(binds, zeros, grad)
        lower = binds.to(logp.dtype)
    kl = zeros
    if ref is not None:
        d = ref - logp
        if p.kl_type == "k1":
            kl, dkl = -d, torch.ones_like(d)
        elif p.kl_type == "k2":
            kl, dkl = 0.5 * d * d, -d
        elif p.kl_type == "k3":
            e = d.exp()
            kl, dkl = e - d - 1.0, 1.0 - e
        elif p.kl_type == "abs":
            kl, dkl = d.abs(), -d.sign()
        else:  # low_var_kl, as verl clamps it: d to [-20, 20], k3 to <= 10; no gradient where one binds
            dc = d.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
            e = dc.exp()
            k3 = e - dc - 1.0
            kl = k3.clamp(max=LOW_VAR_KL_BOUND)
            live = (d >= -LOG_RATIO_BOUND) & (d <= LOG_RATIO_BOUND) & (k3 <= LOW_VAR_KL_BOUND)
            dkl = torch.where(live, 1.0 - e, zeros)
        if p.kl_coef:
            loss = loss + p.kl_coef * kl
            grad = grad + p.kl_coef * dkl
    ent = zeros
    if entropy is not None:
        ent = entropy
        if p.entropy_coef:
            loss = loss - p.entropy_coef * entropy
    stats = torch.stack([(s2 > s1).to(logp.dtype), ratio, old - logp, kl, ent, lower])
    return loss, grad, stats


def policy_loss(logp, entropy, old, adv, weight, mask, ref, p: LossParams):
    """Returns (loss, stat sums [6], dloss/dlogp, dloss/dentropy or None), all in logp's dtype."""
    l, g, stats = token_terms(logp, entropy, old, adv, ref, p)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # where(), not multiply: garbage (NaN/Inf) on masked tokens must not leak into the loss.
    loss = torch.where(mask, weight * l, zero).sum()
    stat_sums = torch.where(mask, stats, zero).sum(dim=1)
    g_logp = torch.where(mask, weight * g, zero)
    g_ent = torch.where(mask, -p.entropy_coef * weight, zero) if entropy is not None else None
    return loss, stat_sums, g_logp, g_ent
