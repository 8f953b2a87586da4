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
from pathlib import Path
from typing import Literal

import torch

import dvpo_kernels as dk

from ..config import ConfigError, option, section
from ..data import DataStats, Encoder, read_prompts
from ..models import ModelConfig, load_tokenizer
from ..objectives import last_token_scores
from ..rl import (
    ActorConfig,
    ActorUpdater,
    Experience,
    KLConfig,
    PromptDataConfig,
    RolloutConfig,
    RolloutStep,
    Timer,
    check_same_vocabulary,
    encode_prompts,
    frozen_policy,
    frozen_value_model,
    unfused,
    updates_per_step,
    value_states,
)
from ..trainer import (
    EpochBatches,
    TrainConfig,
    Trainer,
    build_optimizer,
    build_scheduler,
    distributed,
    resolve_resume,
    start_run,
    trainable_parameters,
    use_bf16,
    write_json,
)
from .common import hold_out, trainable_policy
from .registry import register_stage

log = logging.getLogger(__name__)


@dataclass
class ReferenceConfig:
    path: str | None = option(None, "frozen reference policy folder (null = model.path; with LoRA the base model "
                                    "with the adapter disabled, no second copy)", path=True)


@dataclass
class GVMCriticConfig:
    path: str | None = option(None, "the frozen GVM: a folder written by 'dvpo gvm' (required)", path=True)
    value_norm: Literal["seq", "batch", "none"] = option(
        "seq", "normalise the frozen values per sequence (official recipe), over the batch, or not at all")
    gamma: float = option(1.0, "discount of the advantage scan")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "whiten the advantages over the batch")
    score: Literal["none", "gvm_terminal"] = option(
        "none", "gvm_terminal: add the GVM's value of the final state as a terminal reward")

    def validate(self) -> None:
        if self.path is None:
            raise ConfigError("gvm.path must name a GVM folder (written by 'dvpo gvm')")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"gvm.gamma and gvm.lam must be in [0, 1], got {self.gamma}, {self.lam}")


@dataclass
class DVPOStageConfig:
    model: ModelConfig = section(ModelConfig, "the policy, initialised from model.path (normally the SFT model)")
    ref: ReferenceConfig = section(ReferenceConfig, "the frozen reference policy of the KL term")
    gvm: GVMCriticConfig = section(GVMCriticConfig, "the frozen Global Value Model and the advantage recipe")
    data: PromptDataConfig = section(PromptDataConfig, "prompts")
    rollout: RolloutConfig = section(RolloutConfig, "generation")
    actor: ActorConfig = section(ActorConfig, "the policy update")
    kl: KLConfig = section(KLConfig, "the KL penalty to the reference")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/dvpo", batch_size=32, lr=1e-6),
                                 "optimisation (train.batch_size = prompts per step), logging, checkpoints")

    def validate(self) -> None:
        if self.model.path is None and self.model.tokenizer is None:
            raise ConfigError("model.path (the SFT policy) or model.tokenizer must be set: the policy, reference and "
                              "GVM must share one tokenizer")
        if self.actor.mini_batch_size > self.train.batch_size:
            raise ConfigError(f"actor.mini_batch_size ({self.actor.mini_batch_size}) exceeds train.batch_size "
                              f"({self.train.batch_size})")


class DVPOStep(RolloutStep):
    """The frozen GVM's values -> ``dvpo_advantages`` (or its unfused twin)."""

    def __init__(self, *, gvm, gvm_cfg: GVMCriticConfig, **kw):
        super().__init__(**kw)
        self.gvm, self.gvm_cfg = gvm, gvm_cfg

    def terminal_scores(self, final_hidden: torch.Tensor) -> torch.Tensor:
        head = self.gvm.head
        return dk.value_head(final_hidden, head.weight, head.bias)

    def advantages(self, exp: Experience, metrics: dict, timer: Timer) -> None:
        g, head = self.gvm_cfg, self.gvm.head
        with timer("values"), self.autocast():
            states, final = value_states(self.gvm, exp, micro=self.micro)
        with timer("adv"):
            exp.scores = self.terminal_scores(final) if g.score == "gvm_terminal" else None
            kw = dict(old_logprobs=exp.old_logprobs, ref_logprobs=exp.ref_logprobs, kl_coef=self.kl_in_reward,
                      score=exp.scores, gamma=g.gamma, lam=g.lam, value_norm=g.value_norm,
                      whiten_advantages=g.whiten_advantages)
            if self.actor.cfg.kernels == "fused":
                exp.advantages, exp.returns, exp.values = dk.dvpo_advantages(states, head.weight, head.bias,
                                                                             exp.mask, **kw)
            else:
                bias = head.bias.float() if head.bias is not None else None
                raw = torch.nn.functional.linear(states.float(), head.weight.float(), bias).squeeze(-1)
                exp.advantages, exp.returns, exp.values = unfused.dvpo_advantages(raw, exp.mask, **kw)

    def eval_scores(self, exp: Experience) -> dict[str, torch.Tensor]:
        with self.autocast():
            _, final = value_states(self.gvm, exp, micro=self.micro)
        return {"eval/gvm_final_value": self.terminal_scores(final)}


