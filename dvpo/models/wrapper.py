"""The base of the policy and value wrappers: a Hugging Face model, possibly inside a PEFT LoRA model."""
from __future__ import annotations

from torch import nn


class HFWrapper(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    @property
    def hf_model(self) -> nn.Module:
        """The Hugging Face model itself (under LoRA: with the adapters in it)."""
        return self.module.get_base_model() if hasattr(self.module, "get_base_model") else self.module

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its head (``model.model`` for Llama/Qwen2)."""
        hf = self.hf_model
        return getattr(hf, hf.base_model_prefix)
