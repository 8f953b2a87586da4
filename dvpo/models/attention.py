"""Which attention a forward uses: flash-attn trains, sdpa decodes.

Training forwards of a model loaded with ``flash_attention_*`` run packed rows through the varlen
kernels; the rollout engines' static KV cache hands the attention a 4-D mask, which only
``sdpa``/``eager`` read, so decoding switches the model to ``sdpa`` for the rollout and back after.
transformers looks the implementation up on the config at every forward (4.56 and later)."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def decoding_attention(model: nn.Module):
    """``sdpa`` for the duration of the block when ``model`` is set to a flash-attn implementation."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if not (impl or "").startswith("flash_attention"):
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = impl
