"""torch.distributed hooks. One process runs without ``torchrun``; under ``torchrun`` every rank
trains on its shard of each batch, gradients are averaged, and only rank 0 writes files."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group ``torchrun`` describes in the environment (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or mean over ranks (identity for one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t


def max_over_ranks(value: int) -> int:
    """The largest ``value`` any rank passes (a collective; identity for one process)."""
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def padded_shard(items: list) -> tuple[list, list[float]]:
    """This rank's strided share of ``items``, padded with repeats of its first item to the same length
    on every rank (``ceil(len / world)``), and a weight per entry (0 for the padding). Ranks that must
    run the same number of forwards (FSDP2, whose forwards are collectives) evaluate with it."""
    per = -(-len(items) // world_size())
    shard = items[rank()::world_size()]
    filler = shard[0] if shard else items[0]
    return shard + [filler] * (per - len(shard)), [1.0] * len(shard) + [0.0] * (per - len(shard))


def token_normalizer(count: torch.Tensor) -> torch.Tensor:
    """The divisor that makes a token-mean loss exact under accumulation and data parallelism: this
    update's token count summed over ranks, over the world size (gradients are then averaged over ranks)."""
    total = all_reduce_(count.detach().float().clone())
    return (total / world_size()).clamp(min=1.0)
