"""A LoRA model's gathered state dict with its adapters merged: what an FSDP2-sharded LoRA run exports
(``merge_and_unload`` needs the whole model on one rank; the gathered state dict is that already)."""
from __future__ import annotations

from torch import Tensor, nn

_PREFIX = "base_model.model."


def merged_state_dict(state: dict[str, Tensor], peft_model: nn.Module) -> dict[str, Tensor]:
    """``state`` (keys of ``peft_model``) -> the base model's keys and weights, ``W + (alpha / r) B A`` for
    every adapted linear layer, the adapters themselves dropped."""
    config = peft_model.peft_config["default"]
    if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False):
        raise ValueError("merging a sharded LoRA export supports plain LoRA only (no rsLoRA, no DoRA)")
    scale = config.lora_alpha / config.r
    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            stem = key.split(".base_layer.")[0]
            if key.endswith(".weight"):
                a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
                value = value + (scale * (b.float() @ a.float())).to(value.dtype)
            key = key.replace(".base_layer.", ".")
        out[key.removeprefix(_PREFIX)] = value
    return out
