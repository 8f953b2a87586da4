"""A rollout batch as training data: tokens, masks, log-probs, state hidden states, advantages.

Layout (from :class:`dvpo.rollout.Rollout`): ``sequences`` ``[B, P + R]`` are left-padded prompts then
right-padded responses. Response token ``t`` of a row sits at position ``P + t`` and is generated from
state ``s_t``, whose hidden state (policy or value model) is at position ``P + t - 1``; so every
per-token tensor is ``[B, R]`` and reads hidden positions ``P - 1 .. P + R - 2``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

import dvpo_kernels as dk

from ..data import Encoder, PromptRecord, truncate
from ..models import PolicyModel, ValueModel, masked_logprobs
from ..rollout import Rollout
from ..trainer import micro_batches, parallel
from .unfused import logits_logprobs


def encode_prompts(records: list[PromptRecord], encoder: Encoder, max_prompt_length: int | None) -> list[list[int]]:
    """Token ids of each prompt, cut from the left (keeping BOS) to ``max_prompt_length``."""
    out = []
    for rec in records:
        ids = encoder.prompt_ids(rec.prompt)
        if max_prompt_length is not None:
            ids = truncate(ids, [], max(max_prompt_length, 2), max_prompt_length, encoder.tokenizer.bos_token_id)[0]
        out.append(ids)
    return out


@dataclass
class Experience:
    sequences: Tensor  # [B, L] int64
    attention_mask: Tensor  # [B, L]
    position_ids: Tensor  # [B, L]
    prompt_len: int  # P
    mask: Tensor  # [B, R] bool, real response tokens (EOS included)
    lengths: list[int]  # response tokens per row (host copy)
    finished: Tensor | None = None  # [B] bool, the row ended with EOS (not cut at max_new_tokens)
    old_logprobs: Tensor | None = None  # [B, R] fp32, the sampling policy
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    scores: Tensor | None = None  # [B] sequence-level rewards, when the recipe has them

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> Experience:
        return cls(rollout.sequences, rollout.attention_mask, rollout.position_ids, rollout.prompt_len,
                   rollout.response_mask, rollout.response_lengths.tolist(), finished=rollout.finished)

    @property
    def targets(self) -> Tensor:
        return self.sequences[:, self.prompt_len:]

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    def select(self, rows: list[int]) -> Experience:
        """The sub-batch of ``rows``, trimmed to its longest response."""
        idx = torch.tensor(rows, device=self.sequences.device)
        width = max(self.lengths[r] for r in rows)
        cut = self.prompt_len + width
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[idx]
                if value.dim() == 2:
                    value = value[:, :cut] if value.shape[1] == self.sequences.shape[1] else value[:, :width]
            out[f.name] = value
        return replace(self, **{**out, "lengths": [self.lengths[r] for r in rows]})


def state_slice(hidden: Tensor, exp: Experience) -> Tensor:
    """``[B, R, H]``: the hidden state of each response token's state (the position before it)."""
    p, r = exp.prompt_len, exp.mask.shape[1]
    return hidden[:, p - 1:p - 1 + r]


@torch.no_grad()
def policy_logprobs(policy: PolicyModel, exp: Experience, *, temperature: float, micro: int, max_tokens: int = 0,
                    unfused: bool = False, return_entropy: bool = False, memory: str = "speed"):
    """Log-probs ``[B, R]`` (and entropies) of the sampled responses under ``policy``, without
    gradients, in micro-batches of ``micro`` rows (or of about ``max_tokens`` tokens); 0 on masked tokens."""
    logp = torch.zeros(exp.mask.shape, device=exp.mask.device)
    ent = torch.zeros_like(logp) if return_entropy else None
    for rows in micro_batches(exp.batch_size, micro, tokens=exp.attention_mask.sum(1), max_tokens=max_tokens):
        part = exp.select(rows)
        width = part.mask.shape[1]

        def head(hidden, weight, bias, part=part):
            h = state_slice(hidden, part)
            if unfused:
                return logits_logprobs(h, weight, bias, part.targets, temperature=temperature,
                                       return_entropy=return_entropy)
            return masked_logprobs(h, weight, bias, part.targets, part.mask, temperature=temperature,
                                   return_entropy=return_entropy, memory=memory)

        out = policy(part.sequences, part.attention_mask, head, part.position_ids)
        lp, e = out if return_entropy else (out, None)
        idx = torch.tensor(rows, device=logp.device)
        logp[idx, :width] = torch.where(part.mask, lp.float(), 0.0)
        if ent is not None:
            ent[idx, :width] = torch.where(part.mask, e.float(), 0.0)
    return (logp, ent) if return_entropy else logp


