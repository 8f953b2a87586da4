"""``dvpo dvpo``: PPO-style policy training with a frozen Global Value Model as the only critic.

Each step samples a batch of prompts, generates responses with the policy, computes the sampling
policy's and the reference's log-probs from final hidden states (``linear_logprobs``, no logits
tensor), reads the frozen GVM's hidden state of every response state (the position before each
response token) and turns them into advantages with ``dvpo_advantages`` -- by default the official
recipe: per-row whitened values, KL-only per-token rewards with an adaptive KL coefficient (0.2,
target 6 nats, horizon 10000), GAE with gamma 1 and lambda 0.95, whitened advantages. Then
``actor.ppo_epochs`` passes of ``fused_policy_loss`` over mini-batches update the policy. There is no
reward model and no value loss: the GVM stays frozen.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

import dvpo_kernels as dk

from ..config import ConfigError, option, section
from ..models import ValueModel, load_tokenizer
from ..rl import (
    Experience,
    RolloutStep,
    Timer,
    batch_whiten,
    check_same_vocabulary,
    frozen_value_model,
    last_state_values,
    state_values,
    unfused,
)
from ..trainer import TrainConfig, Trainer, distributed
from .common import shard_frozen
from .registry import register_stage
from .rl_setup import RLStageConfig, setup_rl

log = logging.getLogger(__name__)


@dataclass
class GVMCriticConfig:
    path: str | None = option(None, "the frozen GVM: a folder written by 'dvpo gvm' (required)", path=True)
    value_norm: Literal["seq", "batch", "official", "none"] = option(
        "seq", "normalise the frozen values per sequence over its response states, over the batch's response "
               "states, as the official DVPO code does (trl's whiten over every position of each scoring forward: "
               "prompt, padding and all; rows per forward = rollout.micro_batch_size), or not at all")
    gamma: float = option(1.0, "discount of the advantage scan")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "whiten the advantages over the batch")
    score: Literal["none", "gvm_terminal"] = option(
        "none", "gvm_terminal: add the GVM's value of the last response state (before the final token, the last "
                "state it is trained on) as a terminal reward")

    def validate(self) -> None:
        if self.path is None:
            raise ConfigError("gvm.path must name a GVM folder (written by 'dvpo gvm')")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"gvm.gamma and gvm.lam must be in [0, 1], got {self.gamma}, {self.lam}")


@dataclass
class DVPOStageConfig(RLStageConfig):
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/dvpo", batch_size=32, lr=1e-6),
                                 "optimisation (train.batch_size = prompts per step), logging, checkpoints")
    gvm: GVMCriticConfig = section(GVMCriticConfig, "the frozen Global Value Model and the advantage recipe")


def gvm_advantages(gvm: ValueModel, exp: Experience, g: GVMCriticConfig, *, kl_coef: float, micro: int,
                   fused: bool, autocast, timer: Timer, max_tokens: int = 0) -> None:
    """Fill ``exp.values/advantages/returns`` (and ``exp.scores`` with ``gvm.score=gvm_terminal``) from the
    frozen GVM. Its values are projected micro-batch by micro-batch (``state_values``), then the fused
    ``dvpo_advantages`` runs on them as on one-dimensional hidden states with a unit head: the same
    numbers as projecting inside the op, without holding the batch's ``[B, R, H]`` hidden states."""
    with timer("values"), autocast:
        raw, white = state_values(gvm, exp, micro=micro, max_tokens=max_tokens,
                                  chunk_whiten=g.value_norm == "official")
    with timer("adv"):
        _advantages(exp, g, raw, white, kl_coef, fused)


