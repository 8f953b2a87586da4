"""Config sections shared by the on-policy stages (``dvpo dvpo``, ``dvpo ppo``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, option
from ..data import DataConfig


@dataclass
class PromptDataConfig(DataConfig):
    prompts: list[str] = option(default_factory=list, path=True,
                                help="prompt JSONL files ({'prompt': ...}), or preference files (their prompts)")
    eval_prompts: list[str] = option(default_factory=list, path=True,
                                     help="held-out prompts for evaluation (empty = hold out eval_fraction of "
                                          "data.prompts)")
    eval_fraction: float = option(0.05, "fraction of data.prompts held out when data.eval_prompts is empty")
    eval_size: int = option(64, "held-out prompts scored at each evaluation (0 = all)")

    def validate(self) -> None:
        super().validate()
        if not self.prompts:
            raise ConfigError("data.prompts must name at least one file")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_size < 0:
            raise ConfigError(f"data.eval_size must be >= 0, got {self.eval_size}")


@dataclass
class RolloutConfig:
    max_new_tokens: int = option(128, "longest sampled response (a row also stops at EOS)")
    temperature: float = option(1.0, "sampling temperature; log-probs and the loss use the same temperature")
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)")
    top_k: int = option(0, "sample among the k most likely tokens (0 = off)")
    engine: Literal["auto", "eager", "cuda_graph", "hf"] = option(
        "auto", "generation engine: cuda_graph on CUDA (static KV cache, graph-replayed decode), eager elsewhere, "
                "hf = transformers generate")
    micro_batch_size: int = option(0, "rows per forward when scoring rollouts (log-probs, values); 0 = "
                                      "train.micro_batch_size or the whole batch")

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.micro_batch_size < 0:
            raise ConfigError("rollout.top_k and rollout.micro_batch_size must be >= 0")


@dataclass
class ActorConfig:
    # The official DVPO recipe: 4 passes of 2 updates each (its 8-row updates on 16-prompt batches). One pass
    # over the whole batch would leave the ratio at 1 and the clipping inert; 4 passes cost 4 times the
    # update phase's forward and backward work.
    ppo_epochs: int = option(4, "passes over each rollout batch")
    mini_batch_size: int = option(0, "sequences per optimizer update within a pass (0 = half of train.batch_size: "
                                     "two updates per pass)")
    clip_low: float = option(0.2, "PPO ratio clip below 1")
    clip_high: float = option(0.2, "PPO ratio clip above 1")
    dual_clip: float | None = option(None, "dual-clip constant c > 1 for negative advantages (null = off)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = option(
        "token-mean", "loss aggregation; token-mean divides by the global token count of the mini-batch")
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    kernels: Literal["fused", "unfused"] = option(
        "fused", "fused: dvpo_kernels ops (no logits tensor, fused GAE); unfused: logits + log_softmax and a "
                 "Python-loop GAE, the way common frameworks do it (for comparisons)")
    memory: Literal["speed", "lean"] = option("speed", "fused LM-head mode (see dvpo_kernels)")
    max_bad_steps: int = option(5, "abort after this many updates skipped for a non-finite loss or gradient")

    def validate(self) -> None:
        if self.ppo_epochs < 1 or self.mini_batch_size < 0:
            raise ConfigError("actor.ppo_epochs must be >= 1 and actor.mini_batch_size >= 0")
        if not (0.0 <= self.clip_low < 1.0 and self.clip_high >= 0.0):
            raise ConfigError(f"actor.clip_low must be in [0, 1) and actor.clip_high >= 0, got "
                              f"{self.clip_low}, {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ConfigError(f"actor.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.entropy_coef < 0 or self.max_bad_steps < 0:
            raise ConfigError("actor.entropy_coef and actor.max_bad_steps must be >= 0")


@dataclass
class KLConfig:
    coef: float = option(0.2, "KL coefficient (the adaptive controller's starting value)")
    adaptive: bool = option(True, "adapt the coefficient toward kl.target (Ziegler et al.)")
    target: float = option(6.0, "target KL per sequence, nats, of the adaptive controller")
    horizon: int = option(10000, "adaptive controller horizon, in sequences")
    placement: Literal["reward", "loss"] = option(
        "reward", "reward: -coef * (logp_old - logp_ref) per token in the rewards; loss: a coef * KL term in the "
                  "policy loss")
    type: Literal["k1", "k2", "k3"] = option("k3", "KL estimator of the loss placement")

    def validate(self) -> None:
        if self.coef < 0 or self.target <= 0 or self.horizon < 1:
            raise ConfigError("kl.coef must be >= 0, kl.target > 0 and kl.horizon >= 1")
