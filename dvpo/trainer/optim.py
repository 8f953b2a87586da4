"""AdamW, the warm-up + decay schedule, and one optimizer update (sync, clip, step)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import grad_sync
from .config import TrainConfig


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on matrices (not biases, norms, heads' bias)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = all(p.is_cuda for _, p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=fused or None)


def lr_multiplier(update: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The factor on the peak lr before optimizer update ``update`` (0-based) of ``total``."""
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_updates: int):
    """LambdaLR over ``total_updates`` optimizer updates: linear warm-up, then cosine/linear/constant."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_updates)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: lr_multiplier(u, total_updates, warmup, cfg.lr_schedule, cfg.min_lr_ratio))


def apply_update(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
                 max_grad_norm: float, averaged: bool = False) -> torch.Tensor:
    """Average gradients over ranks (unless ``averaged`` already), clip, step optimizer and schedule,
    zero gradients.

    Returns the pre-clip global gradient norm as a device tensor (no host sync)."""
    if not averaged:
        grad_sync.average_gradients(params)
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
        norm = norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


class Bundle:
    """Several optimizers (or schedulers) saved, restored and reported as one: a stage that trains two
    models (PPO's policy and critic) hands the Trainer one of each. ``get_last_lr`` reports the first."""

    def __init__(self, **members):
        self.members = members

    def __getitem__(self, name: str):
        return self.members[name]

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.members.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.members.items():
            m.load_state_dict(state[name])

    def get_last_lr(self) -> list[float]:
        return next(iter(self.members.values())).get_last_lr()
