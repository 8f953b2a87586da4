"""``dvpo dpo``: Direct Preference Optimization of the SFT policy on preference pairs (a baseline).

The policy starts from ``model.path`` (the SFT model, whose tokenizer is used) and the reference is that
initial policy. Before training, a frozen copy of it (with LoRA: the policy with its adapter disabled, no
copy) computes the reference log-prob of every training and held-out response once, in batches, and is
freed; a resumed run recomputes them the same way. Log-probs come from final hidden states through
``dvpo_kernels`` (no logits tensor); a response's log-prob is the sum over its tokens (EOS included).
With ``h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))``:
``dpo.loss=sigmoid`` is DPO, ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)`` with ``eps =
dpo.label_smoothing``; ``dpo.loss=ipo`` is IPO, ``(h - 1/(2 beta))^2``, where, as TRL does, each
response's log-probs are averaged over its tokens instead of summed.

Each step is one optimizer update on ``train.batch_size`` pairs, accumulated over micro-batches of
``train.micro_batch_size`` pairs (the same gradient as the whole batch at once). Metrics follow TRL:
``train/loss``, ``rewards/chosen`` and ``rewards/rejected`` (``beta * (log pi - log ref)``, batch means),
``rewards/accuracies`` (chosen reward strictly higher), ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, ``train/grad_norm``; on held-out pairs ``eval/loss``, ``eval/rewards/accuracies``,
``eval/rewards/margins``, ``eval/rewards/chosen``, ``eval/rewards/rejected``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..config import ConfigError, option, section
from ..data import EncodedSequence, ValueBatch, ValueExample, collate_values
from ..models import ModelConfig, PolicyModel
from ..objectives import implicit_rewards, preference_loss, value_incentive
from ..rl import frozen_policy
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
from .common import sequence_logprobs, trainable_policy
from .gvm import PairDataConfig, prepare_data
from .registry import register_stage

log = logging.getLogger(__name__)


# --- configuration ---------------------------------------------------------------------------

@dataclass
class DPOObjectiveConfig:
    loss: Literal["sigmoid", "ipo"] = option(
        "sigmoid", "sigmoid = DPO on summed response log-probs; ipo = IPO's squared loss on per-token averaged "
                   "log-probs (as TRL)")
    beta: float = option(0.1, "strength of the implicit KL to the reference (DPO's beta; IPO's target margin is "
                              "1/(2 beta))")
    label_smoothing: float = option(0.0, "sigmoid only: assumed rate of flipped labels (conservative DPO), in "
                                         "[0, 0.5)")

    def validate(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"dpo.beta must be a finite number > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("dpo.label_smoothing applies to dpo.loss=sigmoid only; set it to 0 with ipo")


@dataclass
class DPOStageConfig:
    model: ModelConfig = section(ModelConfig, "the policy, initialised from model.path (the SFT model), which is "
                                              "also the frozen reference")
    data: PairDataConfig = section(PairDataConfig, "training and held-out preference pairs")
    dpo: DPOObjectiveConfig = section(DPOObjectiveConfig, "the preference loss")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/dpo", lr=1e-6),
                                 "optimisation (train.batch_size = pairs per step), logging, checkpoints")

    def validate(self) -> None:
        if self.model.path is None:
            raise ConfigError("model.path must name the policy to start from (the SFT model); it is also the "
                              "reference")


# --- data ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreferenceExample:
    """A pair with the reference's summed log-probs of its two responses."""

    chosen: EncodedSequence
    rejected: EncodedSequence
    ref_chosen: float
    ref_rejected: float

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt (the less truncated of the two; each side's prompt is cut to fit its response)."""
        return max(self.chosen.prompt_ids, self.rejected.prompt_ids, key=len)


def collate_rows(sequences: list[EncodedSequence], pad_token_id: int) -> ValueBatch:
    """One right-padded row per sequence, in order."""
    return collate_values([ValueExample((s,), (0.0,)) for s in sequences], pad_token_id)


@torch.no_grad()
def reference_logprobs(model: PolicyModel, sequences: list[EncodedSequence], *, batch_size: int, pad_token_id: int,
                       device: torch.device, bf16: bool) -> list[float]:
    """Summed response log-probs of ``sequences`` under ``model`` (an unsharded frozen model), in batches of
    ``batch_size`` rows; each rank computes a strided share and the shares are summed over ranks, so every
    rank gets all of them. The same inputs give the same numbers (a resumed run recomputes them)."""
    out = torch.zeros(len(sequences), device=device)
    mine = list(range(distributed.rank(), len(sequences), distributed.world_size()))
    training = model.training
    model.eval()
    for start in range(0, len(mine), batch_size):
        rows = mine[start:start + batch_size]
        batch = collate_rows([sequences[i] for i in rows], pad_token_id).to(device)
        with autocast(device, bf16):
            out[torch.tensor(rows, device=device)] = sequence_logprobs(model, batch).float()
    model.train(training)
    return distributed.all_reduce_(out).tolist()


class Reference:
    """The frozen reference, the initial policy: a copy loaded from ``model.path``, or with LoRA the trained
    policy with its adapter disabled (no second copy). :meth:`release` frees the copy."""

    def __init__(self, cfg: ModelConfig, policy: PolicyModel, tokenizer, *, batch_size: int, device: torch.device,
                 bf16: bool):
        self.policy, self.batch_size, self.device, self.bf16 = policy, batch_size, device, bf16
        self.pad_token_id = tokenizer.pad_token_id
        self.copy = None if cfg.lora_r > 0 else frozen_policy(cfg.path, tokenizer, device, bf16, cfg.dtype)

    @contextlib.contextmanager
    def active(self):
        """The model computing as the reference, for the duration of the block."""
        if self.copy is not None:
            yield self.copy
        else:
            with self.policy.adapter_disabled():
                yield self.policy

    def logprobs(self, sequences: list[EncodedSequence]) -> list[float]:
        with self.active() as model:
            return reference_logprobs(model, sequences, batch_size=self.batch_size, pad_token_id=self.pad_token_id,
                                      device=self.device, bf16=self.bf16)

    def pairs(self, examples: list[ValueExample]) -> list[PreferenceExample]:
        """Encoded (chosen, rejected) pairs with their reference log-probs."""
        logps = self.logprobs([s for ex in examples for s in ex.sequences])
        return [PreferenceExample(ex.sequences[0], ex.sequences[1], logps[2 * i], logps[2 * i + 1])
                for i, ex in enumerate(examples)]

    def release(self) -> None:
        self.copy = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --- training --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValueTerm:
    """VPO's term added to the preference loss: ``sign * alpha * beta * mean(log pi(y|x) - log pi_ref(y|x))``
    over one calibration response per pair, its chosen response (``samples`` None) or the sample that
    ``samples`` holds for its prompt (``tuple(prompt_ids) -> (sequence, reference log-prob)``)."""

    sign: int
    alpha: float
    samples: dict[tuple[int, ...], tuple[EncodedSequence, float]] | None = None


class PreferenceStep:
    """One optimizer update on a batch of pairs: every micro-batch's loss is divided by the pair count of
    the rank's batch before its backward, so the accumulated gradient is that of the whole batch's mean
    loss (and averaging over ranks gives the global mean)."""

    def __init__(self, policy: PolicyModel, optimizer, scheduler, examples: list[PreferenceExample],
                 objective: DPOObjectiveConfig, *, pad_token_id: int, micro: int, max_grad_norm: float,
                 max_tokens: int = 0,
                 device: torch.device, bf16: bool, value_term: ValueTerm | None = None,
                 extra_metrics: Callable[[], dict] | None = None):
        self.policy, self.optimizer, self.scheduler, self.examples = policy, optimizer, scheduler, examples
        self.objective, self.pad_token_id, self.micro, self.max_tokens = objective, pad_token_id, micro, max_tokens
        self.max_grad_norm = max_grad_norm
        self.device, self.bf16, self.value_term, self.extra_metrics = device, bf16, value_term, extra_metrics
        self.params = trainable_parameters(policy)

    def tokens(self, ex: PreferenceExample, with_value_term: bool) -> int:
        """Tokens ``ex`` puts through the policy: chosen, rejected, and its calibration sample if any."""
        n = len(ex.chosen) + len(ex.rejected)
        if with_value_term and self.value_term.samples is not None:
            n += len(self.value_term.samples[tuple(ex.prompt_ids)][0])
        return n

    def calibration(self, group: list[PreferenceExample]) -> tuple[list[EncodedSequence], list[float]] | None:
        """The calibration samples of ``group``'s prompts and their reference log-probs (None: pi_cal is the
        chosen responses)."""
        if self.value_term.samples is None:
            return None
        samples = [self.value_term.samples[tuple(ex.prompt_ids)] for ex in group]
        return [s for s, _ in samples], [lp for _, lp in samples]

    def forward(self, group: list[PreferenceExample], with_value_term: bool) -> dict[str, Tensor]:
        """Per-pair terms of ``group``: ``loss`` (the preference loss, plus the value term when asked),
        ``preference_loss``, ``value_term``, ``chosen``/``rejected`` (the loss's log-probs) and their rewards."""
        o, n = self.objective, len(group)
        calibration = self.calibration(group) if with_value_term else None
        rows = [ex.chosen for ex in group] + [ex.rejected for ex in group] + (calibration[0] if calibration else [])
        batch = collate_rows(rows, self.pad_token_id).to(self.device)
        with autocast(self.device, self.bf16):
            logps = sequence_logprobs(self.policy, batch).float()
        pi = torch.stack([logps[:n], logps[n:2 * n]])
        ref = torch.tensor([[ex.ref_chosen for ex in group], [ex.ref_rejected for ex in group]], device=self.device)
        pi_loss, ref_loss = pi, ref
        if o.loss == "ipo":
            lengths = torch.tensor([[len(ex.chosen.response_ids) for ex in group],
                                    [len(ex.rejected.response_ids) for ex in group]], device=self.device)
            pi_loss, ref_loss = pi / lengths, ref / lengths
        loss = preference_loss(pi_loss[0], pi_loss[1], ref_loss[0], ref_loss[1], beta=o.beta, loss_type=o.loss,
                               label_smoothing=o.label_smoothing)
        terms = {"loss": loss, "preference_loss": loss, "chosen": pi_loss[0].detach(),
                 "rejected": pi_loss[1].detach(), "rewards/chosen": implicit_rewards(pi_loss[0], ref_loss[0], o.beta),
                 "rewards/rejected": implicit_rewards(pi_loss[1], ref_loss[1], o.beta)}
        if with_value_term:
            if calibration is None:
                cal, cal_ref = pi[0], ref[0]
            else:
                cal, cal_ref = logps[2 * n:], torch.tensor(calibration[1], device=self.device)
            v = self.value_term
            terms["value_term"] = value_incentive(cal, cal_ref, alpha=v.alpha, beta=o.beta, sign=v.sign)
            terms["loss"] = loss + terms["value_term"]
        return terms

    def accumulate(self, indices: list[int]) -> dict[str, Tensor]:
        """Forward and backward over micro-batches; returns the batch means of the metrics (gradients are
        left in ``.grad``)."""
        n = len(indices)
        with_value_term = self.value_term is not None
        sums: dict[str, Tensor] = {}
        tokens = [self.tokens(self.examples[i], with_value_term) for i in indices]
        for rows in micro_steps(micro_batches(n, self.micro, tokens=tokens, max_tokens=self.max_tokens)):
            terms = self.forward([self.examples[indices[r]] for r in rows], with_value_term)
            (terms["loss"].sum() / n).backward()
            for name, value in pair_metrics(terms).items():
                sums[train_name(name)] = sums.get(train_name(name), 0.0) + value.detach().sum() / n
        return sums

    def __call__(self, indices: list[int], step: int) -> dict:
        metrics = self.accumulate(indices)
        metrics["train/grad_norm"] = apply_update(self.params, self.optimizer, self.scheduler, self.max_grad_norm)
        if self.extra_metrics is not None:
            metrics.update(self.extra_metrics())
        return metrics

    @torch.no_grad()
    def evaluate(self, examples: list[PreferenceExample]) -> dict[str, Tensor]:
        """The preference loss and reward metrics on held-out pairs (a multiple of the world size of them, so
        every rank runs the same forwards; the value term is not part of ``eval/loss``)."""
        self.policy.eval()
        world = distributed.world_size()
        shard = examples[:len(examples) // world * world][distributed.rank()::world]
        names = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
        totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        for start in range(0, len(shard), self.micro):
            stats = pair_metrics(self.forward(shard[start:start + self.micro], with_value_term=False))
            totals += torch.stack([stats[k].sum() for k in names]
                                  + [torch.tensor(float(len(stats["loss"])), device=self.device)]).double()
        self.policy.train()
        distributed.all_reduce_(totals)
        count = totals[-1].clamp(min=1)
        return {**{f"eval/{k}": totals[i] / count for i, k in enumerate(names)}, "eval/pairs": totals[-1]}


def pair_metrics(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-pair values of the logged metrics, under TRL's names (``loss`` is logged as ``train/loss``)."""
    chosen, rejected = terms["rewards/chosen"], terms["rewards/rejected"]
    out = {"loss": terms["loss"], "rewards/chosen": chosen, "rewards/rejected": rejected,
           "rewards/accuracies": (chosen > rejected).float(), "rewards/margins": chosen - rejected,
           "logps/chosen": terms["chosen"], "logps/rejected": terms["rejected"]}
    if "value_term" in terms:
        out["preference_loss"], out["value_term"] = terms["preference_loss"], terms["value_term"]
    return out


def train_name(metric: str) -> str:
    return metric if "/" in metric else f"train/{metric}"


# --- the stage -------------------------------------------------------------------------------

@dataclass
class PreferenceRun:
    """What the DPO and VPO stages set up alike: the run's device, tokenizer, policy, reference and pairs
    (with their reference log-probs)."""

    device: torch.device
    bf16: bool
    tokenizer: object
    policy: PolicyModel
    reference: Reference
    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    micro: int


def prepare_run(cfg: DPOStageConfig) -> PreferenceRun:
    """Run folder, data, policy and reference; every pair gets its reference log-probs."""
    t = cfg.train
    device = start_run(t, cfg)
    bf16 = use_bf16(t.precision, device)
    data = prepare_data(cfg.data, cfg.model, t, resolve_resume(t.resume, t.output_dir))
    policy = trainable_policy(cfg.model, data.tokenizer, device, t.parallel)
    micro = t.micro_batch_size or t.batch_size // distributed.world_size()
    reference = Reference(cfg.model, policy, data.tokenizer, batch_size=2 * micro, device=device, bf16=bf16)
    train, evals = reference.pairs(data.train), reference.pairs(data.eval)
    log.info("%d training pairs and %d held-out pairs scored by the reference", len(train), len(evals))
    return PreferenceRun(device, bf16, data.tokenizer, policy, reference, train, evals, micro)


def train_policy(cfg: DPOStageConfig, run: PreferenceRun, batches, total_steps: int, *,
                 value_term: ValueTerm | None = None, extra_state: dict | None = None,
                 extra_metrics: Callable[[], dict] | None = None) -> dict[str, float]:
    """Optimise the policy for ``total_steps`` steps over ``batches`` (indices into ``run.train``), evaluate,
    export ``final/``; returns the final held-out metrics (empty without held-out pairs)."""
    t, policy, tokenizer = cfg.train, run.policy, run.tokenizer
    optimizer = build_optimizer(policy, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    step = PreferenceStep(policy, optimizer, scheduler, run.train, cfg.dpo, pad_token_id=tokenizer.pad_token_id,
                          micro=run.micro, max_tokens=t.micro_batch_tokens, max_grad_norm=t.max_grad_norm,
                          device=run.device, bf16=run.bf16, value_term=value_term, extra_metrics=extra_metrics)
    trainer = Trainer(t, model=policy, optimizer=optimizer, scheduler=scheduler, batches=batches,
                      total_steps=total_steps, extra_state=extra_state)
    trainer.restore()
    policy.train()
    eval_fn = (lambda: step.evaluate(run.eval)) if run.eval else None
    return trainer.fit(step, eval_fn=eval_fn, export_fn=lambda folder, state: policy.export(folder, tokenizer, state),
                       write_extra=lambda folder: tokenizer.save_pretrained(folder))


@register_stage("dpo", DPOStageConfig, "Direct Preference Optimization of the SFT policy (DPO / IPO baseline)",
                __doc__.split("\n\n", 1)[1])
def run(cfg: DPOStageConfig) -> dict[str, float]:
    """Train and export the policy; returns the final held-out metrics."""
    r = prepare_run(cfg)
    r.reference.release()
    t = cfg.train
    batches = EpochBatches(len(r.train), t.batch_size, seed=t.seed)
    total_steps = t.max_steps or batches.steps_for(t.epochs)
    log.info("dpo (%s, beta %g): %d steps of %d pairs, device %s%s", cfg.dpo.loss, cfg.dpo.beta, total_steps,
             t.batch_size, r.device, ", bf16 autocast" if r.bf16 else "")
    return train_policy(cfg, r, batches, total_steps)
