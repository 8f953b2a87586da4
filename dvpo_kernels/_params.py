"""Hyper-parameters of the clipped policy loss, as passed to every backend."""
from __future__ import annotations

from typing import NamedTuple

# Masked sums every backend returns next to the loss; the functional API divides by the
# valid-token count. Order matters: kernels write them by index.
STAT_NAMES = ("clipfrac", "ratio_mean", "ppo_kl", "kl", "entropy", "clipfrac_lower")
KL_TYPE_IDS = {"k1": 1, "k2": 2, "k3": 3, "abs": 4, "low_var_kl": 5}
# verl's names for our KL estimators (verl's low_var_kl is k3 with clamps, so it keeps its own id).
KL_ALIASES = {"kl": "k1", "mse": "k2"}


class LossParams(NamedTuple):
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0  # 0 = off, else the constant c > 1
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
