"""Training objectives of the stages, on top of dvpo_kernels."""
from .preference import PREFERENCE_LOSSES, implicit_rewards, preference_loss, value_incentive
from .value import (
    TARGETS,
    last_state_index,
    last_token_scores,
    last_values,
    mean_values,
    pair_wins,
    pairwise_loss,
    value_loss,
    value_targets,
)

__all__ = ["PREFERENCE_LOSSES", "TARGETS", "implicit_rewards", "last_state_index", "last_token_scores", "last_values",
           "mean_values", "pair_wins", "pairwise_loss", "preference_loss", "value_incentive", "value_loss",
           "value_targets"]
