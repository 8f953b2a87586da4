"""One on-policy training step, shared by ``dvpo dvpo`` and ``dvpo ppo``:

generate -> old log-probs (+ entropy) -> reference log-probs -> the recipe's values and advantages ->
policy update -> the recipe's extra update (PPO's critic) -> KL controller -> metrics.

Metric names follow verl (``actor/*``, ``critic/*``, ``response_length/*``, ``timing_s/*``, ``perf/*``) so
dashboards carry over. Generation draws from a generator seeded by (seed, step): a resumed run samples
the same responses as an uninterrupted one.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..models import ModelConfig, PolicyModel, ValueModel, load_causal_lm, load_token_value_model
from ..models.policy import stop_token_ids
from ..rollout import RolloutEngine
from ..trainer import autocast, distributed, generation_autocast, parallel
from .actor import ActorUpdater, LossTerms
from .config import KLConfig, RolloutConfig
from .experience import Experience, policy_logprobs
from .kl import KLController


def frozen(model: PolicyModel | ValueModel, device: torch.device, bf16: bool):
    """Eval mode, no gradients; in a bf16 run the linear layers of the transformer hold bf16 weights.

    Those are exactly what bf16 autocast casts a trained model's fp32 weights to before each matmul, so
    under autocast the frozen copy computes bit for bit what the trained model computes (a policy and
    its reference agree exactly at step 0) with half the memory for nearly all its weights. Everything
    autocast leaves in fp32 stays as loaded: embeddings, norms, rotary buffers, the LM and value heads
    (read by the dvpo_kernels ops). A frozen model is run under the run's autocast."""
    model.requires_grad_(False).eval()
    model.to(device)
    if bf16:
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.Linear):
                m.to(torch.bfloat16)
    return model


def frozen_policy(path: str, tokenizer, device: torch.device, bf16: bool, dtype: str = "float32") -> PolicyModel:
    """``dtype``: that of the trained policy (``model.dtype``), so that both compute alike."""
    cfg = ModelConfig(path=path, dtype=dtype)
    return frozen(PolicyModel(load_causal_lm(cfg, tokenizer, device)), device, bf16)


def frozen_value_model(path: str, tokenizer, device: torch.device, bf16: bool) -> ValueModel:
    """A trained value model folder (GVM, reward model, critic) loaded for scoring only."""
    return frozen(ValueModel(load_token_value_model(ModelConfig(path=path), tokenizer, device)), device, bf16)


def check_same_vocabulary(tokenizer, other, what: str) -> None:
    if tokenizer.get_vocab() != other.get_vocab():
        raise ValueError(f"{what} was trained with a different tokenizer than the policy; the value of a state "
                         f"is only meaningful over the same tokens")


