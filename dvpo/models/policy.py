"""A causal LM used as a policy: loading, final hidden states, and heads that never build logits.

Every token-level quantity the stages need (log-probs, entropies, the fused PPO loss, the SFT and DPO
losses) is a function of the final hidden states and the LM-head weight, computed by ``dvpo_kernels``.
:meth:`PolicyModel.forward` runs the backbone and hands ``(hidden, weight, bias)`` to a head function
*inside* the module's forward, so under FSDP2 the head sees the gathered LM-head weight and its
gradient flows back through the sharded parameter like any other.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

import dvpo_kernels as dk

from .build import DTYPES, attn_implementation, config_from_fields, train_top_layers
from .config import ModelConfig
from .lora_merge import merged_state_dict
from .wrapper import HFWrapper

HeadFn = Callable[[Tensor, Tensor, Tensor | None], object]


def load_causal_lm(cfg: ModelConfig, tokenizer, device: torch.device) -> nn.Module:
    """A ``*ForCausalLM`` from ``cfg.path``, or a new one built from ``cfg``'s fields."""
    kwargs = {"attn_implementation": attn_implementation(cfg.attn_implementation, device), "dtype": DTYPES[cfg.dtype]}
    if cfg.path is None:
        model = AutoModelForCausalLM.from_config(config_from_fields(cfg, tokenizer), **kwargs)
    else:
        config = AutoConfig.from_pretrained(cfg.path)
        if not any(a.endswith("ForCausalLM") for a in config.architectures or []):
            raise ValueError(f"model.path={cfg.path!r} holds a {config.architectures} model, not a causal LM")
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    train_top_layers(model, cfg.trainable_layers)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.to(device)


class PolicyModel(HFWrapper):
    """Wraps a Hugging Face causal LM (possibly a PEFT LoRA model); ``hf_model`` is what generation runs."""

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf_model.get_output_embeddings()

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.module, "disable_adapter")

    def adapter_disabled(self):
        """Context in which the model computes as its frozen base (the reference policy under LoRA)."""
        return self.module.disable_adapter() if self.has_adapter else contextlib.nullcontext()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, head: HeadFn, position_ids: Tensor | None = None):
        """``head(hidden [B, L, H], lm_head.weight, lm_head.bias)`` on the final hidden states."""
        hidden = self.encode(input_ids, attention_mask, position_ids)
        lm_head = self.lm_head
        return head(hidden, lm_head.weight, lm_head.bias)

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor, start: int, *,
                       position_ids: Tensor | None = None, temperature: float = 1.0,
                       return_entropy: bool = False, memory: str = "speed"):
        """Log-probs ``[B, T]`` of ``targets`` (= ``input_ids[:, start:start+T]``) from the hidden states
        at positions ``start-1 .. start+T-2`` (each token from the state before it); fp32."""
        width = targets.shape[1]

        def head(hidden, weight, bias):
            return dk.linear_logprobs(hidden[:, start - 1:start - 1 + width], weight, targets, bias=bias,
                                      temperature=temperature, return_entropy=return_entropy, memory=memory)

        return self(input_ids, attention_mask, head, position_ids)

    @torch.no_grad()
    def export(self, folder: str | Path, tokenizer, state_dict: dict | None = None) -> None:
        """``save_pretrained`` (safetensors) plus the tokenizer; LoRA adapters are merged first.
        ``state_dict``: this wrapper's gathered full state when it is FSDP2-sharded."""
        if state_dict is not None:
            state = {k.removeprefix("module."): v for k, v in state_dict.items()}
            self.hf_model.save_pretrained(folder, state_dict=merged_state_dict(state, self.module)
                                          if self.has_adapter else state)
        else:
            if hasattr(self.module, "merge_and_unload"):
                self.module = self.module.merge_and_unload()
            self.module.save_pretrained(folder)
        tokenizer.save_pretrained(folder)



def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and every id of the model's
    ``generation_config.eos_token_id`` (Llama 3 ends turns with ``<|eot_id|>``, ChatML models with
    ``<|im_end|>``, neither of which is always the tokenizer's EOS)."""
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id] + (list(extra) if isinstance(extra, (list, tuple)) else [extra])
    return list(dict.fromkeys(i for i in ids if i is not None))


def masked_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, mask: Tensor, *,
                    return_entropy: bool = False, **kw):
    """``[B, T]`` log-probs of ``targets`` from ``hidden`` ``[B, T, H]`` at the ``mask`` positions (0 elsewhere),
    and the entropies with ``return_entropy``. Only the masked-in rows go through the LM head: prompts and
    padding cost no GEMM work. ``kw``: ``temperature``, ``memory`` of ``dvpo_kernels.linear_logprobs``."""
    rows = mask.reshape(-1).nonzero().squeeze(1)
    out = dk.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), weight,
                             targets.reshape(-1).index_select(0, rows), bias=bias, return_entropy=return_entropy, **kw)

    def scatter(x: Tensor) -> Tensor:
        return torch.zeros(mask.numel(), dtype=x.dtype, device=x.device).index_put((rows,), x).view(mask.shape)

    return tuple(map(scatter, out)) if return_entropy else scatter(out)
