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

from ..data import Encoder, PromptRecord, truncate
from ..models import PolicyModel, ValueModel, masked_logprobs
from ..rollout import Rollout
from ..trainer import parallel
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


def micro_batches(n: int, size: int) -> list[list[int]]:
    size = size or n
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


@torch.no_grad()
def policy_logprobs(policy: PolicyModel, exp: Experience, *, temperature: float, micro: int,
                    unfused: bool = False, return_entropy: bool = False, memory: str = "speed"):
    """Log-probs ``[B, R]`` (and entropies) of the sampled responses under ``policy``, without
    gradients, in micro-batches of ``micro`` rows; 0 on masked tokens."""
    logp = torch.zeros(exp.mask.shape, device=exp.mask.device)
    ent = torch.zeros_like(logp) if return_entropy else None
    for rows in micro_batches(exp.batch_size, micro):
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


@torch.no_grad()
def value_states(model: ValueModel, exp: Experience, *, micro: int) -> tuple[Tensor, Tensor]:
    """The value model's hidden states of the response states ``[B, R, H]`` and of each row's final
    state (after its last token) ``[B, H]``, in micro-batches."""
    states, final = None, None
    last = exp.prompt_len + torch.tensor(exp.lengths, device=exp.sequences.device) - 1
    for rows in micro_batches(exp.batch_size, micro):
        part = exp.select(rows)
        with parallel.gathered_root(model):  # hidden_states runs the backbone, not the wrapper's forward
            hidden = model.hidden_states(part.sequences, part.attention_mask, part.position_ids)
        if states is None:
            states = hidden.new_zeros(exp.mask.shape + hidden.shape[-1:])
            final = hidden.new_zeros(exp.batch_size, hidden.shape[-1])
        idx = torch.tensor(rows, device=hidden.device)
        states[idx, :part.mask.shape[1]] = state_slice(hidden, part)
        final[idx] = hidden[torch.arange(len(rows), device=hidden.device), last[idx]]
    return states, final
