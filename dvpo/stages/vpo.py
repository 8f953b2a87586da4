"""``dvpo vpo``: Value-Incentivized Preference Optimization (VPO; Cen et al. 2024, arXiv 2405.19320).

VPO regularises the maximal value J*(r) of the reward it fits. With DPO's reparametrisation r = beta log(pi /
pi_ref) + (a per-prompt shift, fixed by E_{y~pi_cal}[r] = 0), J*(r) = -beta E_{x, y~pi_cal}[log pi(y|x) -
log pi_ref(y|x)], so the regulariser is a term on the policy: loss = DPO loss + sign * alpha * beta *
E_{x, y~pi_cal}[log pi(y|x) - log pi_ref(y|x)], with summed response log-probs and one calibration response
per pair. ``vpo.mode=offline`` (sign -1, pessimistic) trains on the fixed pairs of ``data.pairs`` with pi_cal
the chosen responses (``vpo.calibration=chosen``: the term then rewards the likelihood of the preferred data)
or one response per prompt sampled once from the reference before training (``reference``).

``vpo.mode=online`` (sign +1, optimistic: it lowers the likelihood of the reference's own responses, which
pushes the policy to explore) always calibrates on reference samples and runs ``vpo.rounds`` rounds. Each
round draws ``vpo.prompts_per_round`` prompts from the training pairs' prompts, samples two responses to
each from the current policy, has ``vpo.judge`` pick the preferred one (``oracle``: the built-in OracleTask's
reward with a Bradley-Terry draw, valid only for oracle-task prompts; or a reward model / GVM folder, whose
score at the last token decides), drops identical responses and ties, adds the pairs with their reference
log-probs to the training set, and trains ``vpo.steps_per_round`` steps on batches drawn from the whole grown
set. Online, the reference stays loaded to score the new pairs, and the pairs collected so far are saved in
every checkpoint, so a resumed run trains on the same data.

Everything else is ``dvpo dpo``: the policy and reference, the sigmoid or IPO loss (``dpo.*``),
micro-batching, the metrics (plus ``train/preference_loss`` and ``train/value_term``, and online
``online/*`` at each round's first step), held-out evaluation (``eval/loss`` is the preference loss alone)
and the export.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import ConfigError, option, section
from ..data import EncodedSequence
from ..models import load_tokenizer
from ..models.policy import stop_token_ids
from ..objectives import last_values
from ..rl import RolloutConfig, check_same_vocabulary, frozen_value_model
from ..rollout import RolloutEngine
from ..tasks import OracleTask
from ..trainer import EpochBatches, TrainConfig, autocast, distributed, generation_autocast, parallel
from .dpo import (
    DPOStageConfig,
    PreferenceExample,
    PreferenceRun,
    ValueTerm,
    collate_rows,
    prepare_run,
    train_policy,
)
from .registry import register_stage
from .rm import sequence_scores

log = logging.getLogger(__name__)

Judgement = tuple[bool | None, float, float]  # (first response preferred; None = no preference), both scores


# --- configuration ---------------------------------------------------------------------------

@dataclass
class VPOConfig:
    mode: Literal["offline", "online"] = option(
        "offline", "offline: the fixed pairs, pessimistic value term (sign -1); online: rounds of sampling, "
                   "judging and training, optimistic (sign +1)")
    alpha: float = option(0.01, "weight of the value term; it multiplies beta times a sequence log-ratio (often "
                                "tens of nats), so keep it small")
    calibration: Literal["chosen", "reference"] = option(
        "chosen", "offline pi_cal: the chosen responses, or one response per prompt sampled from the reference "
                  "(online always uses reference samples)")
    rounds: int = option(2, "online: rounds of sampling, judging and training")
    prompts_per_round: int = option(64, "online: prompts per round, two policy samples each")
    steps_per_round: int = option(10, "online: training steps per round")
    judge: str = option("oracle", "online: 'oracle' (the built-in OracleTask reward; oracle-task prompts only) or a "
                                  "reward model / GVM folder (written by dvpo rm or dvpo gvm)")
    oracle_seed: int = option(0, "online with judge=oracle: seed of the OracleTask the prompts come from")

    @property
    def sign(self) -> int:
        return 1 if self.mode == "online" else -1

    def validate(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"vpo.alpha must be a finite number >= 0, got {self.alpha}")
        for name in ("rounds", "prompts_per_round", "steps_per_round"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.mode == "online" and self.judge != "oracle" and not Path(self.judge).is_dir():
            raise ConfigError(f"vpo.judge must be 'oracle' or a reward model / GVM folder, got {self.judge!r}")


@dataclass
class VPOStageConfig(DPOStageConfig):
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/vpo", lr=1e-6),
                                 "optimisation (train.batch_size = pairs per step), logging, checkpoints; online, "
                                 "the step count is vpo.rounds * vpo.steps_per_round")
    vpo: VPOConfig = section(VPOConfig, "the value term and the online rounds")
    rollout: RolloutConfig = section(RolloutConfig, "sampling of the reference's calibration responses and of the "
                                                    "online pairs; rollout.micro_batch_size = rows per judge forward")

    def validate(self) -> None:
        super().validate()
        v = self.vpo
        if v.mode == "online" and self.train.max_steps not in (0, v.rounds * v.steps_per_round):
            raise ConfigError(f"train.max_steps ({self.train.max_steps}) must be 0 or vpo.rounds * "
                              f"vpo.steps_per_round ({v.rounds * v.steps_per_round}) in online mode")


# --- helpers ---------------------------------------------------------------------------------

def seeded_generator(device: torch.device | str, *keys) -> torch.Generator:
    """A generator on ``device`` seeded by a hash of ``keys``: the same keys give the same draws in any run."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def gather_lists(items: list) -> list:
    """Every rank's ``items`` concatenated in rank order (the list itself for one process)."""
    if not distributed.is_distributed():
        return items
    parts = [None] * distributed.world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def distinct_prompts(examples: list[PreferenceExample]) -> list[list[int]]:
    return [list(p) for p in dict.fromkeys(tuple(ex.prompt_ids) for ex in examples)]


