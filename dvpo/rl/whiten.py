"""Whitening over the global batch: statistics summed over data-parallel ranks, so a run whitens the
same way on one GPU or eight (``dvpo_kernels.masked_whiten`` sees only this rank's rows)."""
from __future__ import annotations

import torch
from torch import Tensor

import dvpo_kernels as dk

from ..trainer import distributed


def batch_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``masked_whiten(x, mask)`` over every rank's valid entries (unbiased variance, masked entries 0)."""
    if not distributed.is_distributed():
        return dk.masked_whiten(x, mask, eps=eps)
    xs = torch.where(mask, x.double(), 0.0)
    total, squares, count = distributed.all_reduce_(torch.stack([xs.sum(), (xs * xs).sum(),
                                                                 mask.double().sum()]))
    mean = total / count.clamp(min=1)
    var = (squares - count * mean * mean) / (count - 1).clamp(min=1)
    return torch.where(mask, (x.double() - mean) * torch.rsqrt(var + eps), 0.0).float()
