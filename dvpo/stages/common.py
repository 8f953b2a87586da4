"""Pieces several stages share: held-out splits, the run's tokenizer, models prepared for training."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..data import DataStats, ValueBatch
from ..models import (
    ModelConfig,
    PolicyModel,
    ValueModel,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    masked_logprobs,
    train_bpe_tokenizer,
)
from ..trainer import parallel


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split into (train, held out) with ``round(len * fraction)`` held out."""
    n_eval = round(len(items) * fraction)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


def read_split(read: Callable, files: list[str], eval_files: list[str], *, fraction: float, seed: int, limit: int,
               train_stats: DataStats, eval_stats: DataStats) -> tuple[list, list]:
    """Training records ``read(files)`` and held-out ones ``read(eval_files)``, or without those a seeded
    ``fraction`` of the training records, moved from ``train_stats.read`` to ``eval_stats.read``."""
    records = read(files, train_stats, limit=limit)
    if eval_files:
        return records, read(eval_files, eval_stats)
    records, held = hold_out(records, fraction, seed)
    train_stats.read -= len(held)
    eval_stats.read = len(held)
    return records, held


def stage_tokenizer(cfg: ModelConfig, resume_from: Path | None, texts: Callable[[], Iterable[str]]):
    """The checkpoint's tokenizer on resume, else ``model.tokenizer`` / ``model.path``, else a byte-level
    BPE trained on ``texts()``."""
    source = resume_from or cfg.tokenizer or cfg.path
    if source is not None:
        return load_tokenizer(str(source))
    return train_bpe_tokenizer(texts(), cfg.vocab_size)


def trainable_policy(cfg: ModelConfig, tokenizer, device: torch.device, parallel_mode: str) -> PolicyModel:
    """The policy a stage trains: a causal LM, LoRA when asked, FSDP2-sharded under torchrun."""
    module = load_causal_lm(cfg, tokenizer, device)
    if cfg.lora_r > 0:
        module = apply_lora(module, cfg, trainable_heads=())
    policy = PolicyModel(module)
    return parallel.distribute(policy, policy.hf_model, parallel_mode, _no_head)


def _no_head(hidden, weight, bias) -> None:
    return None


def shard_frozen(model: PolicyModel | ValueModel, parallel_mode: str, enabled: bool):
    """A frozen model sharded with FSDP2 too when asked (``train.shard_frozen`` under torchrun)."""
    if enabled and parallel.use_fsdp(parallel_mode):
        parallel.shard(model, model.hf_model, *((_no_head,) if isinstance(model, PolicyModel) else ()))
    return model


def sequence_logprobs(policy: PolicyModel, batch: ValueBatch) -> torch.Tensor:
    """``[B]`` fp32: each row's summed log-prob of its response tokens, from the final hidden states (only
    the response positions go through the LM head)."""
    targets = batch.input_ids[:, 1:]

    def head(hidden, weight, bias):
        return masked_logprobs(hidden[:, :-1], weight, bias, targets, batch.mask).sum(-1)

    return policy(batch.input_ids, batch.attention_mask, head)
