"""Data parallelism for the trained model: FSDP2 (``fully_shard``) or replicas with averaged gradients.

Under ``torchrun`` with ``train.parallel: fsdp`` (the default when there is more than one rank) every
decoder layer is its own FSDP2 unit and the wrapper module (embeddings, final norm, heads) the root, so
a forward gathers one layer at a time. Heads are computed inside the wrapper's forward, where the
root's parameters are gathered. Checkpoints hold full (unsharded) state dicts, so a run saved on N
ranks resumes on any number, and exports load with ``from_pretrained``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from . import distributed

PARALLEL_MODES = ("auto", "fsdp", "replicate")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (``backbone.layers``)."""
    backbone = getattr(hf_model, hf_model.base_model_prefix)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ValueError(f"{type(hf_model).__name__}: no decoder layers found to shard (expected backbone.layers)")
    return list(layers)


def use_fsdp(mode: str) -> bool:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    return distributed.is_distributed() and mode in ("auto", "fsdp")


def shard(wrapper: nn.Module, hf_model: nn.Module, *forward_args) -> nn.Module:
    """``fully_shard`` each decoder layer of ``hf_model``, then ``wrapper`` as the root.

    One token goes through ``wrapper(ids, mask, *forward_args)`` at once: FSDP2 sets its root up on the
    first forward it sees, and that must be the wrapper's, not a layer's reached first by generation."""
    for layer in decoder_layers(hf_model):
        fully_shard(layer)
    fully_shard(wrapper)
    device = next(hf_model.parameters()).device
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        wrapper(one, one, *forward_args)
    wrapper.reshard()  # the root keeps its parameters gathered after a forward; the optimizer needs the shards
    return wrapper


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered_root(model: nn.Module):
    """Hold the root's own parameters gathered, for code that calls submodules directly (generation);
    the layers still gather themselves in their forward."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on rank 0 (empty elsewhere); a collective: every rank calls it."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optim_state: dict | None) -> None:
    """Load full state dicts into a sharded model (and its optimizer); every rank calls it."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