class Timer:
    """Wall-clock seconds per phase; synchronises CUDA so a phase's kernels count in it."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


class RolloutStep:
    """Subclasses implement :meth:`advantages` (fill ``exp.values/advantages/returns``) and may override
    :meth:`after_actor`."""

    def __init__(self, *, policy: PolicyModel, reference: PolicyModel | None, prompts: list[list[int]], tokenizer,
                 rollout: RolloutConfig, kl: KLConfig, actor: ActorUpdater, micro: int, seed: int,
                 device: torch.device, bf16: bool, max_tokens: int = 0):
        self.policy, self.reference, self.prompts, self.tokenizer = policy, reference, prompts, tokenizer
        self.rollout_cfg, self.kl_cfg, self.actor, self.micro = rollout, kl, actor, micro
        self.max_tokens = max_tokens  # token budget of the scoring forwards (0: ``micro`` rows)
        self.seed, self.device, self.bf16 = seed, device, bf16
        self.kl_ctl = KLController(kl.coef, adaptive=kl.adaptive, target=kl.target, horizon=kl.horizon)
        self.engine = RolloutEngine(policy.hf_model, rollout.engine)
        self.stop_ids = stop_token_ids(policy.hf_model, tokenizer)

    # --- phases ----------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], step: int, **overrides) -> Experience:
        r = self.rollout_cfg
        generator = torch.Generator(self.device).manual_seed(
            ((self.seed * 1_000_003 + step) * 1_000_033 + distributed.rank()) % 2**63)
        kw = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        kw.update(overrides)
        with parallel.gathered_root(self.policy, layers=True), torch.no_grad(), \
                generation_autocast(self.device, self.bf16):
            rollout = self.engine.generate(prompt_ids, pad_token_id=self.tokenizer.pad_token_id,
                                           eos_token_id=self.stop_ids, generator=generator, **kw)
        return Experience.from_rollout(rollout)

    def logprobs(self, model: PolicyModel, exp: Experience, **kw):
        with self.autocast():
            return policy_logprobs(model, exp, temperature=self.rollout_cfg.temperature, micro=self.micro,
                                   max_tokens=self.max_tokens,
                                   unfused=self.actor.cfg.kernels == "unfused", memory=self.actor.cfg.memory, **kw)

    def reference_logprobs(self, exp: Experience) -> torch.Tensor:
        if self.reference is not None:
            return self.logprobs(self.reference, exp)
        with self.policy.adapter_disabled():
            return self.logprobs(self.policy, exp)

    def autocast(self):
        return autocast(self.device, self.bf16)

    @property
    def kl_in_reward(self) -> float:
        return self.kl_ctl.value if self.kl_cfg.placement == "reward" else 0.0

    def advantages(self, exp: Experience, metrics: dict, timer: Timer) -> None:
        raise NotImplementedError

    def after_actor(self, exp: Experience, step: int, metrics: dict, timer: Timer) -> None:
        """Updates that follow the policy's (PPO's critic)."""

    def trains_actor(self, step: int) -> bool:
        """False for steps that only train something else (PPO's critic warm-up)."""
        return True

    # --- the step --------------------------------------------------------------------------
    def __call__(self, indices: list[int], step: int) -> dict:
        timer = Timer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        metrics: dict = {}
        with timer("step"):
            with timer("gen"):
                exp = self.generate([self.prompts[i] for i in indices], step)
            self.policy.eval()
            with timer("old_log_prob"):
                exp.old_logprobs, exp.entropy = self.logprobs(self.policy, exp, return_entropy=True)
            with timer("ref"):
                exp.ref_logprobs = self.reference_logprobs(exp)
            self.advantages(exp, metrics, timer)
            kl_coef = self.kl_ctl.value
            terms = LossTerms(temperature=self.rollout_cfg.temperature, kl_type=self.kl_cfg.type,
                              kl_coef=kl_coef if self.kl_cfg.placement == "loss" else 0.0)
            if self.trains_actor(step):
                with timer("update_actor"):
                    metrics.update(self.actor(exp, step, terms))
            self.after_actor(exp, step, metrics, timer)
            seq_kl = torch.where(exp.mask, exp.old_logprobs - exp.ref_logprobs, 0.0).sum(-1)
            mean_kl = distributed.all_reduce_(seq_kl.mean().detach().clone(), "mean")
            self.kl_ctl.update(float(mean_kl), exp.batch_size * distributed.world_size())
        metrics.update(self.batch_metrics(exp, kl_coef, mean_kl))
        metrics.update({f"timing_s/{k}": v for k, v in timer.times.items()})
        tokens = exp.attention_mask.sum() * distributed.world_size()
        metrics["perf/throughput"] = tokens / timer.times["step"]
        if self.device.type == "cuda":
            metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def batch_metrics(self, exp: Experience, kl_coef: float, mean_kl: torch.Tensor) -> dict:
        m = exp.mask
        count = m.sum().clamp(min=1)
        lengths = m.sum(-1).float()

        def mean(x):
            return torch.where(m, x, 0.0).sum() / count

        out = {"actor/entropy": mean(exp.entropy), "critic/kl": mean_kl, "critic/kl_coef": kl_coef,
               "critic/advantages/mean": mean(exp.advantages), "critic/returns/mean": mean(exp.returns),
               "critic/values/mean": mean(exp.values), "response_length/mean": lengths.mean(),
               "response_length/max": lengths.max(), "response_length/min": lengths.min(),
               "response_length/clip_ratio": (~exp.finished).float().mean()}
        if exp.scores is not None:
            out["critic/score/mean"] = exp.scores.mean()
        return out

    # --- evaluation ------------------------------------------------------------------------
    def eval_scores(self, exp: Experience) -> dict[str, torch.Tensor]:
        """Per-row scores ``[B]`` the recipe reports on held-out prompts (e.g. the GVM's final value)."""
        return {}

    @torch.no_grad()
    def evaluate(self, prompts: list[list[int]], batch_size: int, reward_fn=None) -> dict[str, torch.Tensor]:
        """Sample one response per held-out prompt (same seed at every evaluation) and report its mean
        length, sequence KL to the reference, the recipe's scores and ``reward_fn(prompt_ids, response_ids)``
        (e.g. an oracle reward) when given; sums are taken over ranks. Every rank's share is padded to the
        same length with zero-weight repeats, so all ranks run the same forwards (each is a collective
        under FSDP2)."""
        shard, weights = distributed.padded_shard(prompts)
        sums: dict[str, torch.Tensor] = {}
        self.policy.eval()
        for start in range(0, len(shard), batch_size):
            exp = self.generate(shard[start:start + batch_size], step=-1)
            w = torch.tensor(weights[start:start + batch_size], dtype=torch.float64, device=self.device)
            exp.old_logprobs = self.logprobs(self.policy, exp)
            exp.ref_logprobs = self.reference_logprobs(exp)
            rows = {"eval/response_length": exp.mask.sum(-1).float(),
                    "eval/kl": torch.where(exp.mask, exp.old_logprobs - exp.ref_logprobs, 0.0).sum(-1),
                    **self.eval_scores(exp)}
            if reward_fn is not None:
                responses = [exp.targets[b, :n].tolist() for b, n in enumerate(exp.lengths)]
                rows["eval/reward"] = torch.tensor(reward_fn(shard[start:start + batch_size], responses),
                                                   dtype=torch.float32, device=self.device)
            for k, v in rows.items():
                sums[k] = sums.get(k, 0.0) + (v.double() * w).sum()
        sums["eval/prompts"] = torch.tensor(float(sum(weights)), dtype=torch.float64, device=self.device)
        names = list(sums)
        totals = distributed.all_reduce_(torch.stack([torch.as_tensor(sums[k], device=self.device) for k in names]))
        n = totals[-1].clamp(min=1)
        return {k: (totals[i] / n if k != "eval/prompts" else totals[i]) for i, k in enumerate(names)}
