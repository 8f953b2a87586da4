"""Float64 reference implementations: dense, loop-based, written from DESIGN.md alone.

They materialise [N, V] logits and walk rows in Python: slow and simple on purpose. Tests
and ``python -m dvpo_kernels`` check every backend against them; autograd through them gives
the reference gradients.
"""
from __future__ import annotations

import torch


def linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, mask=None, softcap=None, scale=None):
    """Targets where ``mask`` is 0 are ignored whatever their value (their rows read column 0).
    logits = softcap * tanh((h @ W^T + b) * scale / softcap) / temperature."""
    if mask is not None:
        targets = torch.where(mask.bool(), targets, 0)
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def policy_loss(logp, old, adv, mask, ref=None, clip_low=0.2, clip_high=0.2, dual_clip=None,
                kl_coef=0.0, kl_type="k3", entropy=None, entropy_coef=0.0, loss_agg="token-mean",
                normalizer=None, is_weights=None, loss_scale_factor=None):
    """``old`` None: on-policy, old = logp without gradient. ``adv`` / ``is_weights`` of shape [B]
    broadcast over a row's tokens; ``is_weights`` multiply each token's loss, without gradient."""
    logp = logp.double()
    old = logp.detach() if old is None else old.double()
    adv = adv.double()
    if adv.dim() < logp.dim():
        adv = adv[:, None].expand_as(logp)
    m = mask.double()
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    l = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        l = torch.where(adv < 0, torch.minimum(l, -adv * dual_clip), l)
    if ref is not None and kl_coef:
        d = ref.double() - logp
        kl_type = {"kl": "k1", "mse": "k2"}.get(kl_type, kl_type)
        if kl_type == "low_var_kl":  # verl's clamps
            dc = torch.clamp(d, -20, 20)
            kl = torch.clamp(torch.exp(dc) - dc - 1, min=-10, max=10)
        else:
            kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1, "abs": d.abs()}[kl_type]
        l = l + kl_coef * kl
    if entropy is not None and entropy_coef:
        l = l - entropy_coef * entropy.double()
    if is_weights is not None:
        w = is_weights.double().detach()
        l = l * (w[:, None].expand_as(l) if w.dim() < l.dim() else w)
    l = torch.where(m > 0, l, torch.zeros_like(l))
    if loss_agg == "seq-mean-token-sum-norm":  # Dr. GRPO: every row's sum over one constant, mean over rows
        rows = m.shape[0] if m.dim() == 2 else 1
        return (l * m).sum() / (loss_scale_factor if loss_scale_factor is not None else m.shape[-1]) / rows
    if loss_agg == "token-mean":
        return (m * l).sum() / (normalizer if normalizer is not None else max(float(m.sum()), 1.0))
    rows_l, rows_m = (l, m) if l.dim() == 2 else (l[None], m[None])
    per_row = []
    for lr, mr in zip(rows_l, rows_m):
        cnt = float(mr.sum())
        if cnt == 0:
            continue
        s = (lr * mr).sum()
        per_row.append(s / cnt if loss_agg == "seq-mean-token-mean" else s)
    if not per_row:
        return l.sum() * 0.0
    denom = normalizer if normalizer is not None else len(per_row)
    return torch.stack(per_row).sum() / denom


def value_head(hidden, weight, bias=None):
    v = hidden.double() @ weight.double().reshape(-1)
    if bias is None:
        return v
    return v + (bias.double().reshape(()) if isinstance(bias, torch.Tensor) else float(bias))


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    x = x.double()
    sel = x[mask.bool()]
    out = torch.zeros_like(x)
    if sel.numel() == 0:
        return out
    mean = sel.mean()
    var = ((sel - mean) ** 2).sum() / max(sel.numel() - 1, 1)
    w = (sel - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        w = w + mean
    out[mask.bool()] = w
    return out


def gae(values, rewards, mask, gamma=1.0, lam=0.95):
    values, rewards = values.double(), rewards.double()
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(values.shape[1])):
            if not bool(mask[b, t]):
                continue
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            a = delta + gamma * lam * next_a
            adv[b, t] = a
            next_v, next_a = float(values[b, t]), a
    returns = torch.where(mask.bool(), adv + values, torch.zeros_like(adv))
    return adv, returns


def dvpo_advantages(gvm_hidden, value_weight, value_bias, mask, old_logprobs=None, ref_logprobs=None,
                    kl_coef=0.0, score=None, gamma=1.0, lam=0.95, value_norm="seq", whiten_advantages=True):
    mask = mask.bool()
    values = value_head(gvm_hidden, value_weight, value_bias)
    if value_norm == "seq":
        values = torch.stack([masked_whiten(values[b], mask[b]) for b in range(values.shape[0])])
    elif value_norm == "batch":
        values = masked_whiten(values, mask)
    else:
        values = torch.where(mask, values, torch.zeros_like(values))
    rewards = torch.zeros_like(values)
    if ref_logprobs is not None:
        rewards = torch.where(mask, -kl_coef * (old_logprobs.double() - ref_logprobs.double()), rewards)
    if score is not None:
        for b in range(values.shape[0]):
            valid = mask[b].nonzero()
            if valid.numel():
                rewards[b, int(valid[-1])] += float(score[b])
    adv, ret = gae(values, rewards, mask, gamma, lam)
    if whiten_advantages:
        adv = masked_whiten(adv, mask)
    return adv, ret, values
