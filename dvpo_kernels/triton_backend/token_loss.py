"""The unfused clipped policy loss on given log-probs: one Triton pass over the tokens."""
from __future__ import annotations

import torch
import triton

from .._params import KL_TYPE_IDS, LossParams
from . import tiles
from .linear import on_device
from .token_kernels import KL_NONE, N_TERMS, policy_loss_kernel


def policy_loss(logp, entropy, old, adv, weight, mask, ref, p: LossParams):
    """Returns (loss, stat sums [6], dloss/dlogp, dloss/dentropy or None), all in logp's dtype."""
    logp, old, adv, weight = (t.contiguous() for t in (logp, old, adv, weight))
    entropy = None if entropy is None else entropy.contiguous()
    ref = None if ref is None else ref.contiguous()
    n = logp.numel()
    g_logp = torch.empty_like(logp)
    g_ent = None if entropy is None else torch.empty_like(logp)
    block = tiles.TOKEN_BLOCK
    blocks = triton.cdiv(n, block)
    # Per-block sums, added up below: deterministic, unlike atomics.
    part = logp.new_zeros((max(blocks, 1), N_TERMS))
    if n:
        with on_device(logp):
            policy_loss_kernel[(blocks,)](
                logp, entropy, old, adv, weight, mask.contiguous().view(torch.uint8), ref, part, g_logp, g_ent, n,
                1.0 - p.clip_low, 1.0 + p.clip_high, p.dual_clip, p.kl_coef, p.entropy_coef,
                HAS_ENT=entropy is not None, KL_TYPE=KL_NONE if ref is None else KL_TYPE_IDS[p.kl_type],
                DUAL=bool(p.dual_clip), KL_IN_LOSS=ref is not None and bool(p.kl_coef),
                ENT_IN_LOSS=entropy is not None and bool(p.entropy_coef), BLOCK=block)
    return part[:, 0].sum(), part[:, 1:].sum(0), g_logp, g_ent
