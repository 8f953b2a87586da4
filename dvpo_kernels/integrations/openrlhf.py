"""OpenRLHF adapter: ``PolicyLoss`` with ``openrlhf.models.PolicyLoss``'s constructor, forward signature and
outputs ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``, computed by ``dk.policy_loss``.

Swap it in the actor: ``actor.policy_loss = PolicyLoss(clip_eps_low, clip_eps_high, dual_clip, ...)``.
Supported: ``policy_loss_type="ppo"``; the train/rollout importance-sampling correction with ``ratio``
gating at token or sequence level, as per-token weights of the loss.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import policy_loss


def _masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1) if dim is not None else (x * mask).sum() / mask.sum().clamp(min=1)


class PolicyLoss(nn.Module):
    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold=(0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type != "ppo":
            raise ValueError(f"policy_loss_type must be 'ppo', got {policy_loss_type!r}")
        if is_correction_level not in ("off", "token", "seq"):
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level!r}")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode!r}")
        if is_correction_gating != "ratio":
            raise ValueError(f"is_correction_gating must be 'ratio', got {is_correction_gating!r}")
        if is_correction_mode == "clip" and is_correction_level == "seq":
            raise ValueError("is_correction_mode=clip requires is_correction_level=token")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.token_level_loss = token_level_loss
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_threshold = tuple(is_correction_threshold)

    def _is_weights(self, old_log_probs, rollout_log_probs, mask):
        """Per-token IS weights pi_train/pi_rollout (clamped, or dropped outside the band) and the
        filtered fraction, at the unit (token or sequence) OpenRLHF gates."""
        low, high = self.is_correction_threshold
        log_is = (old_log_probs - rollout_log_probs).detach()
        seq = self.is_correction_level == "seq"
        stat = _masked_mean(log_is, mask, -1).unsqueeze(-1).exp() if seq else log_is.exp()
        if self.is_correction_mode == "clip":
            return stat.clamp(min=low, max=high), (stat < low) | (stat > high), seq
        keep = (stat >= low) & (stat <= high)
        return torch.where(keep, log_is.exp(), 0.0), ~keep, seq

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, action_mask: Tensor | None = None,
                rollout_log_probs: Tensor | None = None, dp_size: int = 1, batch_num_tokens: float | None = None,
                global_batch_size: float | None = None):
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask
        weights = vllm_kl = is_filter_ratio = None
        if self.is_correction_level != "off":
            if rollout_log_probs is None:
                raise ValueError("rollout_log_probs is required when is_correction_level is not 'off'")
            weights, filtered, seq = self._is_weights(old_log_probs, rollout_log_probs, mask)
            is_filter_ratio = filtered.float().mean() if seq else _masked_mean(filtered.float(), mask)
            vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
        if self.token_level_loss:
            total = batch_num_tokens
            agg = {"loss_agg": "token-mean"}
        else:
            total = global_batch_size
            agg = {"loss_agg": "seq-mean-token-mean"}
        if total is not None:
            agg["normalizer"] = float(total) / dp_size
        loss, m = policy_loss(log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low,
                              clip_high=self.clip_eps_high, dual_clip=self.dual_clip, is_weights=weights, **agg)
        return loss, m["clipfrac"], m["ppo_kl"], vllm_kl, is_filter_ratio
