"""Hugging Face causal LMs whose forward returns per-token log-probs (and entropies) computed from the
final hidden states by ``linear_logprobs``: the ``[tokens, vocab]`` logits are never built.

``apply_dvpo_kernels(model)`` patches one model (a PEFT model's base model too), ``apply_dvpo_kernels(
LlamaForCausalLM)`` every model of a class, like Liger's ``apply_liger_kernel_to_*``. The patched forward
switches only when ``labels`` or ``shift_labels`` is given; otherwise (generation) it is the original.

Layout: ``log_probs[b, t]`` is the log-prob of the token that follows position ``t``: ``labels[b, t+1]``
(Hugging Face's shift), or ``shift_labels[b, t]`` when the caller has shifted already (verl, sequence
parallelism). Positions whose target is ``-100``, the last position, and in packed input (``[1, nnz]`` with
``position_ids`` restarting at 0) the last token of each sequence hold 0 and get no gradient; only the
other rows go through the LM head.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional import linear_logprobs

IGNORE_INDEX = -100


def _model_output_base():
    from transformers.utils import ModelOutput

    return ModelOutput


@dataclass
class CausalLMOutputWithLogProbs(_model_output_base()):
    """``loss`` is the mean negative log-likelihood of the scored tokens (over ``num_items_in_batch``
    when given, as Hugging Face's loss), so SFT trainers keep working on a patched model."""

    loss: Tensor | None = None
    log_probs: Tensor | None = None
    entropy: Tensor | None = None
    label_mask: Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def logit_transform(config) -> dict:
    """The ``logit_softcap`` / ``logit_scale`` keywords a model's own LM head applies (Gemma 2/3 soft-cap
    their logits, Cohere scales them); empty for a plain LM head."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kw = {}
    if getattr(text, "final_logit_softcapping", None) is not None:
        kw["logit_softcap"] = float(text.final_logit_softcapping)
    if getattr(text, "logit_scale", None) is not None and float(text.logit_scale) != 1.0:
        kw["logit_scale"] = float(text.logit_scale)
    return kw


def lm_head_params(model: nn.Module):
    """``(weight, bias)`` of the output embedding, gathered to full tensors when FSDP2 shards it (the
    head is read outside its own forward, so its all-gather hook does not run)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear output embedding (got {type(head).__name__})")
    weight, bias = head.weight, head.bias
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    return weight, bias


def token_logprobs(model: nn.Module, hidden: Tensor, targets: Tensor, mask: Tensor | None, *,
                   temperature: float = 1.0, return_entropy: bool = False):
    """``[B, T]`` log-probs (and entropies) of ``targets`` from ``hidden`` ``[B, T, H]`` through ``model``'s
    LM head. With ``mask``, only its rows are scored (0 and no gradient elsewhere)."""
    weight, bias = lm_head_params(model)
    kw = dict(bias=bias, temperature=temperature, return_entropy=return_entropy, **logit_transform(model.config))
    hidden = hidden.to(weight.device)
    if mask is None:
        return linear_logprobs(hidden, weight, targets.to(weight.device), **kw)
    mask = mask.to(weight.device)
    flat = mask.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    out = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), weight,
                          targets.to(weight.device).reshape(-1).index_select(0, rows), **kw)

    def scatter(x):
        # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero)
        return x.new_zeros(mask.shape).masked_scatter(mask, x)

    return tuple(map(scatter, out)) if return_entropy else scatter(out)


def shifted_targets(labels: Tensor | None, shift_labels: Tensor | None, position_ids: Tensor | None) -> Tensor:
    """Next-token targets per position, ``-100`` where nothing is scored."""
    if shift_labels is not None:
        return shift_labels
    tgt = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), IGNORE_INDEX)], dim=-1)
    if position_ids is not None and position_ids.shape == labels.shape:
        # packed sequences: the token before a restart (position 0) does not predict the next sequence
        restart = torch.cat([position_ids[..., 1:] == 0, torch.zeros_like(position_ids[..., :1], dtype=torch.bool)], -1)
        tgt = tgt.masked_fill(restart, IGNORE_INDEX)
    return tgt


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _logprob_forward(original, temperature: float, return_entropy: bool):
    @functools.wraps(original)
    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None,
                temperature: float | None = None, return_entropy: bool | None = None, **kwargs):
        if labels is None and shift_labels is None:
            return original(self, *args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        out = _backbone(self)(*args, **kwargs)
        tgt = shifted_targets(labels, shift_labels, kwargs.get("position_ids"))
        mask = tgt != IGNORE_INDEX
        ent = defaults["return_entropy"] if return_entropy is None else return_entropy
        res = token_logprobs(self, out.last_hidden_state, tgt, mask, return_entropy=ent,
                             temperature=defaults["temperature"] if temperature is None else temperature)
        logp, entropy = res if ent else (res, None)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return CausalLMOutputWithLogProbs(loss=-logp.sum() / denom, log_probs=logp, entropy=entropy,
                                          label_mask=mask, hidden_states=getattr(out, "hidden_states", None),
                                          attentions=getattr(out, "attentions", None))

    defaults = {"temperature": temperature, "return_entropy": return_entropy}
    forward.__dvpo_original__ = original
    return forward


def apply_dvpo_kernels(model, *, temperature: float = 1.0, return_entropy: bool = False):
    """Patch a Hugging Face causal LM (instance, PEFT model, or ``*ForCausalLM`` class) so that
    ``model(input_ids, attention_mask=..., labels=...)`` returns :class:`CausalLMOutputWithLogProbs`.

    ``temperature`` and ``return_entropy`` are the defaults; the forward takes both as keywords too.
    Patching twice replaces the first patch. Returns ``model``.
    """
    from transformers import PreTrainedModel

    if isinstance(model, type):
        if not issubclass(model, PreTrainedModel):
            raise ValueError(f"model must be a transformers PreTrainedModel class or instance, got {model.__name__}")
        original = getattr(model.forward, "__dvpo_original__", model.forward)
        model.forward = _logprob_forward(original, temperature, return_entropy)
        return model
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(target, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel class or instance, got {type(model).__name__}")
    lm_head_params(target)  # a clear error now for a model without an LM head
    bound = target.forward
    original = getattr(bound, "__dvpo_original__", None) or getattr(bound, "__func__", type(target).forward)
    original = getattr(original, "__dvpo_original__", original)
    target.forward = types.MethodType(_logprob_forward(original, temperature, return_entropy), target)
    return model
