"""Resumable, seeded batching of example indices, sharded over data-parallel ranks, and the split of a
rank's batch into micro-batches (by row count or by token budget)."""
from __future__ import annotations

import math

import torch

from . import distributed


class EpochBatches:
    """Batches of ``batch_size`` example indices; each epoch is a fresh permutation drawn from
    ``(seed, epoch)``, the last incomplete batch of an epoch is dropped. The position
    (epoch, batch) is the whole state, so a resumed run continues with the very next batch.
    Under torch.distributed each rank gets its strided share of every global batch."""

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True):
        if batch_size > num_examples:
            raise ValueError(f"batch_size {batch_size} is larger than the {num_examples} training examples")
        if batch_size % distributed.world_size():
            raise ValueError(f"batch_size {batch_size} must divide evenly over {distributed.world_size()} ranks")
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.batches_per_epoch))

    def _order(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            order = torch.arange(self.num_examples) if not self.shuffle else torch.randperm(
                self.num_examples, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))
            self._cached = (epoch, order)
        return self._cached[1]

    def next(self) -> list[int]:
        """The indices of this rank's share of the next batch."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        batch = self._order(self.epoch)[start:start + self.batch_size]
        self.position += 1
        return batch[distributed.rank()::distributed.world_size()].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def micro_batches(n: int, size: int = 0, *, tokens=None, max_tokens: int = 0) -> list[list[int]]:
    """The groups of rows ``0..n-1`` that one update's forward/backward passes run, in order.

    By count: consecutive groups of ``size`` rows (0 = all). By token budget (``max_tokens > 0``, with
    ``tokens`` the valid tokens of each row): rows sorted longest first and cut into consecutive groups
    whose padded size (rows x the group's longest row) stays within ``max_tokens`` (a longer row runs
    alone), so rows of similar length share a micro-batch and neither padding nor packed rows waste
    much. Every rank runs the same number of groups (the most any rank needs; ranks pass the same
    ``n``), because FSDP2's forwards are collectives that must pair up: a rank that needs fewer splits
    its largest groups."""
    if max_tokens <= 0 or tokens is None:
        size = size or n
        return [list(range(s, min(n, s + size))) for s in range(0, n, size)]
    tokens = [int(t) for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
    if len(tokens) != n:
        raise ValueError(f"tokens has {len(tokens)} entries for {n} rows")
    groups: list[list[int]] = []
    for row in sorted(range(n), key=lambda r: -tokens[r]):
        if groups and (len(groups[-1]) + 1) * tokens[groups[-1][0]] <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    k = min(n, distributed.max_over_ranks(len(groups)))
    while len(groups) < k:  # split the largest group that has two rows or more
        i = max((g for g in range(len(groups)) if len(groups[g]) > 1),
                key=lambda g: len(groups[g]) * tokens[groups[g][0]])
        half = (len(groups[i]) + 1) // 2
        groups[i:i + 1] = [groups[i][:half], groups[i][half:]]
    return [sorted(g) for g in groups]
