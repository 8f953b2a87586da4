"""Device choice and the autocast context of a run."""
from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device when there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when ``bf16``; parameters and optimizer state stay in their own dtype."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def generation_autocast(device: torch.device, bf16: bool):
    """The run's autocast for sampling, so decoding computes (and keeps its KV cache) in bf16 like the
    training forwards. Without autocast's weight-cast cache on CUDA: a captured decode graph would keep
    reading cached casts that are freed when the context exits (the casts are captured instead)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=device.type != "cuda")