def prompt_sets(data: PromptDataConfig, encoder: Encoder, seed: int, out_dir: Path):
    """Encoded training and held-out prompts; what was skipped is reported and saved."""
    train_stats, eval_stats = DataStats("train prompts"), DataStats("eval prompts")
    records = read_prompts(data.prompts, train_stats, limit=data.limit)
    if data.eval_prompts:
        held = read_prompts(data.eval_prompts, eval_stats)
    else:
        records, held = hold_out(records, data.eval_fraction, seed)
        train_stats.read -= len(held)
        eval_stats.read = len(held)
    for stats in (train_stats, eval_stats):
        stats.report()
    write_json(out_dir / "data_stats.json", {s.name: s.as_dict() for s in (train_stats, eval_stats)})
    train = encode_prompts(records, encoder, data.max_prompt_length)
    evals = encode_prompts(held, encoder, data.max_prompt_length)
    if data.eval_size:
        evals = evals[:data.eval_size]
    if not train:
        raise ValueError("no training prompts left after reading the data")
    return train, evals


@register_stage("dvpo", DVPOStageConfig, "policy training with a frozen GVM critic (DVPO)",
                __doc__.split("\n\n", 1)[1])
def run(cfg: DVPOStageConfig, *, reward_fn=None) -> dict[str, float]:
    """Train and export the policy; ``reward_fn(prompt_ids, response_ids) -> rewards`` (e.g. an oracle)
    is added to the evaluation when given."""
    t = cfg.train
    device = start_run(t, cfg)
    bf16 = use_bf16(t.precision, device)
    resume_from = resolve_resume(t.resume, t.output_dir)
    tokenizer = load_tokenizer(str(resume_from or cfg.model.tokenizer or cfg.model.path))
    check_same_vocabulary(tokenizer, load_tokenizer(cfg.gvm.path), f"the GVM at {cfg.gvm.path}")
    encoder = Encoder(tokenizer, template=cfg.data.template, max_length=cfg.data.max_length,
                      max_prompt_length=cfg.data.max_prompt_length)
    prompts, eval_prompts = prompt_sets(cfg.data, encoder, t.seed, Path(t.output_dir))

    policy = trainable_policy(cfg.model, tokenizer, device, t.parallel)
    reference = None
    if cfg.model.lora_r == 0 or cfg.ref.path is not None:
        reference = frozen_policy(cfg.ref.path or cfg.model.path, tokenizer, device, bf16)
    gvm = frozen_value_model(cfg.gvm.path, tokenizer, device, bf16)

    batches = EpochBatches(len(prompts), t.batch_size, seed=t.seed)
    total_steps = t.max_steps or batches.steps_for(t.epochs)
    per_rank = t.batch_size // distributed.world_size()
    micro = cfg.rollout.micro_batch_size or t.micro_batch_size or per_rank
    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, total_steps * updates_per_step(cfg.actor, t.batch_size))
    actor = ActorUpdater(policy, optimizer, scheduler, trainable_parameters(policy), cfg.actor,
                         global_batch=t.batch_size, micro=t.micro_batch_size or per_rank,
                         max_grad_norm=t.max_grad_norm, seed=t.seed, device=device, bf16=bf16)
    step = DVPOStep(gvm=gvm, gvm_cfg=cfg.gvm, policy=policy, reference=reference, prompts=prompts,
                    tokenizer=tokenizer, rollout=cfg.rollout, kl=cfg.kl, actor=actor, micro=micro, seed=t.seed,
                    device=device, bf16=bf16)
    log.info("dvpo: %d prompts (%d held out), %d steps of %d prompts, device %s%s", len(prompts), len(eval_prompts),
             total_steps, t.batch_size, device, ", bf16" if bf16 else "")

    trainer = Trainer(t, model=policy, optimizer=optimizer, scheduler=scheduler, batches=batches,
                      total_steps=total_steps, extra_state={"kl_controller": step.kl_ctl, "actor": actor})
    trainer.restore()
    eval_fn = (lambda: step.evaluate(eval_prompts, per_rank, reward_fn)) if eval_prompts else None
    return trainer.fit(step, eval_fn=eval_fn, export_fn=lambda folder, state: policy.export(folder, tokenizer, state),
                       write_extra=lambda folder: tokenizer.save_pretrained(folder))
