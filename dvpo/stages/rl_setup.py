"""What ``dvpo dvpo`` and ``dvpo ppo`` set up alike: run folder, tokenizer, prompts, the trainable policy
and its frozen reference, batching, the policy's optimizer and schedule, and the policy updater."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, option, section
from ..data import DataStats, Encoder, read_prompts
from ..models import ModelConfig, PolicyModel, load_tokenizer
from ..rl import (
    ActorConfig,
    ActorUpdater,
    KLConfig,
    PromptDataConfig,
    RolloutConfig,
    encode_prompts,
    frozen_policy,
    updates_per_step,
)
from ..trainer import (
    EpochBatches,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    distributed,
    resolve_resume,
    start_run,
    trainable_parameters,
    use_bf16,
    write_json,
)
from .common import read_split, shard_frozen, trainable_policy

log = logging.getLogger(__name__)


@dataclass
class ReferenceConfig:
    path: str | None = option(None, "frozen reference policy folder (null = model.path; with LoRA the base model "
                                    "with the adapter disabled, no second copy)", path=True)


def prompt_sets(data: PromptDataConfig, encoder: Encoder, seed: int, out_dir: Path):
    """Encoded training and held-out prompts; what was skipped is reported and saved."""
    train_stats, eval_stats = DataStats("train prompts"), DataStats("eval prompts")
    records, held = read_split(read_prompts, data.prompts, data.eval_prompts, fraction=data.eval_fraction, seed=seed,
                               limit=data.limit, train_stats=train_stats, eval_stats=eval_stats)
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


@dataclass
class RLSetup:
    device: torch.device
    bf16: bool
    tokenizer: object
    prompts: list[list[int]]
    eval_prompts: list[list[int]]
    policy: PolicyModel
    reference: PolicyModel | None  # None: the policy with its LoRA adapter disabled
    batches: EpochBatches
    total_steps: int
    per_rank: int  # prompts per rank per step
    micro: int  # rows per scoring forward
    optimizer: torch.optim.Optimizer
    scheduler: object
    actor: ActorUpdater


def setup_rl(cfg, parallel_mode: str, actor_steps_skipped: int = 0) -> RLSetup:
    """``cfg`` has ``model``, ``ref``, ``data``, ``rollout``, ``actor`` and ``train`` sections;
    ``actor_steps_skipped`` steps do not update the policy (PPO's critic warm-up), so its schedule is
    spread over the others."""
    t = cfg.train
    device = start_run(t, cfg)
    bf16 = use_bf16(t.precision, device)
    resume_from = resolve_resume(t.resume, t.output_dir)
    tokenizer = load_tokenizer(str(resume_from or cfg.model.tokenizer or cfg.model.path))
    encoder = Encoder(tokenizer, template=cfg.data.template, max_length=cfg.data.max_length,
                      max_prompt_length=cfg.data.max_prompt_length)
    prompts, eval_prompts = prompt_sets(cfg.data, encoder, t.seed, Path(t.output_dir))

    policy = trainable_policy(cfg.model, tokenizer, device, parallel_mode)
    reference = None
    if cfg.model.lora_r == 0 or cfg.ref.path is not None:
        reference = shard_frozen(frozen_policy(cfg.ref.path or cfg.model.path, tokenizer, device, bf16,
                                               cfg.model.dtype),
                                 parallel_mode, t.shard_frozen)

    batches = EpochBatches(len(prompts), t.batch_size, seed=t.seed)
    total_steps = t.max_steps or batches.steps_for(t.epochs)
    per_rank = t.batch_size // distributed.world_size()
    optimizer = build_optimizer(policy, t)
    actor_steps = max(1, total_steps - actor_steps_skipped)
    scheduler = build_scheduler(optimizer, t, actor_steps * updates_per_step(cfg.actor, t.batch_size))
    actor = ActorUpdater(policy, optimizer, scheduler, trainable_parameters(policy), cfg.actor,
                         global_batch=t.batch_size, micro=t.micro_batch_size or per_rank,
                         max_grad_norm=t.max_grad_norm, seed=t.seed, device=device, bf16=bf16,
                         max_tokens=t.micro_batch_tokens)
    micro = cfg.rollout.micro_batch_size or t.micro_batch_size or per_rank
    log.info("%d prompts (%d held out), %d steps of %d prompts, device %s%s", len(prompts), len(eval_prompts),
             total_steps, t.batch_size, device, ", bf16" if bf16 else "")
    return RLSetup(device, bf16, tokenizer, prompts, eval_prompts, policy, reference, batches, total_steps, per_rank,
                   micro, optimizer, scheduler, actor)


@dataclass
class RLStageConfig:
    """The sections every on-policy stage has; a stage adds its critic's and its own ``train`` defaults."""

    model: ModelConfig = section(ModelConfig, "the policy, initialised from model.path (normally the SFT model)")
    ref: ReferenceConfig = section(ReferenceConfig, "the frozen reference policy of the KL term")
    data: PromptDataConfig = section(PromptDataConfig, "prompts")
    rollout: RolloutConfig = section(RolloutConfig, "generation")
    actor: ActorConfig = section(ActorConfig, "the policy update (and a critic's: epochs, mini-batches, kernels)")
    kl: KLConfig = section(KLConfig, "the KL penalty to the reference")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/rl", batch_size=32, lr=1e-6),
                                 "optimisation (train.batch_size = prompts per step), logging, checkpoints")

    def validate(self) -> None:
        check_rl_config(self.model, self.ref, self.actor, self.train)


def check_rl_config(model: ModelConfig, ref: ReferenceConfig, actor: ActorConfig, train: TrainConfig) -> None:
    if model.path is None and model.tokenizer is None:
        raise ConfigError("model.path (the SFT policy) or model.tokenizer must be set: the policy, reference and "
                          "value models must share one tokenizer")
    if model.path is None and ref.path is None:
        raise ConfigError("a policy built from config needs ref.path: the reference must be a trained model, "
                          "not a second random one")
    if actor.mini_batch_size > train.batch_size:
        raise ConfigError(f"actor.mini_batch_size ({actor.mini_batch_size}) exceeds train.batch_size "
                          f"({train.batch_size})")