def _fp32_head(model: ValueModel, hidden: Tensor) -> Tensor:
    """The value head in fp32 whatever autocast is active: values are statistics (and stay equal to the
    fused op's own projection)."""
    head = model.head
    with torch.autocast(hidden.device.type, enabled=False):
        return dk.value_head(hidden, head.weight, head.bias)


@torch.no_grad()
def state_values(model: ValueModel, exp: Experience, *, micro: int, max_tokens: int = 0,
                 chunk_whiten: bool = False) -> tuple[Tensor, Tensor | None]:
    """``[B, R]`` fp32 values of the response states (0 on masked ones), projected micro-batch by
    micro-batch: no more than one micro-batch's hidden states ``[micro, L, H]`` exist at a time.

    With ``chunk_whiten`` also the values whitened the way the official DVPO trainer does it (trl's
    ``whiten``): ``(v - mean) * rsqrt(var + 1e-8)`` with the mean and unbiased variance of *every*
    position of the micro-batch's forward (prompt, response, the position after the last token,
    padding), not only the response states; else None."""
    raw = torch.zeros(exp.mask.shape, device=exp.mask.device)
    white = torch.zeros_like(raw) if chunk_whiten else None
    for rows in micro_batches(exp.batch_size, micro, tokens=exp.attention_mask.sum(1), max_tokens=max_tokens):
        part = exp.select(rows)
        idx, width = torch.tensor(rows, device=raw.device), part.mask.shape[1]
        with parallel.gathered_root(model):  # hidden_states runs the backbone, not the wrapper's forward
            hidden = model.hidden_states(part.sequences, part.attention_mask, part.position_ids)
            if chunk_whiten:
                full = _fp32_head(model, hidden)
                values = state_slice(full[..., None], part)[..., 0]
                whitened = (values - full.mean()) * torch.rsqrt(full.var() + 1e-8)
                white[idx, :width] = torch.where(part.mask, whitened, 0.0)
            else:
                values = _fp32_head(model, state_slice(hidden, part))
        raw[idx, :width] = torch.where(part.mask, values, 0.0)
    return raw, white


def last_state_values(values: Tensor, mask: Tensor) -> Tensor:
    """``[B]``: each row's value at its last response state, the state before its final token. That is
    the last state a GVM is trained on (its reward sits there); the state after EOS never is."""
    return values.gather(-1, mask.long().cumsum(-1).argmax(-1, keepdim=True)).squeeze(-1)


@torch.no_grad()
def sequence_scores(model: ValueModel, exp: Experience, *, micro: int, max_tokens: int = 0) -> Tensor:
    """``[B]`` fp32 score of each sampled sequence where ``model`` was trained to give it: a GVM's value of
    the last response state (before the final token), a reward model's output at the final token (EOS)
    itself. Micro-batched, one micro-batch's hidden states at a time."""
    if model.is_gvm:
        return last_state_values(state_values(model, exp, micro=micro, max_tokens=max_tokens)[0], exp.mask)
    scores = torch.zeros(exp.batch_size, device=exp.mask.device)
    for rows in micro_batches(exp.batch_size, micro, tokens=exp.attention_mask.sum(1), max_tokens=max_tokens):
        part = exp.select(rows)
        last = part.prompt_len + torch.tensor(part.lengths, device=scores.device) - 1
        with parallel.gathered_root(model):
            hidden = model.hidden_states(part.sequences, part.attention_mask, part.position_ids)
            final = hidden[torch.arange(len(rows), device=scores.device), last]
            scores[torch.tensor(rows, device=scores.device)] = _fp32_head(model, final)
    return scores
