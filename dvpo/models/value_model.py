"""A token-level value model: a transformer backbone and a scalar head, values in fp32."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

import dvpo_kernels as dk

from .lora_merge import merged_state_dict
from .wrapper import HFWrapper

KIND_KEY = "dvpo_value_model"
KINDS = ("gvm", "reward_model", "critic")


class ValueModel(HFWrapper):
    """Wraps a Hugging Face ``*ForTokenClassification`` with one label (its ``score`` head is the value
    head), possibly inside a PEFT LoRA model. ``forward`` returns the value at every position,
    computed by ``dvpo_kernels.value_head`` in fp32 whatever the compute dtype; the numbers are
    those of the wrapped model's own forward (its logits)."""

    @property
    def head(self) -> nn.Linear:
        return self.hf_model.score

    @property
    def kind(self) -> str:
        """What the model was trained as, saved in its ``config.json``: ``gvm`` (values of the states
        before response tokens) or ``reward_model`` (a score at the final token; also folders that predate
        the field)."""
        return getattr(self.hf_model.config, KIND_KEY, "reward_model")

    @kind.setter
    def kind(self, value: str) -> None:
        if value not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {value!r}")
        setattr(self.hf_model.config, KIND_KEY, value)

    @property
    def is_gvm(self) -> bool:
        return self.kind == "gvm"

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Final hidden states ``[B, L, H]`` (the states the value head reads). Left-padded rows need
        ``position_ids`` (see :func:`dvpo.rollout.position_ids_from_mask`)."""
        return self.encode(input_ids, attention_mask, position_ids)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Values ``[B, L]`` fp32: position ``t`` holds the value of the state before token ``t + 1``."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        return dk.value_head(hidden, self.head.weight, self.head.bias)

    @torch.no_grad()
    def export(self, folder: str | Path, tokenizer, state_dict: dict | None = None) -> None:
        """``save_pretrained`` (safetensors) plus the tokenizer: loads with
        ``AutoModelForTokenClassification.from_pretrained(folder)``. LoRA adapters are merged first
        (the wrapped module becomes the merged model). ``state_dict``: the gathered full state of an
        FSDP2-sharded model (keys of the wrapper or of the wrapped module)."""
        if state_dict is not None:
            state = {k.removeprefix("module."): v for k, v in state_dict.items()}
            lora = hasattr(self.module, "peft_config")
            self.hf_model.save_pretrained(folder, state_dict=merged_state_dict(state, self.module) if lora else state)
        else:
            if hasattr(self.module, "merge_and_unload"):
                self.module = self.module.merge_and_unload()
            self.module.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