def _advantages(exp: Experience, g: GVMCriticConfig, raw, white, kl_coef: float, fused: bool) -> None:
    exp.scores = last_state_values(raw, exp.mask) if g.score == "gvm_terminal" else None
    # Batch statistics span all ranks: with several, batch value norm and advantage whitening are done
    # here with global statistics instead of inside the per-rank op.
    many = distributed.is_distributed()
    norm = g.value_norm
    if norm == "official":  # whitened per forward chunk in state_values; nothing left for the op
        raw, norm = white, "none"
    elif norm == "batch" and many:
        raw, norm = batch_whiten(raw, exp.mask), "none"
    kw = dict(old_logprobs=exp.old_logprobs, ref_logprobs=exp.ref_logprobs, kl_coef=kl_coef, score=exp.scores,
              gamma=g.gamma, lam=g.lam, value_norm=norm, whiten_advantages=g.whiten_advantages and not many)
    if fused:
        adv, exp.returns, exp.values = dk.dvpo_advantages(raw[..., None], raw.new_ones(1, 1), None, exp.mask, **kw)
    else:
        adv, exp.returns, exp.values = unfused.dvpo_advantages(raw, exp.mask, **kw)
    exp.advantages = batch_whiten(adv, exp.mask) if g.whiten_advantages and many else adv


class DVPOStep(RolloutStep):
    """The frozen GVM's values -> ``dvpo_advantages`` (or its unfused twin)."""

    def __init__(self, *, gvm: ValueModel, gvm_cfg: GVMCriticConfig, **kw):
        super().__init__(**kw)
        self.gvm, self.gvm_cfg = gvm, gvm_cfg

    def advantages(self, exp: Experience, metrics: dict, timer: Timer) -> None:
        gvm_advantages(self.gvm, exp, self.gvm_cfg, kl_coef=self.kl_in_reward, micro=self.micro,
                       max_tokens=self.max_tokens, fused=self.actor.cfg.kernels == "fused", autocast=self.autocast(),
                       timer=timer)

    def eval_scores(self, exp: Experience) -> dict[str, torch.Tensor]:
        with self.autocast():  # the GVM's value of the last state it is trained on (before the final token)
            values, _ = state_values(self.gvm, exp, micro=self.micro, max_tokens=self.max_tokens)
        return {"eval/gvm_final_value": last_state_values(values, exp.mask)}


@register_stage("dvpo", DVPOStageConfig, "policy training with a frozen GVM critic (DVPO)",
                __doc__.split("\n\n", 1)[1])
def run(cfg: DVPOStageConfig, *, reward_fn=None) -> dict[str, float]:
    """Train and export the policy; ``reward_fn(prompt_ids, response_ids) -> rewards`` (e.g. an oracle)
    is added to the evaluation when given."""
    s = setup_rl(cfg, cfg.train.parallel)
    check_same_vocabulary(s.tokenizer, load_tokenizer(cfg.gvm.path), f"the GVM at {cfg.gvm.path}")
    gvm = shard_frozen(frozen_value_model(cfg.gvm.path, s.tokenizer, s.device, s.bf16), cfg.train.parallel,
                       cfg.train.shard_frozen)
    step = DVPOStep(gvm=gvm, gvm_cfg=cfg.gvm, policy=s.policy, reference=s.reference, prompts=s.prompts,
                    tokenizer=s.tokenizer, rollout=cfg.rollout, kl=cfg.kl, actor=s.actor, micro=s.micro,
                    seed=cfg.train.seed, device=s.device, bf16=s.bf16, max_tokens=cfg.train.micro_batch_tokens)
    trainer = Trainer(cfg.train, model=s.policy, optimizer=s.optimizer, scheduler=s.scheduler, batches=s.batches,
                      total_steps=s.total_steps, extra_state={"kl_controller": step.kl_ctl, "actor": s.actor})
    trainer.restore()
    eval_fn = (lambda: step.evaluate(s.eval_prompts, s.per_rank, reward_fn)) if s.eval_prompts else None
    return trainer.fit(step, eval_fn=eval_fn,
                       export_fn=lambda folder, state: s.policy.export(folder, s.tokenizer, state),
                       write_extra=lambda folder: s.tokenizer.save_pretrained(folder))
