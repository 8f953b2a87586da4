"""``dvpo eval``: score a policy on prompts. One response is sampled per prompt (a fixed seed, so two
policies meet the same noise); reported are the mean response length, the sequence KL estimate
``sum_t log pi(y_t) - log pi_ref(y_t)`` to a reference, the mean score of each reward model or GVM given
(its head at the response's last token), and the oracle reward r* when the prompts come from the built-in
oracle task. Writes ``eval.json`` (means) and ``samples.jsonl`` (every prompt, response and score).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import ConfigError, option, section
from ..data import DataConfig, DataStats, Encoder, read_prompts
from ..models import ModelConfig, PolicyModel, load_causal_lm, load_tokenizer
from ..rl import (
    RolloutConfig,
    check_same_vocabulary,
    encode_prompts,
    frozen,
    frozen_policy,
    frozen_value_model,
    sample_and_score,
)
from ..tasks import OracleTask
from ..trainer import resolve_device, seed_everything, use_bf16, write_json
from .registry import register_stage

log = logging.getLogger(__name__)


@dataclass
class EvalDataConfig(DataConfig):
    prompts: list[str] = option(default_factory=list, path=True,
                                help="prompt JSONL files ({'prompt': ...}), or preference files (their prompts)")

    def validate(self) -> None:
        super().validate()
        if not self.prompts:
            raise ConfigError("data.prompts must name at least one file")


@dataclass
class JudgeConfig:
    reward_models: list[str] = option(default_factory=list, path=True,
                                      help="reward-model or GVM folders (dvpo rm / dvpo gvm); each adds a mean score")
    oracle: bool = option(False, "score with the built-in oracle task's reward (its prompts only)")
    oracle_seed: int = option(0, "seed of the oracle task")
    oracle_n_topics: int = option(8, "topic words of the oracle task")
    oracle_n_words: int = option(32, "response words of the oracle task")


@dataclass
class EvalRunConfig:
    output_dir: str = option("runs/eval", "folder for eval.json and samples.jsonl", path=True,
                             output=True)
    batch_size: int = option(64, "prompts per generation batch")
    seed: int = option(0, "sampling seed")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "bf16 autocast or fp32; auto = bf16 on CUDA")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class RefConfig:
    path: str | None = option(None, "reference policy folder for the KL column (null = no KL)", path=True)


@dataclass
class EvalStageConfig:
    model: ModelConfig = section(ModelConfig, "the policy to score (model.path)")
    ref: RefConfig = section(RefConfig, "the reference of the KL column")
    data: EvalDataConfig = section(EvalDataConfig, "prompts")
    rollout: RolloutConfig = section(RolloutConfig, "sampling")
    judge: JudgeConfig = section(JudgeConfig, "what scores the responses")
    eval: EvalRunConfig = section(EvalRunConfig, "output, batching, device")

    def validate(self) -> None:
        if self.model.path is None:
            raise ConfigError("model.path must name the policy folder to evaluate")


@register_stage("eval", EvalStageConfig, "score a policy: KL to a reference, reward models / GVMs, the oracle",
                __doc__.split(": ", 1)[1])
def run(cfg: EvalStageConfig) -> dict[str, float]:
    e = cfg.eval
    seed_everything(e.seed)
    device = resolve_device(e.device)
    bf16 = use_bf16(e.precision, device)
    out = Path(e.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(cfg.model.tokenizer or cfg.model.path))
    stats = DataStats("eval prompts")
    records = read_prompts(cfg.data.prompts, stats, limit=cfg.data.limit)
    stats.report()
    encoder = Encoder(tokenizer, template=cfg.data.template, max_length=cfg.data.max_length,
                      max_prompt_length=cfg.data.max_prompt_length)
    prompts = encode_prompts(records, encoder, cfg.data.max_prompt_length)
    if not prompts:
        raise ValueError("no prompts to evaluate")

    policy = frozen(PolicyModel(load_causal_lm(cfg.model, tokenizer, device)), device, bf16)
    reference = frozen_policy(cfg.ref.path, tokenizer, device, bf16, cfg.model.dtype) if cfg.ref.path else None
    judges = {}
    for path in cfg.judge.reward_models:
        check_same_vocabulary(tokenizer, load_tokenizer(path), f"the reward model at {path}")
        judges[Path(path).parent.name if Path(path).name == "final" else Path(path).name] = \
            frozen_value_model(path, tokenizer, device, bf16)
    task = OracleTask(seed=cfg.judge.oracle_seed, n_topics=cfg.judge.oracle_n_topics,
                      n_words=cfg.judge.oracle_n_words) if cfg.judge.oracle else None

    r = cfg.rollout
    samples = sample_and_score(policy, prompts, tokenizer, reference=reference, judges=judges,
                               max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                               top_k=r.top_k, engine=r.engine, seed=e.seed, batch_size=e.batch_size,
                               micro=r.micro_batch_size or e.batch_size, bf16=bf16)
    for rec, row in zip(records, samples):
        row["prompt"] = rec.prompt
        if task is not None:
            row["oracle_reward"] = task.reward(rec.prompt, row["response"])

    keys = [k for k in samples[0] if k not in ("prompt", "response")]
    results = {f"eval/{k}": sum(s[k] for s in samples) / len(samples) for k in keys}
    results["eval/prompts"] = float(len(samples))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s) + "\n" for s in samples)
    write_json(out / "eval.json", results)
    log.info("eval: %s", " ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results
