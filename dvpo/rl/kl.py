"""KL coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al. 2019)."""
from __future__ import annotations


class KLController:
    """``value`` is the current coefficient. Adaptive: after a batch of ``n`` sequences with mean
    sequence KL ``kl``, ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, coef: float, *, adaptive: bool = True, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = float(coef), adaptive, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
