"""The base of the policy and value wrappers: a Hugging Face model, possibly inside a PEFT LoRA model."""
from __future__ import annotations

from torch import Tensor, nn

from .packing import packed_backbone, should_pack


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

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None) -> Tensor:
        """The backbone's final hidden states ``[B, L, H]``; one padding-free packed forward when
        ``train.packing`` allows it (zeros at the padding), else the padded forward."""
        if should_pack(self.hf_model, attention_mask, position_ids):
            return packed_backbone(self.backbone, input_ids, attention_mask)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
