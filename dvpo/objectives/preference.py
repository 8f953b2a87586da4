"""Preference-optimisation objectives on sequence log-probs: DPO (sigmoid), IPO and VPO's value term.

Inputs are per-pair (or per-sample) log-probs ``[P]`` of the policy and of the frozen reference; the
functions return per-pair (per-sample) terms in fp32, so a caller normalises by the pair count of its
whole batch and micro-batches accumulate to the full-batch gradient.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

PREFERENCE_LOSSES = ("sigmoid", "ipo")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-prob tensors must have one shape, got {shapes}")


def preference_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
                    beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> Tensor:
    """Per-pair losses ``[P]`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

    ``sigmoid`` (DPO): ``-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)`` (``eps`` =
    ``label_smoothing``, the conservative DPO of a label-noise rate eps); ``ipo``: ``(h - 1 / (2 * beta))^2``.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {', '.join(PREFERENCE_LOSSES)}, got {loss_type!r}")
    _check_positive("beta", beta)
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only; it must be 0 with loss_type='ipo'")
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                      ref_rejected=ref_rejected)
    h = (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward ``beta * (log pi - log pi_ref)`` (detached: a metric)."""
    _check_positive("beta", beta)
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    return beta * (policy_logps.detach().float() - ref_logps.float())


def value_incentive(policy_logps: Tensor, ref_logps: Tensor, *, alpha: float, beta: float, sign: int) -> Tensor:
    """VPO's value term per calibration sample ``[N]``: ``sign * alpha * beta * (log pi(y|x) - log pi_ref(y|x))``
    with ``y ~ pi_cal``. Its mean over the samples is added to the preference loss: ``sign=+1`` (online,
    optimistic) pushes the policy away from pi_cal's responses, ``sign=-1`` (offline, pessimistic) toward them."""
    if sign not in (-1, 1):
        raise ValueError(f"sign must be -1 (offline, pessimistic) or +1 (online, optimistic), got {sign!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    _check_positive("beta", beta)
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    return (sign * alpha * beta) * (policy_logps.float() - ref_logps.float())