def sample_responses(engine: RolloutEngine, prompts: list[list[int]], cfg: RolloutConfig, tokenizer,
                     generator: torch.Generator, bf16: bool) -> list[list[int]]:
    """One sampled response (token ids, the stop token included when it finished) per prompt, in the run's
    precision."""
    with generation_autocast(generator.device, bf16):
        out = engine.generate(prompts, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=stop_token_ids(engine.model, tokenizer), temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, generator=generator)
    return [out.responses[i, :n].tolist() for i, n in enumerate(out.response_lengths.tolist())]


def reference_samples(run: PreferenceRun, prompts: list[list[int]], cfg: RolloutConfig, *, seed: int,
                      chunk: int) -> dict[tuple[int, ...], tuple[EncodedSequence, float]]:
    """pi_cal = pi_ref: one response per prompt sampled from the reference (each rank samples a strided share,
    ``chunk`` prompts per call), with its reference log-prob; the same seed gives the same samples."""
    mine = prompts[distributed.rank()::distributed.world_size()]
    samples = []
    with run.reference.active() as model:
        engine = RolloutEngine(model.hf_model, cfg.engine)
        for start in range(0, len(mine), chunk):
            part = mine[start:start + chunk]
            generator = seeded_generator(run.device, "calibration", seed, distributed.rank(), start)
            responses = sample_responses(engine, part, cfg, run.tokenizer, generator, run.bf16)
            samples += [EncodedSequence(p, r) for p, r in zip(part, responses)]
    samples = gather_lists(samples)
    logps = run.reference.logprobs(samples)
    log.info("vpo: %d calibration responses sampled from the reference", len(samples))
    return {tuple(s.prompt_ids): (s, lp) for s, lp in zip(samples, logps)}


# --- judges ----------------------------------------------------------------------------------

class OracleJudge:
    """``vpo.judge=oracle``: the OracleTask's hidden reward scores the decoded texts and its Bradley-Terry
    draw (:meth:`OracleTask.label`) picks the preferred response."""

    def __init__(self, task: OracleTask, tokenizer, prompts: list[list[int]], seed: int):
        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        for ids in prompts:
            try:
                task.reward(self.text(ids), "")
            except ValueError as err:
                raise ValueError(f"vpo.judge=oracle needs prompts of the oracle task (vpo.oracle_seed="
                                 f"{task.seed}): {err}") from None

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, prompts: list[list[int]], first: list[list[int]], second: list[list[int]],
                 round_index: int) -> list[Judgement]:
        rng = random.Random(f"oracle-{self.seed}-{round_index}-{distributed.rank()}")
        out = []
        for p, a, b in zip(prompts, first, second):
            prompt, x, y = self.text(p), self.text(a), self.text(b)
            label = self.task.label(prompt, x, y, rng)
            out.append((None if x == y else label["chosen"] == x, self.task.reward(prompt, x),
                        self.task.reward(prompt, y)))
        return out


