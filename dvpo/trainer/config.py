"""Options every training stage shares: run folder, length, optimiser, schedule, precision, saving."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, option


@dataclass
class TrainConfig:
    output_dir: str = option("runs/run", "run folder: config.yaml, metrics.jsonl, global_step_N/ checkpoints, final/",
                             path=True, output=True)
    seed: int = option(42, "seed of every random generator (model init, data order, splits)")
    epochs: float = option(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = option(0, "training steps (one batch each); 0 = derive from epochs")
    batch_size: int = option(32, "training examples per step (pairs for preference data)")
    micro_batch_size: int = option(0, "examples per forward/backward; gradients accumulate over a step's "
                                      "micro-batches (0 = no accumulation)")
    micro_batch_tokens: int = option(0, "token budget per micro-batch instead of a row count: rows sorted by "
                                        "length into micro-batches of rows x longest row <= budget, as many on "
                                        "every rank (0 = use micro_batch_size)")
    lr: float = option(1e-5, "peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only; never biases or norms)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    lr_schedule: Literal["cosine", "linear", "constant"] = option("cosine", "decay after warm-up")
    warmup_steps: int = option(0, "optimizer updates of linear warm-up (overrides warmup_ratio when > 0)")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of all optimizer updates")
    min_lr_ratio: float = option(0.0, "the decay ends at lr * min_lr_ratio")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 autocast or fp32; auto = bf16 on CUDA, "
                                                                 "fp32 on CPU")
    device: str = option("auto", "auto (cuda when available), cpu, cuda, cuda:N")
    parallel: Literal["auto", "fsdp", "replicate"] = option(
        "auto", "under torchrun: shard the trained model with FSDP2 (fsdp) or keep full replicas and average "
                "gradients (replicate); auto = fsdp for stages that support it")
    shard_frozen: bool = option(False, "with FSDP2, shard the frozen reference and GVM too (dvpo): less memory per "
                                       "rank, one more all-gather per layer of their forwards")
    packing: Literal["auto", "on", "off"] = option(
        "auto", "padding-free forwards: the valid tokens of a micro-batch run as one packed row with per-sequence "
                "positions; auto = wherever the attention supports it (flash_attention_*, or sdpa/eager in "
                "transformers' masking_utils models) and the batch has padding")
    log_every: int = option(1, "steps between metric lines (metrics.jsonl, TensorBoard, progress bar)")
    eval_every: int = option(0, "steps between evaluations (0 = only at the end)")
    save_every: int = option(0, "steps between checkpoints global_step_N/, plus one at the last step "
                                "(0 = no checkpoints)")
    async_save: bool = option(False, "write checkpoints in the background: model and optimizer state are copied to "
                                     "CPU memory and training continues while they are written (one at a time)")
    save_total_limit: int = option(2, "checkpoints kept; older ones are deleted (0 = keep all)")
    resume: str = option("auto", "auto (latest complete checkpoint in output_dir, if any), none, or a path to a "
                                 "global_step_N folder")
    progress_bar: bool = option(True, "show a tqdm progress bar")

    def validate(self) -> None:
        positive = {"batch_size": self.batch_size, "lr": self.lr, "log_every": self.log_every}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {value}")
        non_negative = {"micro_batch_size": self.micro_batch_size, "micro_batch_tokens": self.micro_batch_tokens,
                        "max_steps": self.max_steps,
                        "epochs": self.epochs, "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps,
                        "max_grad_norm": self.max_grad_norm, "eval_every": self.eval_every,
                        "save_every": self.save_every, "save_total_limit": self.save_total_limit}
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {value}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("train.epochs must be > 0 when train.max_steps is 0")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ConfigError("train.adam_beta1 and train.adam_beta2 must be in [0, 1)")
        if self.resume not in ("auto", "none") and not os.path.isdir(self.resume):
            raise ConfigError(f"train.resume: no such checkpoint folder: {self.resume}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
