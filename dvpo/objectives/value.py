"""Token-level value objectives: regression targets, the masked value loss, pairwise terms and metrics.

Tensors are per state, ``[B, T]`` with ``mask`` marking the states before response tokens (see
:mod:`dvpo.data.collate`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import dvpo_kernels as dk

TARGETS = ("td_lambda", "mc")


@torch.no_grad()
def value_targets(values: Tensor, rewards: Tensor, mask: Tensor, *, target: str = "td_lambda", gamma: float = 1.0,
                  lam: float = 0.95) -> Tensor:
    """Regression targets for V (fp32, 0 on masked states).

    ``td_lambda``: GAE lambda-returns ``R_t = A_t + V_t`` bootstrapped from ``values`` (a no-grad pass of
    the current model). ``mc``: the discounted return-to-go of ``rewards`` (lambda = 1 with V = 0), i.e.
    the final reward at every state when ``gamma = 1``."""
    if target == "td_lambda":
        return dk.gae(values, rewards, mask, gamma=gamma, lam=lam)[1]
    if target == "mc":
        return dk.gae(torch.zeros_like(values), rewards, mask, gamma=gamma, lam=1.0)[1]
    raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")


def value_loss(values: Tensor, targets: Tensor, mask: Tensor, normalizer) -> Tensor:
    """``0.5 * sum(mask * (V - R)^2) / normalizer``; the normaliser is the token count of the whole
    update, so splitting it into micro-batches leaves the gradient unchanged."""
    err = torch.where(mask, values.float() - targets, 0.0)
    return 0.5 * (err * err).sum() / normalizer


def last_state_index(mask: Tensor) -> Tensor:
    """Per row, the column of its last valid state (0 for an empty row)."""
    return mask.long().cumsum(-1).argmax(-1)


def last_values(values: Tensor, mask: Tensor) -> Tensor:
    """``[B]``: the value of each row's last state (before its final token), the one its reward lands on."""
    return values.gather(-1, last_state_index(mask)[:, None]).squeeze(-1)


def last_token_scores(values: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B]``: a reward model's score, the head's output at each row's last real token (its EOS);
    ``values`` ``[B, L]`` over all positions. Works for right- and left-padded rows alike."""
    index = attention_mask.shape[1] - 1 - attention_mask.long().flip(-1).argmax(-1)
    return values.gather(-1, index[:, None]).squeeze(-1)


def mean_values(values: Tensor, mask: Tensor) -> Tensor:
    """``[B]``: each row's mean value over its valid states."""
    return torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def pairwise_loss(scores: Tensor, pairs: Tensor) -> Tensor:
    """Bradley-Terry ``sum -logsigmoid(s_chosen - s_rejected)`` over ``pairs`` ``[P, 2]`` of row indices."""
    return -F.logsigmoid(scores[pairs[:, 0]] - scores[pairs[:, 1]]).sum()


def pair_wins(scores: Tensor, pairs: Tensor) -> Tensor:
    """Per pair: 1 when the chosen row scores higher, 0.5 on a tie, 0 otherwise."""
    c, r = scores[pairs[:, 0]], scores[pairs[:, 1]]
    return (c > r).float() + 0.5 * (c == r).float()
