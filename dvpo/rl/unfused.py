"""The unfused way common RLHF frameworks compute the same quantities, for like-for-like comparisons:
a full ``[B, T, V]`` logits tensor with ``log_softmax``, and GAE as a Python loop over positions.

Numbers match the fused ops (tests check it); only memory and time differ.
"""
from __future__ import annotations

import torch
from torch import Tensor


def logits_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                    temperature: float = 1.0, return_entropy: bool = False):
    """Log-probs (and entropies) of ``targets`` through materialised logits ``[B, T, V]``."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening with the unbiased variance, as frameworks write it."""
    mask = mask.float()
    mean = masked_mean(x, mask)
    var = (((x - mean) ** 2) * mask).sum() / (mask.sum() - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def loop_gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over right-padded rows, one Python iteration per position (the frameworks' loop)."""
    mask = mask.float()
    values, rewards = values * mask, rewards * mask
    last = torch.zeros(values.shape[0], device=values.device)
    out = []
    for t in reversed(range(values.shape[1])):
        next_v = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1) * mask
    return adv, (adv + values) * mask


def kl_rewards(mask: Tensor, old_logprobs: Tensor | None, ref_logprobs: Tensor | None, kl_coef: float,
               score: Tensor | None) -> Tensor:
    """``-kl_coef * (old - ref)`` per token plus ``score`` on each row's last valid token."""
    rewards = torch.zeros(mask.shape, device=mask.device)
    if ref_logprobs is not None:
        rewards = rewards - kl_coef * (old_logprobs - ref_logprobs)
    if score is not None:
        last = mask.long().cumsum(-1).argmax(-1)
        rewards[torch.arange(mask.shape[0], device=mask.device), last] += score
    return rewards * mask


def dvpo_advantages(values: Tensor, mask: Tensor, *, old_logprobs=None, ref_logprobs=None, kl_coef=0.0, score=None,
                    gamma=1.0, lam=0.95, value_norm="seq", whiten_advantages=True):
    """The official DVPO recipe, written out step by step (frozen values ``[B, R]`` already projected)."""
    maskf = mask.float()
    if value_norm == "seq":
        values = torch.stack([whiten(values[b], maskf[b]) for b in range(values.shape[0])])
    elif value_norm == "batch":
        values = whiten(values, maskf)
    else:
        values = values * maskf
    rewards = kl_rewards(mask, old_logprobs, ref_logprobs, kl_coef, score)
    adv, ret = loop_gae(values, rewards, mask, gamma, lam)
    if whiten_advantages:
        adv = whiten(adv, maskf)
    return adv, ret, values
