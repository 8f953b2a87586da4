"""dvpo_kernels: fused ops for DVPO and PPO-style RLHF (see DESIGN of each op in functional.py)."""
from ._backends import report as backend_report
from ._config import set_max_block_elements
from .functional import (
    aggregation_weights,
    dvpo_advantages,
    dvpo_loss,
    fused_policy_loss,
    gae,
    linear_logprobs,
    masked_whiten,
    policy_loss,
    value_head,
)
from .modules import DVPOLoss, FusedPolicyLoss

__version__ = "0.1.0"

__all__ = [
    "linear_logprobs", "policy_loss", "fused_policy_loss", "value_head", "gae", "masked_whiten",
    "dvpo_advantages", "dvpo_loss", "aggregation_weights", "FusedPolicyLoss", "DVPOLoss",
    "backend_report", "set_max_block_elements",
]
