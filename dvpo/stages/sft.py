"""``dvpo sft``: supervised fine-tuning of a causal LM, the reference policy of the RL stages.

The loss is the token-mean negative log-likelihood of the response tokens (EOS included); prompt and
padding tokens get no loss and cost no LM-head work: the response positions are gathered and their
log-probs come from ``dvpo_kernels.linear_logprobs`` (no logits tensor). Data: ``{"prompt",
"response"}`` records, or preference files, whose chosen responses are the demonstrations.
Held-out examples report the per-token NLL and perplexity.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, option, section
from ..data import (
    DataConfig,
    DataStats,
    Demonstration,
    Encoder,
    ValueExample,
    collate_values,
    read_demonstrations,
    render_prompt,
    render_response,
)
from ..models import ModelConfig
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
    write_json,
)
from .common import read_split, sequence_logprobs, stage_tokenizer, trainable_policy
from .registry import register_stage

log = logging.getLogger(__name__)


@dataclass
class SFTDataConfig(DataConfig):
    train: list[str] = option(default_factory=list, path=True,
                              help="JSONL files of prompt/response records, or preference files (chosen side)")
    eval: list[str] = option(default_factory=list, path=True,
                             help="held-out files (empty = hold out eval_fraction of data.train)")
    eval_fraction: float = option(0.05, "fraction of data.train held out when data.eval is empty")

    def validate(self) -> None:
        super().validate()
        if not self.train:
            raise ConfigError("data.train must name at least one file")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class SFTStageConfig:
    model: ModelConfig = section(ModelConfig, "the causal LM to fine-tune (a local folder, or built from config)")
    data: SFTDataConfig = section(SFTDataConfig, "demonstrations")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/sft"), "optimisation, logging, checkpoints")


def encode_demonstrations(demos: list[Demonstration], encoder: Encoder) -> list[ValueExample]:
    out = []
    for demo in demos:
        seqs = encoder.encode(demo.prompt, [demo.response], demo.where)
        if seqs is not None:
            out.append(ValueExample(tuple(seqs), (0.0,)))
    return out


@register_stage("sft", SFTStageConfig, "supervised fine-tuning on demonstrations (the reference policy)",
                __doc__.split("\n\n", 1)[1])
def run(cfg: SFTStageConfig) -> dict[str, float]:
    t = cfg.train
    device = start_run(t, cfg)
    bf16 = use_bf16(t.precision, device)
    resume_from = resolve_resume(t.resume, t.output_dir)

    train_stats, eval_stats = DataStats("train demonstrations"), DataStats("eval demonstrations")
    demos, held = read_split(read_demonstrations, cfg.data.train, cfg.data.eval, fraction=cfg.data.eval_fraction,
                             seed=t.seed, limit=cfg.data.limit, train_stats=train_stats, eval_stats=eval_stats)
    tokenizer = stage_tokenizer(cfg.model, resume_from, lambda: (
        render_prompt(d.prompt, None, "plain") + render_response(d.prompt, d.response, "plain") for d in demos))
    kw = {"template": cfg.data.template, "max_length": cfg.data.max_length,
          "max_prompt_length": cfg.data.max_prompt_length, "truncation": cfg.data.truncation}
    train = encode_demonstrations(demos, Encoder(tokenizer, stats=train_stats, **kw))
    evals = encode_demonstrations(held, Encoder(tokenizer, stats=eval_stats, **kw))
    for stats in (train_stats, eval_stats):
        stats.report()
    write_json(Path(t.output_dir) / "data_stats.json", {s.name: s.as_dict() for s in (train_stats, eval_stats)})
    if not train:
        raise ValueError("no training examples left after reading and encoding the data")

    policy = trainable_policy(cfg.model, tokenizer, device, t.parallel)
    batches = EpochBatches(len(train), t.batch_size, seed=t.seed)
    total_steps = t.max_steps or batches.steps_for(t.epochs)
    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    params = trainable_parameters(policy)
    pad = tokenizer.pad_token_id
    per_rank = t.batch_size // distributed.world_size()
    micro = t.micro_batch_size or per_rank
    log.info("sft: %d training examples, %d held out, %d steps, device %s", len(train), len(evals), total_steps, device)

    def step_fn(indices: list[int], step: int) -> dict:
        batch = collate_values([train[i] for i in indices], pad).to(device)
        normalizer = distributed.token_normalizer(batch.mask.sum())
        loss_sum = torch.zeros((), device=device)
        groups = micro_batches(len(indices), micro, tokens=batch.example_tokens(), max_tokens=t.micro_batch_tokens)
        for rows in micro_steps(groups):
            (part,) = batch.select(rows)
            with autocast(device, bf16):
                loss = -sequence_logprobs(policy, part).sum() / normalizer
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = apply_update(params, optimizer, scheduler, t.max_grad_norm)
        tokens = batch.mask.sum()
        return {"train/loss": loss_sum * normalizer / tokens.clamp(min=1), "train/grad_norm": grad_norm,
                "train/tokens": tokens}

    @torch.no_grad()
    def eval_fn() -> dict:
        """Held-out NLL; every rank runs the same forwards (padding entries weigh 0)."""
        policy.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        shard, weights = distributed.padded_shard(evals)
        for start in range(0, len(shard), per_rank):
            batch = collate_values(shard[start:start + per_rank], pad).to(device)
            w = torch.tensor(weights[start:start + per_rank], dtype=torch.float64, device=device)
            with autocast(device, bf16):
                nll = -sequence_logprobs(policy, batch).double()
            totals += torch.stack([(nll * w).sum(), (batch.mask.sum(-1).double() * w).sum()])
        policy.train()
        distributed.all_reduce_(totals)
        nll = totals[0] / totals[1].clamp(min=1)
        return {"eval/nll": nll, "eval/ppl": torch.exp(nll), "eval/tokens": totals[1]}

    trainer = Trainer(t, model=policy, optimizer=optimizer, scheduler=scheduler, batches=batches,
                      total_steps=total_steps)
    trainer.restore()
    policy.train()
    results = trainer.fit(step_fn, eval_fn=eval_fn if evals else None,
                          export_fn=lambda folder, state: policy.export(folder, tokenizer, state),
                          write_extra=lambda folder: tokenizer.save_pretrained(folder))
    if results:
        log.info("sft: held-out nll %.4f (ppl %.2f)", results["eval/nll"], math.exp(results["eval/nll"]))
    return results
