"""``dvpo ppo``: PPO-RLHF, the baseline DVPO replaces -- four models: the trained policy, an online critic
(initialised from the reward model by default), a frozen reward model and a frozen reference.

Each step generates with the same rollout code as ``dvpo dvpo``; the rewards are a per-token KL penalty
``-kl_coef * (logp_old - logp_ref)`` plus the reward model's score on each response's last token; the
critic's values give GAE advantages (gamma 1, lambda 0.95 by default), whitened over the batch; the policy
takes the clipped PPO loss and the critic the clipped value loss
``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``, both over ``actor.ppo_epochs`` passes of
mini-batches. ``critic.warmup_steps`` first steps train the critic only.

``actor.kernels: fused`` uses the dvpo_kernels ops (no logits tensor, one GAE kernel); ``unfused``
materialises logits and runs GAE as a Python loop over positions, the way common frameworks do, so the
benchmarks can show both on the same code.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

import dvpo_kernels as dk

from ..config import ConfigError, option, section
from ..models import ModelConfig, ValueModel, load_token_value_model, load_tokenizer
from ..rl import (
    Experience,
    RolloutStep,
    Timer,
    batch_whiten,
    check_same_vocabulary,
    frozen_value_model,
    micro_batches,
    sequence_scores,
    unfused,
    updates_per_step,
)
from ..trainer import (
    Bundle,
    TrainConfig,
    Trainer,
    apply_update,
    build_optimizer,
    build_scheduler,
    distributed,
    micro_steps,
    parallel,
    step_generator,
    trainable_parameters,
)
from .registry import register_stage
from .common import shard_frozen
from .rl_setup import RLStageConfig, setup_rl

log = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    path: str | None = option(None, "the frozen reward model: a folder written by 'dvpo rm' (required)", path=True)

    def validate(self) -> None:
        if self.path is None:
            raise ConfigError("reward.path must name a reward model folder (written by 'dvpo rm')")


@dataclass
class CriticConfig:
    init: str | None = option(None, "the critic's starting point: a value-model folder or a causal LM (new zero "
                                    "head); null = reward.path", path=True)
    lr: float = option(5e-6, "critic learning rate (same schedule shape as train.lr)")
    value_clip: float = option(0.2, "clip range of the value loss around the rollout's values")
    warmup_steps: int = option(0, "first steps that train only the critic")
    gamma: float = option(1.0, "GAE gamma")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "whiten the advantages over the batch")

    def validate(self) -> None:
        if self.lr <= 0 or self.value_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("critic.lr must be > 0, critic.value_clip and critic.warmup_steps >= 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"critic.gamma and critic.lam must be in [0, 1], got {self.gamma}, {self.lam}")


@dataclass
class PPOStageConfig(RLStageConfig):
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/ppo", batch_size=32, lr=1e-6),
                                 "optimisation (train.batch_size = prompts per step), logging, checkpoints")
    reward: RewardConfig = section(RewardConfig, "the frozen reward model")
    critic: CriticConfig = section(CriticConfig, "the online critic and GAE")


class ActorCritic(torch.nn.Module):
    """The two trained models as one module, so checkpoints hold both."""

    def __init__(self, policy: torch.nn.Module, critic: ValueModel):
        super().__init__()
        self.policy, self.critic = policy, critic


def critic_values(critic: ValueModel, part: Experience) -> torch.Tensor:
    """``[B, R]`` values of the response states (the position before each response token), fp32."""
    p, r = part.prompt_len, part.mask.shape[1]
    return critic(part.sequences, part.attention_mask, part.position_ids)[:, p - 1:p - 1 + r]


def clipped_value_loss(values, old_values, returns, mask, clip: float, normalizer):
    """``0.5 * sum(mask * max((V - R)^2, (clip(V, V_old +- c) - R)^2)) / normalizer`` and the clip fraction."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    loss = 0.5 * torch.where(mask, err, 0.0).sum() / normalizer
    frac = torch.where(mask, ((clipped - returns) ** 2 > (values - returns) ** 2).float(), 0.0).sum()
    return loss, frac / mask.sum().clamp(min=1)