class ModelJudge:
    """``vpo.judge=<folder>``: a frozen reward model scores each sequence at its final token (see ``dvpo rm``),
    a GVM at the state before it (the last state it is trained on); the higher score is preferred, a tie is
    no preference."""

    def __init__(self, path: str, tokenizer, *, batch_size: int, device: torch.device, bf16: bool):
        check_same_vocabulary(tokenizer, load_tokenizer(path), f"the judge at {path}")
        self.model = frozen_value_model(path, tokenizer, device, bf16)
        self.pad_token_id, self.batch_size, self.device, self.bf16 = tokenizer.pad_token_id, batch_size, device, bf16

    @torch.no_grad()
    def scores(self, sequences: list[EncodedSequence]) -> list[float]:
        out = []
        for start in range(0, len(sequences), self.batch_size):
            batch = collate_rows(sequences[start:start + self.batch_size], self.pad_token_id).to(self.device)
            with autocast(self.device, self.bf16):
                if self.model.is_gvm:
                    values = self.model(batch.input_ids, batch.attention_mask)[:, :-1]
                    out += last_values(values, batch.mask).tolist()
                else:
                    out += sequence_scores(self.model, batch).tolist()
        return out

    def __call__(self, prompts: list[list[int]], first: list[list[int]], second: list[list[int]],
                 round_index: int) -> list[Judgement]:
        s = self.scores([EncodedSequence(p, r) for p, r in zip(prompts + prompts, first + second)])
        n = len(prompts)
        return [(None if s[i] == s[n + i] else s[i] > s[n + i], s[i], s[n + i]) for i in range(n)]


# --- online rounds ---------------------------------------------------------------------------

class OnlineRounds:
    """Online VPO's data: :meth:`collect` samples a round's pairs from the current policy, has them judged and
    appends them, with their reference log-probs, to ``run.train``. ``state_dict`` holds the pairs collected
    so far (saved in checkpoints)."""

    def __init__(self, cfg: VPOStageConfig, run: PreferenceRun, pool: list[list[int]],
                 judge: Callable[..., list[Judgement]]):
        self.cfg, self.run, self.pool, self.judge = cfg, run, pool, judge
        self.base = len(run.train)
        self.collected: list[PreferenceExample] = []
        self.metrics: dict[str, float] = {}
        self.engine = RolloutEngine(run.policy.hf_model, cfg.rollout.engine)
        n, world = cfg.vpo.prompts_per_round, distributed.world_size()
        if n > len(self.pool):
            raise ValueError(f"vpo.prompts_per_round ({n}) exceeds the {len(self.pool)} distinct training prompts")
        if n % world:
            raise ValueError(f"vpo.prompts_per_round ({n}) must divide evenly over {world} ranks")

    def collect(self, round_index: int) -> int:
        """Sample, judge and add round ``round_index``'s pairs; returns the size of the training set."""
        seed, run = self.cfg.train.seed, self.run
        order = torch.randperm(len(self.pool), generator=seeded_generator("cpu", "prompts", seed, round_index))
        prompts = [self.pool[i] for i in order[:self.cfg.vpo.prompts_per_round].tolist()]
        prompts = prompts[distributed.rank()::distributed.world_size()]
        generator = seeded_generator(run.device, "online", seed, round_index, distributed.rank())
        with parallel.gathered_root(run.policy, layers=True):
            responses = sample_responses(self.engine, [p for p in prompts for _ in (0, 1)], self.cfg.rollout,
                                         run.tokenizer, generator, run.bf16)
        first, second = responses[0::2], responses[1::2]
        judged = gather_lists(list(zip(prompts, first, second, self.judge(prompts, first, second, round_index))))
        kept = [(p, a, b) if prefer else (p, b, a) for p, a, b, (prefer, _, _) in judged
                if prefer is not None and a != b]
        sequences = [EncodedSequence(p, r) for p, c, rej in kept for r in (c, rej)]
        logps = run.reference.logprobs(sequences)
        self.add([PreferenceExample(sequences[2 * i], sequences[2 * i + 1], logps[2 * i], logps[2 * i + 1])
                  for i in range(len(kept))])
        scores = [s for *_, (_, sa, sb) in judged for s in (sa, sb)]
        lengths = [len(r) for _, a, b, _ in judged for r in (a, b)]
        self.metrics = {"online/score": sum(scores) / len(scores),
                        "online/response_length": sum(lengths) / len(lengths), "online/pairs_added": len(kept),
                        "online/pairs_dropped": len(judged) - len(kept), "online/train_pairs": len(run.train)}
        log.info("vpo round %d: %d pairs added (%d dropped: identical or tied), mean judge score %.4f, %d training "
                 "pairs", round_index, len(kept), len(judged) - len(kept), self.metrics["online/score"],
                 len(run.train))
        return len(run.train)

    def add(self, pairs: list[PreferenceExample]) -> None:
        self.collected += pairs
        self.run.train.extend(pairs)

    def pop_metrics(self) -> dict[str, float]:
        """The last round's statistics, once (logged with the round's first step)."""
        metrics, self.metrics = self.metrics, {}
        return metrics

    def state_dict(self) -> dict:
        return {"pairs": [[ex.prompt_ids, ex.chosen.response_ids, ex.rejected.response_ids, ex.ref_chosen,
                           ex.ref_rejected] for ex in self.collected]}

    def load_state_dict(self, state: dict) -> None:
        del self.run.train[self.base:]
        self.collected = []
        self.add([PreferenceExample(EncodedSequence(p, c), EncodedSequence(p, r), ref_c, ref_r)
                  for p, c, r, ref_c, ref_r in state["pairs"]])


