"""The pure-PyTorch backend: runs everywhere, chunked so it never holds [N, V]."""
from .advantages import dvpo_advantages, gae, masked_whiten, value_head
from .linear import fused_policy_loss, linear_logprobs, linear_logprobs_backward
from .token_loss import policy_loss

OPS = {
    "linear_logprobs": linear_logprobs,
    "linear_logprobs_backward": linear_logprobs_backward,
    "fused_policy_loss": fused_policy_loss,
    "policy_loss": policy_loss,
    "value_head": value_head,
    "gae": gae,
    "masked_whiten": masked_whiten,
    "dvpo_advantages": dvpo_advantages,
}


def unsupported(device):
    return None
