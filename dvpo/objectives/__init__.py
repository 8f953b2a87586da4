"""Training objectives of the stages, on top of dvpo_kernels."""
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

__all__ = ["TARGETS", "last_state_index", "last_token_scores", "last_values", "mean_values", "pair_wins", "pairwise_loss", "value_loss",
           "value_targets"]