class PPOStep(RolloutStep):
    def __init__(self, *, critic: ValueModel, reward_model: ValueModel, critic_cfg: CriticConfig, critic_optimizer,
                 critic_scheduler, max_grad_norm: float, **kw):
        super().__init__(**kw)
        self.critic, self.reward_model, self.critic_cfg = critic, reward_model, critic_cfg
        self.critic_optimizer, self.critic_scheduler = critic_optimizer, critic_scheduler
        self.critic_params = trainable_parameters(critic)
        self.max_grad_norm = max_grad_norm

    def trains_actor(self, step: int) -> bool:
        return step > self.critic_cfg.warmup_steps

    def rm_scores(self, exp: Experience) -> torch.Tensor:
        with self.autocast():
            return sequence_scores(self.reward_model, exp, micro=self.micro, max_tokens=self.max_tokens)

    @torch.no_grad()
    def advantages(self, exp: Experience, metrics: dict, timer: Timer) -> None:
        c = self.critic_cfg
        with timer("values"):
            self.critic.eval()
            values = torch.zeros(exp.mask.shape, device=self.device)
            for rows in micro_batches(exp.batch_size, self.micro, tokens=exp.attention_mask.sum(1),
                                      max_tokens=self.max_tokens):
                part = exp.select(rows)
                with self.autocast():
                    values[rows, :part.mask.shape[1]] = critic_values(self.critic, part).float()
            exp.values = torch.where(exp.mask, values, 0.0)
            exp.scores = self.rm_scores(exp)
        with timer("adv"):
            rewards = unfused.kl_rewards(exp.mask, exp.old_logprobs, exp.ref_logprobs, self.kl_in_reward, exp.scores)
            if self.actor.cfg.kernels == "fused":
                adv, exp.returns = dk.gae(exp.values, rewards, exp.mask, gamma=c.gamma, lam=c.lam)
                whiten = batch_whiten
            else:
                adv, exp.returns = unfused.loop_gae(exp.values, rewards, exp.mask, c.gamma, c.lam)
                whiten = batch_whiten if distributed.is_distributed() else unfused.whiten
            exp.advantages = whiten(adv, exp.mask) if c.whiten_advantages else adv

    def after_actor(self, exp: Experience, step: int, metrics: dict, timer: Timer) -> None:
        """The critic's clipped value regression toward the returns, same epochs and mini-batches."""
        cfg, n = self.actor.cfg, exp.batch_size
        mini = self.actor.mini
        generator = step_generator(self.seed + 1, step)
        losses, fracs, norms = [], [], []
        self.critic.train()
        with timer("update_critic"):
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n, generator=generator).tolist()
                for start in range(0, n, mini):
                    group = exp.select(order[start:start + mini])
                    normalizer = distributed.token_normalizer(group.mask.sum())
                    total = torch.zeros((), device=self.device)
                    for rows in micro_steps(self.actor.micro_batches(group)):
                        part = group.select(rows)
                        with self.autocast():
                            v = critic_values(self.critic, part).float()
                        loss, frac = clipped_value_loss(v, part.values, part.returns, part.mask,
                                                        self.critic_cfg.value_clip, normalizer)
                        loss.backward()
                        total += loss.detach()
                        fracs.append(frac)
                    norms.append(apply_update(self.critic_params, self.critic_optimizer, self.critic_scheduler,
                                              self.max_grad_norm))
                    losses.append(total)
        metrics.update({"critic/vf_loss": torch.stack(losses).mean(), "critic/vf_clipfrac": torch.stack(fracs).mean(),
                        "critic/grad_norm": torch.stack(norms).mean()})

    def eval_scores(self, exp: Experience) -> dict[str, torch.Tensor]:
        return {"eval/rm_score": self.rm_scores(exp)}


@register_stage("ppo", PPOStageConfig, "PPO-RLHF baseline: reward model + online critic", __doc__.split("\n\n", 1)[1])
def run(cfg: PPOStageConfig, *, reward_fn=None) -> dict[str, float]:
    """Train and export the policy (``final/``) and the critic (``final/critic``); ``reward_fn(prompt_ids,
    response_ids) -> rewards`` (e.g. an oracle) is added to the evaluation when given."""
    t = cfg.train
    s = setup_rl(cfg, t.parallel, actor_steps_skipped=cfg.critic.warmup_steps)
    check_same_vocabulary(s.tokenizer, load_tokenizer(cfg.reward.path), f"the reward model at {cfg.reward.path}")
    reward_model = shard_frozen(frozen_value_model(cfg.reward.path, s.tokenizer, s.device, s.bf16), t.parallel,
                                t.shard_frozen)
    critic_cfg = ModelConfig(path=cfg.critic.init or cfg.reward.path,
                             gradient_checkpointing=cfg.model.gradient_checkpointing)
    critic = ValueModel(load_token_value_model(critic_cfg, s.tokenizer, s.device))
    critic.kind = "critic"
    parallel.distribute(critic, critic.hf_model, t.parallel)  # its own FSDP2 root
    critic_train = dataclasses.replace(t, lr=cfg.critic.lr)
    critic_optimizer = build_optimizer(critic, critic_train)
    critic_scheduler = build_scheduler(critic_optimizer, critic_train,
                                       s.total_steps * updates_per_step(cfg.actor, t.batch_size))
    step = PPOStep(critic=critic, reward_model=reward_model, critic_cfg=cfg.critic, critic_optimizer=critic_optimizer,
                   critic_scheduler=critic_scheduler, max_grad_norm=t.max_grad_norm, policy=s.policy,
                   reference=s.reference, prompts=s.prompts, tokenizer=s.tokenizer, rollout=cfg.rollout, kl=cfg.kl,
                   actor=s.actor, micro=s.micro, seed=t.seed, device=s.device, bf16=s.bf16,
                   max_tokens=t.micro_batch_tokens)
    trainer = Trainer(t, model=ActorCritic(s.policy, critic),
                      optimizer=Bundle(actor=s.optimizer, critic=critic_optimizer),
                      scheduler=Bundle(actor=s.scheduler, critic=critic_scheduler), batches=s.batches,
                      total_steps=s.total_steps, extra_state={"kl_controller": step.kl_ctl, "actor": s.actor})
    trainer.restore()

    def export(folder, state):
        """``state``: ActorCritic's gathered full state when sharded (``policy.*`` and ``critic.*``)."""
        part = (lambda name: None) if state is None else \
            (lambda name: {k.removeprefix(name): v for k, v in state.items() if k.startswith(name)})
        s.policy.export(folder, s.tokenizer, part("policy."))
        critic.export(folder / "critic", s.tokenizer, part("critic."))

    eval_fn = (lambda: step.evaluate(s.eval_prompts, s.per_rank, reward_fn)) if s.eval_prompts else None
    return trainer.fit(step, eval_fn=eval_fn, export_fn=export,
                       write_extra=lambda folder: s.tokenizer.save_pretrained(folder))
