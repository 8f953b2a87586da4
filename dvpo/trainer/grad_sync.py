"""Gradient averaging for replicated parameters (``train.parallel: replicate``), as DDP's reducer does it.

Parameters are grouped into buckets of about ``cap_mb`` (in reverse registration order, roughly the order
backward produces their gradients). During the backward of a batch's last micro-batch, each bucket is
flattened and all-reduced asynchronously as soon as it and every earlier bucket are complete, so the
communication overlaps the rest of the backward; :meth:`GradientBuckets.finish` launches what is left
(buckets holding a parameter this rank did not use, whose gradient counts as zero), waits, and writes
the averages back; a parameter no rank used keeps no gradient (as in one process: no weight decay, no
momentum step). Buckets launch in index order on every rank, so the collectives always match -- as long
as no other collective runs between a step's last backward and :meth:`finish` (check gradients after it).

Earlier micro-batches only accumulate: :func:`accumulating` marks them, as DDP's ``no_sync`` does.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from . import distributed

DEFAULT_CAP_MB = 25.0

_OWNER = "_dvpo_grad_buckets"  # the attribute a replicated parameter points to its buckets with
_syncing = True


@contextlib.contextmanager
def accumulating(active: bool = True):
    """Backward passes inside only accumulate gradients (no bucket launches); :meth:`finish` reduces them."""
    global _syncing
    before, _syncing = _syncing, not active
    try:
        yield
    finally:
        _syncing = before


def micro_steps(groups: list):
    """Iterate micro-batches so that only the last one's backward launches gradient all-reduces."""
    for i, group in enumerate(groups):
        with accumulating(i < len(groups) - 1):
            yield group


class GradientBuckets:
    """The buckets of one model's replicated parameters; hooks on each parameter report its gradient."""

    def __init__(self, params, cap_mb: float = DEFAULT_CAP_MB):
        from torch.distributed.tensor import DTensor

        params = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
        if cap_mb <= 0:
            raise ValueError(f"cap_mb must be positive, got {cap_mb}")
        cap = cap_mb * 2**20
        self.buckets: list[list[nn.Parameter]] = []
        sizes: list[float] = []
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            last = self.buckets[-1] if self.buckets else None
            if last is None or sizes[-1] + nbytes > cap or (last[0].dtype, last[0].device) != (p.dtype, p.device):
                self.buckets.append([])
                sizes.append(0.0)
            self.buckets[-1].append(p)
            sizes[-1] += nbytes
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)
            setattr(p, _OWNER, self)

    def _reset(self) -> None:
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._next = 0  # the first bucket not launched yet
        self._flights: list[tuple[int, torch.Tensor, dist.Work]] = []

    def _on_grad(self, p: nn.Parameter) -> None:
        if not _syncing:
            return
        i = self._bucket_of[id(p)]
        if i < self._next or id(p) in self._ready[i]:
            raise RuntimeError("a second backward before the gradients were averaged: run the backward passes "
                               "of all but a step's last micro-batch under grad_sync.accumulating()")
        self._ready[i].add(id(p))
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        used = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
                         + [used])  # the flags sum to the number of ranks that used each parameter
        flat.div_(distributed.world_size())
        self._flights.append((i, flat, dist.all_reduce(flat, async_op=True)))
        self._next = i + 1

    def finish(self) -> None:
        """Launch the buckets backward did not, wait for every all-reduce, write the averages back."""
        while self._next < len(self.buckets):
            self._launch(self._next)
        for i, flat, work in self._flights:
            work.wait()
            bucket, offset = self.buckets[i], 0
            used = flat[-len(bucket):].tolist()
            for p, anyone in zip(bucket, used):
                mean = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if anyone == 0:
                    p.grad = None
                elif p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
        self._reset()


def replicate(params, cap_mb: float = DEFAULT_CAP_MB) -> None:
    """Average these parameters' gradients over ranks through buckets from now on (no-op in one process)."""
    if distributed.is_distributed():
        GradientBuckets(params, cap_mb)


def average_gradients(params) -> None:
    """Finish the buckets these parameters belong to; gradients of replicated parameters that no bucket
    holds are averaged one by one. FSDP2-sharded parameters (DTensors) arrive reduce-scattered."""
    if not distributed.is_distributed():
        return
    from torch.distributed.tensor import DTensor

    finished = set()
    for p in params:
        owner = getattr(p, _OWNER, None)
        if owner is not None:
            if id(owner) not in finished:
                owner.finish()
                finished.add(id(owner))
        elif p.grad is not None and not isinstance(p, DTensor):
            distributed.all_reduce_(p.grad, "mean")
