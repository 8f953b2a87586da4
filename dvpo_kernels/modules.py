"""nn.Module wrappers holding the loss configuration, for trainers that expect modules."""
from __future__ import annotations

import torch

from . import functional as F


class FusedPolicyLoss(torch.nn.Module):
    """``FusedPolicyLoss(clip_low=0.2, ...)(hidden, lm_head_weight, targets, old_logprobs,
    advantages, mask, ref_logprobs=None, bias=None) -> (loss, metrics)``."""

    def __init__(self, **config):
        super().__init__()
        self.config = config

    def forward(self, hidden, weight, targets, old_logprobs, advantages, mask, ref_logprobs=None, bias=None):
        return F.fused_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask,
                                   ref_logprobs=ref_logprobs, bias=bias, **self.config)


class DVPOLoss(torch.nn.Module):
    """Frozen-GVM advantages plus the fused clipped loss in one module call."""

    def __init__(self, **config):
        super().__init__()
        self.config = config

    def forward(self, policy_hidden, lm_head_weight, targets, old_logprobs, mask, gvm_hidden,
                value_weight, value_bias=None, ref_logprobs=None):
        return F.dvpo_loss(policy_hidden, lm_head_weight, targets, old_logprobs, mask, gvm_hidden,
                           value_weight, value_bias, ref_logprobs=ref_logprobs, **self.config)
