"""The policy update of the on-policy stages: ``ppo_epochs`` shuffled passes over mini-batches of a rollout
batch, each an optimizer update accumulated over micro-batches of the clipped PPO loss.

Fused: ``dvpo_kernels.fused_policy_loss`` on the final hidden states and the LM-head weight (no logits
tensor). Unfused: logits, ``log_softmax``, then ``dvpo_kernels.policy_loss``: the same numbers.
With ``loss_agg: token-mean`` each micro-batch's loss is divided by the token count of the whole
mini-batch summed over ranks (the ``normalizer``), so accumulation and data parallelism leave the
gradient equal to the full batch's token mean.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import dvpo_kernels as dk

from ..models import PolicyModel
from ..trainer import apply_update, autocast, distributed, grad_sync, micro_batches, micro_steps, step_generator
from .config import ActorConfig
from .experience import Experience, state_slice
from .unfused import logits_logprobs

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many updates had a non-finite loss or gradient."""


@dataclass
class LossTerms:
    """What the loss adds beyond the clipped surrogate."""

    temperature: float = 1.0
    kl_coef: float = 0.0  # > 0 with ref log-probs: a KL term in the loss
    kl_type: str = "k3"


def policy_loss_on(policy: PolicyModel, part: Experience, cfg: ActorConfig, terms: LossTerms, normalizer):
    """(loss, metrics) of the PPO loss on ``part``, through ``policy``'s forward."""
    kw = dict(ref_logprobs=part.ref_logprobs if terms.kl_coef > 0 else None, clip_low=cfg.clip_low,
              clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl_coef=terms.kl_coef, kl_type=terms.kl_type,
              entropy_coef=cfg.entropy_coef, loss_agg=cfg.loss_agg,
              normalizer=normalizer if cfg.loss_agg == "token-mean" else None)

    def head(hidden, weight, bias):
        h = state_slice(hidden, part)
        if cfg.kernels == "fused":
            return dk.fused_policy_loss(h, weight, part.targets, part.old_logprobs, part.advantages, part.mask,
                                        bias=bias, temperature=terms.temperature, memory=cfg.memory, **kw)
        if cfg.entropy_coef > 0:
            logp, ent = logits_logprobs(h, weight, bias, part.targets, temperature=terms.temperature,
                                        return_entropy=True)
        else:
            logp, ent = logits_logprobs(h, weight, bias, part.targets, temperature=terms.temperature), None
        return dk.policy_loss(logp, part.old_logprobs, part.advantages, part.mask, entropy=ent, **kw)

    return policy(part.sequences, part.attention_mask, head, part.position_ids)


def mini_batch_rows(cfg: ActorConfig, batch_size: int) -> int:
    """This rank's rows per optimizer update."""
    return max(1, (cfg.mini_batch_size or batch_size // 2) // distributed.world_size())


def updates_per_step(cfg: ActorConfig, batch_size: int) -> int:
    """Optimizer updates per rollout batch of ``batch_size`` sequences (all ranks)."""
    rows = batch_size // distributed.world_size()
    return cfg.ppo_epochs * -(-rows // mini_batch_rows(cfg, batch_size))


class ActorUpdater:
    """Runs the update of one rollout batch; counts skipped (non-finite) updates across steps."""

    def __init__(self, policy: PolicyModel, optimizer, scheduler, params, cfg: ActorConfig, *, global_batch: int,
                 micro: int, max_grad_norm: float, seed: int, device: torch.device, bf16: bool,
                 max_tokens: int = 0):
        self.policy, self.optimizer, self.scheduler, self.params = policy, optimizer, scheduler, params
        self.cfg, self.micro, self.max_tokens, self.max_grad_norm = cfg, micro, max_tokens, max_grad_norm
        self.seed, self.device, self.bf16 = seed, device, bf16
        self.mini = mini_batch_rows(cfg, global_batch)
        self.skipped = 0

    def micro_batches(self, exp: Experience) -> list[list[int]]:
        """The micro-batches of one mini-batch: ``micro`` rows each, or by token budget (prompt + response)."""
        return micro_batches(exp.batch_size, self.micro, tokens=exp.attention_mask.sum(1), max_tokens=self.max_tokens)

    def __call__(self, exp: Experience, step: int, terms: LossTerms) -> dict:
        cfg, n = self.cfg, exp.batch_size
        generator = step_generator(self.seed, step)
        sums: dict[str, torch.Tensor] = {}
        losses, norms, calls = [], [], 0
        self.policy.train()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for start in range(0, n, self.mini):
                group = order[start:start + self.mini]
                mini = exp.select(group)
                normalizer = distributed.token_normalizer(mini.mask.sum())
                loss_sum = torch.zeros((), device=self.device)
                for rows in micro_steps(self.micro_batches(mini)):
                    part = mini.select(rows)
                    with autocast(self.device, self.bf16):
                        loss, metrics = policy_loss_on(self.policy, part, cfg, terms, normalizer)
                    if cfg.loss_agg != "token-mean":
                        loss = loss * (len(rows) / len(group))
                    loss.backward()
                    loss_sum += loss.detach()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
                    calls += 1
                norm = self._update(loss_sum, step)
                losses.append(loss_sum)
                norms.append(norm)
        out = {"actor/pg_loss": torch.stack(losses).mean(), "actor/grad_norm": torch.stack(norms).nanmean(),
               "actor/skipped_updates": float(self.skipped)}
        names = {"clipfrac": "actor/pg_clipfrac", "ppo_kl": "actor/ppo_kl", "ratio_mean": "actor/ratio_mean",
                 "kl": "actor/kl_loss", "entropy": "actor/entropy_loss"}
        out.update({names[k]: v / calls for k, v in sums.items() if k in names})
        return out

    def _update(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Step the optimizer unless the loss or the gradient is not finite (then skip, log, count)."""
        # Replicas' gradient buckets first: no other collective may run between the backward and them.
        grad_sync.average_gradients(self.params)
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self.params if p.grad is not None]
        finite = torch.isfinite(loss)
        if grads:
            finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if bool(distributed.all_reduce_(finite.float(), "mean") == 1.0):
            return apply_update(self.params, self.optimizer, self.scheduler, self.max_grad_norm, averaged=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step, self.skipped)
        if self.skipped > self.cfg.max_bad_steps:
            raise NonFiniteError(f"{self.skipped} updates skipped for non-finite values "
                                 f"(actor.max_bad_steps={self.cfg.max_bad_steps})")
        return torch.full((), float("nan"), device=self.device)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])
