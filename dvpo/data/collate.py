"""Padded batches for token-level value training (the GVM; later the PPO critic and reward model).

Token ``t`` of a sequence is generated from state ``s_t``, whose value is read from the hidden state
at position ``t - 1``. So per-state tensors are ``[B, L - 1]``: column ``t`` is the state before token
``t + 1``, and ``mask[b, t]`` is set where token ``t + 1`` is a response token. An example's reward
sits on its last state, the one before the response's final token (EOS).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .encode import EncodedSequence


@dataclass(frozen=True)
class ValueExample:
    """One training example: a preference pair (chosen, rejected) or a single scored response."""

    sequences: tuple[EncodedSequence, ...]
    rewards: tuple[float, ...]

    @property
    def is_pair(self) -> bool:
        return len(self.sequences) == 2


@dataclass
class ValueBatch:
    input_ids: Tensor  # [B, L] int64, right-padded
    attention_mask: Tensor  # [B, L] int64
    mask: Tensor  # [B, L-1] bool, states before response tokens
    rewards: Tensor  # [B, L-1] fp32, the example's reward on its last state
    pairs: Tensor  # [P, 2] int64, (chosen row, rejected row) of each preference pair
    example_rows: list[list[int]] = field(default_factory=list)  # rows of each example
    lengths: list[int] = field(default_factory=list)  # tokens of each row (host copy: no device sync)

    @property
    def num_examples(self) -> int:
        return len(self.example_rows)

    def rows(self, examples: list[int]) -> list[int]:
        return [r for e in examples for r in self.example_rows[e]]

    def example_tokens(self) -> list[int]:
        """Valid tokens of each example (its rows together)."""
        return [sum(self.lengths[r] for r in rows) for rows in self.example_rows]

    def to(self, device) -> ValueBatch:
        return ValueBatch(self.input_ids.to(device), self.attention_mask.to(device), self.mask.to(device),
                          self.rewards.to(device), self.pairs.to(device), self.example_rows, self.lengths)

    def select(self, examples: list[int], *per_state: Tensor) -> tuple[ValueBatch, ...]:
        """The sub-batch of ``examples`` (trimmed to its longest row), and the matching rows/columns of
        each ``[B, L-1]`` tensor in ``per_state``."""
        rows, new_rows, pairs = self.rows(examples), [], []
        for e in examples:
            start = sum(len(r) for r in new_rows)
            new_rows.append(list(range(start, start + len(self.example_rows[e]))))
            if len(self.example_rows[e]) == 2:
                pairs.append([start, start + 1])
        idx = torch.tensor(rows, device=self.input_ids.device)
        lengths = [self.lengths[r] for r in rows]
        width = max(lengths)
        sub = ValueBatch(self.input_ids[idx, :width], self.attention_mask[idx, :width], self.mask[idx, :width - 1],
                         self.rewards[idx, :width - 1],
                         torch.tensor(pairs, dtype=torch.long, device=idx.device).reshape(-1, 2), new_rows, lengths)
        return (sub, *(t[idx, :width - 1] for t in per_state))


def collate_values(examples: list[ValueExample], pad_token_id: int) -> ValueBatch:
    seqs = [(s, r) for ex in examples for s, r in zip(ex.sequences, ex.rewards)]
    width = max(len(s) for s, _ in seqs)
    if width < 2:
        raise ValueError("every sequence needs a prompt token and a response token")
    b = len(seqs)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1), dtype=torch.bool)
    rewards = torch.zeros((b, width - 1), dtype=torch.float32)
    for row, (seq, reward) in enumerate(seqs):
        p, n = len(seq.prompt_ids), len(seq)
        input_ids[row, :n] = torch.tensor(seq.prompt_ids + seq.response_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        mask[row, p - 1:n - 1] = True
        rewards[row, n - 2] = reward
    example_rows, pairs, row = [], [], 0
    for ex in examples:
        example_rows.append(list(range(row, row + len(ex.sequences))))
        if ex.is_pair:
            pairs.append([row, row + 1])
        row += len(ex.sequences)
    return ValueBatch(input_ids, attention_mask, mask, rewards,
                      torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), example_rows, [len(s) for s, _ in seqs])
