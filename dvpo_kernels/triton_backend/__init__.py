"""The Triton backend: the LM-head log-prob / entropy / policy-loss ops as cuBLAS GEMMs with
fused Triton epilogues, and the per-token policy loss as one Triton pass.

Importing it needs ``triton``; an ImportError propagates and ``dvpo_kernels._backends``
reports it as the reason the backend is unavailable. ``probe`` checks each CUDA device once
before its first use (dvpo_kernels/triton_backend/probe.py).
"""
import os

import torch
from triton.runtime.interpreter import InterpretedFunction

from .linear import fused_policy_loss, linear_logprobs, linear_logprobs_backward
from .probe import probe
from .row_kernels import logprob_rows_kernel
from .token_loss import policy_loss

OPS = {
    "linear_logprobs": linear_logprobs,
    "linear_logprobs_backward": linear_logprobs_backward,
    "fused_policy_loss": fused_policy_loss,
    "policy_loss": policy_loss,
}


def unsupported(device) -> str | None:
    """None on CUDA devices (``probe`` then checks each one); CPU tensors only under the Triton
    interpreter (how CI tests the kernels)."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"Triton kernels run on CUDA devices, not {device.type}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CUDA devices; CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if not isinstance(logprob_rows_kernel, InterpretedFunction):
        return ("TRITON_INTERPRET=1 was set after dvpo_kernels.triton_backend was imported; "
                "set it before importing dvpo_kernels")
    return None
