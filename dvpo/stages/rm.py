"""``dvpo rm``: train a Bradley-Terry reward model on preference pairs (the PPO-RLHF baseline's reward).

The model has the GVM's format: a ``*ForTokenClassification`` with one label whose backbone comes from
``model.path`` (normally the SFT model, so policy and reward model share a tokenizer) and whose score head
starts at zero. A sequence's score is the head's output at its last real token, the EOS of the response.
The loss is the mean over pairs of ``-logsigmoid(s_chosen - s_rejected)`` plus ``rm.score_l2`` times the
mean squared score (it keeps the scores near zero; off by default). Each step is one optimizer update,
accumulated over micro-batches. Held-out pairs report the pairwise accuracy (ties count one half), the
mean margin ``s_chosen - s_rejected`` and the Bradley-Terry loss. Under torchrun the model is replicated.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError, option, section
from ..data import ValueBatch, ValueExample, collate_values
from ..models import ModelConfig, ValueModel
from ..objectives import last_token_scores, pair_wins, pairwise_loss
from ..trainer import (
    EpochBatches,
    TrainConfig,
    Trainer,
    apply_update,
    autocast,
    build_optimizer,
    build_scheduler,
    distributed,
    micro_batches,
    micro_steps,
    resolve_resume,
    start_run,
    trainable_parameters,
    use_bf16,
)
from .gvm import PairDataConfig, pair_weights, prepare_data, trainable_value_model, value_checkpoint_files
from .registry import register_stage

log = logging.getLogger(__name__)


@dataclass
class RMObjectiveConfig:
    score_l2: float = option(0.0, "weight of the mean squared score added to the loss (keeps scores centred; "
                                  "0 = off)")

    def validate(self) -> None:
        if not (math.isfinite(self.score_l2) and self.score_l2 >= 0):
            raise ConfigError(f"rm.score_l2 must be a finite number >= 0, got {self.score_l2}")


@dataclass
class RMStageConfig:
    model: ModelConfig = section(ModelConfig, "backbone (model.path = the SFT model) + zero-initialised score head")
    data: PairDataConfig = section(PairDataConfig, "training and held-out preference pairs")
    rm: RMObjectiveConfig = section(RMObjectiveConfig, "the reward-model objective")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/rm"),
                                 "optimisation (train.batch_size = pairs per step), logging, checkpoints")


def sequence_scores(model: ValueModel, batch: ValueBatch) -> Tensor:
    """``[B]`` fp32: each row's score, the head's output at its last real token."""
    return last_token_scores(model(batch.input_ids, batch.attention_mask), batch.attention_mask)


def reward_loss(scores: Tensor, pairs: Tensor, normalizer, score_l2: float = 0.0) -> Tensor:
    """``(sum_pairs -logsigmoid(s_c - s_r) + score_l2 * sum_pairs (s_c^2 + s_r^2) / 2) / normalizer``. With the
    pair count of the whole batch as ``normalizer`` this is the mean loss plus ``score_l2 * mean(s^2)``, and
    micro-batches add up to it."""
    loss = pairwise_loss(scores, pairs)
    if score_l2:
        loss = loss + score_l2 * scores[pairs.reshape(-1)].pow(2).sum() / 2
    return loss / normalizer


def margins(scores: Tensor, pairs: Tensor) -> Tensor:
    return scores[pairs[:, 0]] - scores[pairs[:, 1]]


@torch.no_grad()
def evaluate_rewards(model: ValueModel, examples: list[ValueExample], *, batch_size: int, pad_token_id: int,
                     device: torch.device, bf16: bool) -> dict[str, Tensor]:
    """Pairwise accuracy (ties count one half), mean margin and mean Bradley-Terry loss over ``examples``;
    each rank scores its share and the sums are added over ranks."""
    model.eval()
    shard, weights = distributed.padded_shard(examples)  # as many forwards on every rank (FSDP2)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, wins, margin, pairs
    for start in range(0, len(shard), batch_size):
        batch = collate_values(shard[start:start + batch_size], pad_token_id).to(device)
        w = pair_weights(batch, weights[start:start + batch_size], device)
        with autocast(device, bf16):
            scores = sequence_scores(model, batch)
        d = margins(scores, batch.pairs)
        totals += torch.stack([-(w * F.logsigmoid(d)).sum(), (w * pair_wins(scores, batch.pairs)).sum(),
                               (w * d).sum(), w.sum()]).double()
    model.train()
    distributed.all_reduce_(totals)
    n = totals[3].clamp(min=1)
    return {"eval/loss": totals[0] / n, "eval/pair_acc": totals[1] / n, "eval/margin": totals[2] / n,
            "eval/pairs": totals[3]}


@register_stage("rm", RMStageConfig, "train a Bradley-Terry reward model on preference pairs (PPO-RLHF)",
                __doc__.split("\n\n", 1)[1])
def run(cfg: RMStageConfig) -> dict[str, float]:
    """Train and export the reward model; returns the final held-out metrics (empty without held-out pairs)."""
    t = cfg.train
    device = start_run(t, cfg)
    bf16 = use_bf16(t.precision, device)
    resume_from = resolve_resume(t.resume, t.output_dir)
    data = prepare_data(cfg.data, cfg.model, t, resume_from)
    tokenizer, pad = data.tokenizer, data.tokenizer.pad_token_id
    model = trainable_value_model(cfg.model, tokenizer, device, t.parallel)
    model.kind = "reward_model"

    batches = EpochBatches(len(data.train), t.batch_size, seed=t.seed)
    total_steps = t.max_steps or batches.steps_for(t.epochs)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    params = trainable_parameters(model)
    per_rank = t.batch_size // distributed.world_size()
    micro = t.micro_batch_size or per_rank
    log.info("rm: %d training pairs, %d held out, %d steps, device %s%s", len(data.train), len(data.eval),
             total_steps, device, ", bf16 autocast" if bf16 else "")

    def step_fn(indices: list[int], step: int) -> dict:
        batch = collate_values([data.train[i] for i in indices], pad).to(device)
        n = batch.num_examples
        sums = torch.zeros(3, device=device)  # loss, wins, margin (each already divided by n)
        for rows in micro_steps(micro_batches(n, micro, tokens=batch.example_tokens(),
                                              max_tokens=t.micro_batch_tokens)):
            (part,) = batch.select(rows)
            with autocast(device, bf16):
                scores = sequence_scores(model, part)
            loss = reward_loss(scores, part.pairs, n, cfg.rm.score_l2)
            loss.backward()
            scores = scores.detach()
            sums += torch.stack([loss.detach(), pair_wins(scores, part.pairs).sum() / n,
                                 margins(scores, part.pairs).sum() / n])
        grad_norm = apply_update(params, optimizer, scheduler, t.max_grad_norm)
        return {"train/loss": sums[0], "train/pair_acc": sums[1], "train/margin": sums[2],
                "train/grad_norm": grad_norm}

    eval_fn = None
    if data.eval:
        def eval_fn():
            return evaluate_rewards(model, data.eval, batch_size=per_rank, pad_token_id=pad, device=device, bf16=bf16)

    trainer = Trainer(t, model=model.module, optimizer=optimizer, scheduler=scheduler, batches=batches,
                      total_steps=total_steps)
    trainer.restore()
    model.train()
    results = trainer.fit(step_fn, eval_fn=eval_fn,
                          export_fn=lambda folder, state: model.export(folder, tokenizer, state),
                          write_extra=value_checkpoint_files(model, tokenizer, cfg.model.lora_r > 0))
    if results:
        log.info("rm: held-out pairwise accuracy %.3f, margin %.3f", results["eval/pair_acc"], results["eval/margin"])
    return results