class RoundBatches:
    """Online VPO's batching: round r runs ``steps_per_round`` batches over the training set as it stands
    after ``collect(r)`` (called when the round's first batch is drawn), epoch by epoch over permutations
    seeded by (seed, r). The state is (round, batches taken, set size, position)."""

    def __init__(self, collect: Callable[[int], int], batch_size: int, steps_per_round: int, seed: int):
        self.collect, self.batch_size, self.steps_per_round, self.seed = collect, batch_size, steps_per_round, seed
        self.round, self.taken = -1, 0
        self.inner: EpochBatches | None = None

    def _epochs(self, size: int) -> EpochBatches:
        return EpochBatches(size, self.batch_size, seed=self.seed * 1_000_003 + self.round)

    def next(self) -> list[int]:
        if self.inner is None or self.taken == self.steps_per_round:
            self.round += 1
            self.inner, self.taken = self._epochs(self.collect(self.round)), 0
        self.taken += 1
        return self.inner.next()

    def state_dict(self) -> dict:
        inner = self.inner
        return {"round": self.round, "taken": self.taken, "size": inner.num_examples if inner else 0,
                "position": inner.state_dict() if inner else None}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.taken, self.inner = int(state["round"]), int(state["taken"]), None
        if state["position"] is not None:
            self.inner = self._epochs(int(state["size"]))
            self.inner.load_state_dict(state["position"])


# --- the stage -------------------------------------------------------------------------------

def build_judge(cfg: VPOStageConfig, run: PreferenceRun, prompts: list[list[int]]):
    if cfg.vpo.judge == "oracle":
        return OracleJudge(OracleTask(seed=cfg.vpo.oracle_seed), run.tokenizer, prompts, cfg.train.seed)
    return ModelJudge(cfg.vpo.judge, run.tokenizer, batch_size=cfg.rollout.micro_batch_size or 2 * run.micro,
                      device=run.device, bf16=run.bf16)


@register_stage("vpo", VPOStageConfig, "Value-Incentivized Preference Optimization (VPO), offline or online",
                __doc__.split("\n\n", 1)[1])
def run(cfg: VPOStageConfig) -> dict[str, float]:
    """Train and export the policy; returns the final held-out metrics."""
    v, t = cfg.vpo, cfg.train
    r = prepare_run(cfg)
    prompts = distinct_prompts(r.train)
    samples = None
    if v.mode == "online" or v.calibration == "reference":
        samples = reference_samples(r, prompts, cfg.rollout, seed=t.seed,
                                    chunk=t.batch_size // distributed.world_size())
    term = ValueTerm(v.sign, v.alpha, samples)
    if v.mode == "offline":
        r.reference.release()
        batches = EpochBatches(len(r.train), t.batch_size, seed=t.seed)
        total_steps = t.max_steps or batches.steps_for(t.epochs)
        log.info("vpo offline (alpha %g, pi_cal = the %s): %d steps of %d pairs", v.alpha,
                 "reference samples" if samples is not None else "chosen responses", total_steps, t.batch_size)
        return train_policy(cfg, r, batches, total_steps, value_term=term)
    online = OnlineRounds(cfg, r, prompts, build_judge(cfg, r, prompts))
    batches = RoundBatches(online.collect, t.batch_size, v.steps_per_round, t.seed)
    log.info("vpo online (alpha %g, judge %s): %d rounds of %d prompts and %d steps of %d pairs", v.alpha, v.judge,
             v.rounds, v.prompts_per_round, v.steps_per_round, t.batch_size)
    return train_policy(cfg, r, batches, v.rounds * v.steps_per_round, value_term=term,
                        extra_state={"online": online}, extra_metrics=online.pop_metrics)
