"""Data parallelism for the trained model: FSDP2 (``fully_shard``) or replicas whose gradients are
averaged in buckets during backward (:mod:`.grad_sync`, DDP's scheme).

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
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from . import distributed, grad_sync

PARALLEL_MODES = ("auto", "fsdp", "replicate")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (``backbone.layers``)."""
    backbone = getattr(hf_model, hf_model.base_model_prefix)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ValueError(f"{type(hf_model).__name__}: no decoder layers found to shard (expected backbone.layers)")
    return list(layers)


_bf16 = False


def set_mixed_precision(bf16: bool) -> None:
    """Whether :func:`shard` gives the decoder layers an FSDP2 bf16 mixed-precision policy (bf16 runs)."""
    global _bf16
    _bf16 = bf16


def use_fsdp(mode: str) -> bool:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    return distributed.is_distributed() and mode in ("auto", "fsdp")


def distribute(wrapper: nn.Module, hf_model: nn.Module, mode: str, *forward_args) -> nn.Module:
    """A trained model under torchrun: FSDP2-sharded (``fsdp``, ``auto``; LoRA models too, their frozen
    base weights sharded like the rest), or a replica (``replicate``) whose trainable parameters'
    gradients :class:`grad_sync.GradientBuckets` all-reduces. Unchanged in one process."""
    if use_fsdp(mode):
        return shard(wrapper, hf_model, *forward_args)
    grad_sync.replicate([p for p in wrapper.parameters() if p.requires_grad])
    return wrapper


def shard(wrapper: nn.Module, hf_model: nn.Module, *forward_args) -> nn.Module:
    """``fully_shard`` each decoder layer of ``hf_model``, then ``wrapper`` as the root.

    One token goes through ``wrapper(ids, mask, *forward_args)`` at once: FSDP2 sets its root up on the
    first forward it sees, and that must be the wrapper's, not a layer's reached first by generation."""
    # bf16 runs gather the layers' weights in bf16 (half the all-gather) and reduce gradients in fp32; the
    # root (embeddings, final norm, heads) stays fp32 like under autocast
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if _bf16 else None
    for layer in decoder_layers(hf_model):
        fully_shard(layer, **({"mp_policy": policy} if policy else {}))
    fully_shard(wrapper)
    device = next(hf_model.parameters()).device
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        wrapper(one, one, *forward_args)
    wrapper.reshard()  # the root keeps its parameters gathered after a forward; the optimizer needs the shards
    return wrapper


def is_sharded(model: nn.Module) -> bool:
    """``model`` holds FSDP2-sharded parameters (itself, or submodules such as PPO's policy and critic)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def optimizers_of(optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers behind ``optimizer`` (a :class:`~dvpo.trainer.optim.Bundle` holds several)."""
    members = getattr(optimizer, "members", None)
    return list(members.values()) if members is not None else [optimizer]


@contextlib.contextmanager
def gathered_root(model: nn.Module, layers: bool = False):
    """Hold the root's own parameters gathered, for code that calls submodules directly (the backbone
    without the wrapper's forward); the layers still gather themselves in their forward. ``layers``:
    gather every layer once for the whole block (generation: one all-gather per rollout instead of one
    per layer per generated token, at the cost of holding the full model)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if layers else [model]
    for unit in units:
        if layers:
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            if layers:
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on rank 0 (empty elsewhere); a collective: every rank calls it."""
    _reshard(model)
    return get_model_state_dict(model, options=_FULL)


def sharded_state(model: nn.Module, optimizer) -> dict:
    """Model and optimizer state as each rank holds it (its shards of sharded tensors, keyed by parameter
    name): what ``torch.distributed.checkpoint`` saves, and loads back resharded for any rank count."""
    _reshard(model)
    model_state, optim_state = get_state_dict(model, optimizers_of(optimizer))
    return {"model": model_state, "optimizer": optim_state}


def _reshard(model: nn.Module) -> None:
    """Put every unit's sharded parameters (the optimizer's) back on the modules: replicas, and roots after
    a no-grad forward, keep the gathered ones registered until their next backward."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def load_sharded_state(model: nn.Module, optimizer, state: dict) -> None:
    _reshard(model)
    set_state_dict(model, optimizers_of(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
