"""``dvpo gvm``: pretrain a Global Value Model (GVM) offline on preference pairs.

The recipe of the DVPO paper's code: each pair becomes two sequences, the chosen one with reward +1
and the rejected one with -1, placed on the last response token (0 elsewhere). For each batch a
no-grad pass of the current model gives V(s_t) on every response state; the targets are GAE
lambda-returns (gamma 1, lambda 0.95) from those values; then ``epochs_per_batch`` passes over the
batch minimise ``0.5 * masked MSE(V, targets)``. Scored responses (``prompt``, ``response``,
``reward``) train the same way with their reward. Held-out pairs measure how often the chosen
response gets the higher value (at the last response state, and averaged over the response).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import ConfigError, option, section
from ..data import (
    DataConfig,
    DataStats,
    Encoder,
    PreferencePair,
    ScoredResponse,
    ValueExample,
    collate_values,
    read_preference_pairs,
    read_scored,
    render_prompt,
    render_response,
)
from ..models import ModelConfig, ValueModel, apply_lora, load_token_value_model
from ..objectives import last_values, mean_values, pair_wins, pairwise_loss, value_loss, value_targets
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
    parallel,
    resolve_resume,
    start_run,
    step_generator,
    trainable_parameters,
    use_bf16,
    write_json,
)
from .common import read_split, stage_tokenizer
from .registry import register_stage

log = logging.getLogger(__name__)

CHOSEN_REWARD, REJECTED_REWARD = 1.0, -1.0


# --- configuration ---------------------------------------------------------------------------

@dataclass
class PairDataConfig(DataConfig):
    pairs: list[str] = option(default_factory=list, path=True,
                              help="preference JSONL files (prompt/chosen/rejected, or Anthropic HH), .gz or not")
    eval_pairs: list[str] = option(default_factory=list, path=True,
                                   help="held-out preference files (empty = hold out eval_fraction of data.pairs)")
    eval_fraction: float = option(0.05, "fraction of data.pairs held out when data.eval_pairs is empty")

    def validate(self) -> None:
        super().validate()
        self.check_sources()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")

    def check_sources(self) -> None:
        if not self.pairs:
            raise ConfigError("data.pairs must name at least one file")


@dataclass
class GVMDataConfig(PairDataConfig):
    scored: list[str] = option(default_factory=list, path=True,
                               help="scalar-scored JSONL files (prompt/response/reward), a second training source")

    def check_sources(self) -> None:
        if not self.pairs and not self.scored:
            raise ConfigError("data.pairs or data.scored must name at least one file")


@dataclass
class GVMObjectiveConfig:
    target: Literal["td_lambda", "mc"] = option(
        "td_lambda", "regression target: GAE lambda-returns from a no-grad pass of the current model (td_lambda), "
                     "or the discounted final reward at every token (mc)")
    gamma: float = option(1.0, "discount of the returns")
    lam: float = option(0.95, "GAE lambda of the td_lambda targets")
    epochs_per_batch: int = option(2, "passes over each batch with the targets of its no-grad pass")
    mini_batch_size: int = option(0, "examples per optimizer update within a pass (0 = the whole batch)")
    pairwise_coef: float = option(0.0, "weight of a Bradley-Terry term -logsigmoid(V_chosen - V_rejected) on the "
                                       "last-state values of each pair")

    def validate(self) -> None:
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"gvm.gamma and gvm.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.epochs_per_batch < 1:
            raise ConfigError(f"gvm.epochs_per_batch must be >= 1, got {self.epochs_per_batch}")
        if self.mini_batch_size < 0 or self.pairwise_coef < 0:
            raise ConfigError("gvm.mini_batch_size and gvm.pairwise_coef must be >= 0")


@dataclass
class GVMStageConfig:
    model: ModelConfig = section(ModelConfig, "backbone + zero-initialised value head (score = Linear(hidden, 1))")
    data: GVMDataConfig = section(GVMDataConfig, "training and held-out data")
    gvm: GVMObjectiveConfig = section(GVMObjectiveConfig, "the value objective")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/gvm"), "optimisation, logging, checkpoints")

    def validate(self) -> None:
        if self.gvm.mini_batch_size > self.train.batch_size:
            raise ConfigError(f"gvm.mini_batch_size ({self.gvm.mini_batch_size}) exceeds train.batch_size "
                              f"({self.train.batch_size})")


# --- data ------------------------------------------------------------------------------------

@dataclass
class PairData:
    tokenizer: object
    train: list[ValueExample]
    eval: list[ValueExample]


def _texts(pairs, scored):
    # A trained tokenizer has no chat template, so its texts are the plain renderings.
    return (render_prompt(x.prompt, None, "plain") + render_response(x.prompt, r, "plain")
            for x in [*pairs, *scored]
            for r in ((x.chosen, x.rejected) if isinstance(x, PreferencePair) else (x.response,)))


def _encode_pairs(pairs: list[PreferencePair], encoder: Encoder) -> list[ValueExample]:
    out = []
    for pair in pairs:
        seqs = encoder.encode(pair.prompt, [pair.chosen, pair.rejected], pair.where)
        if seqs is not None:
            out.append(ValueExample(tuple(seqs), (CHOSEN_REWARD, REJECTED_REWARD)))
    return out


def _encode_scored(records: list[ScoredResponse], encoder: Encoder) -> list[ValueExample]:
    out = []
    for rec in records:
        seqs = encoder.encode(rec.prompt, [rec.response], rec.where)
        if seqs is not None:
            out.append(ValueExample(tuple(seqs), (rec.reward,)))
    return out


def prepare_data(d: PairDataConfig, model: ModelConfig, train: TrainConfig,
                 resume_from: Path | None = None) -> PairData:
    """Read, split, (train the tokenizer,) encode; every skip is counted, logged and saved to
    ``data_stats.json`` in the run folder. Shared by the stages that train on preference pairs."""
    pair_stats, scored_stats, eval_stats = DataStats("train pairs"), DataStats("scored"), DataStats("eval pairs")
    scored_files = d.scored if isinstance(d, GVMDataConfig) else []
    pairs, eval_pairs = read_split(read_preference_pairs, d.pairs, d.eval_pairs, fraction=d.eval_fraction,
                                   seed=train.seed, limit=d.limit, train_stats=pair_stats, eval_stats=eval_stats)
    if not d.eval_pairs:
        pair_stats.notes["pairs held out for evaluation"] = len(eval_pairs)
    scored = read_scored(scored_files, scored_stats, limit=d.limit) if scored_files else []
    tokenizer = stage_tokenizer(model, resume_from, lambda: _texts(pairs, scored))
    kw = {"template": d.template, "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
          "truncation": d.truncation}
    examples = _encode_pairs(pairs, Encoder(tokenizer, stats=pair_stats, **kw))
    examples += _encode_scored(scored, Encoder(tokenizer, stats=scored_stats, **kw))
    held_out = _encode_pairs(eval_pairs, Encoder(tokenizer, stats=eval_stats, **kw))
    used = [s for s in (pair_stats, scored_stats) if s.read] + [eval_stats]
    for stats in used:
        stats.report()
    write_json(Path(train.output_dir) / "data_stats.json", {s.name: s.as_dict() for s in used})
    if not examples:
        raise ValueError("no training examples left after reading and encoding the data")
    return PairData(tokenizer, examples, held_out)


def trainable_value_model(cfg: ModelConfig, tokenizer, device: torch.device,
                          parallel_mode: str = "replicate") -> ValueModel:
    """A value model to train: backbone + scalar head, LoRA on the backbone when asked (the head stays
    fully trainable), FSDP2-sharded under torchrun unless ``train.parallel=replicate``."""
    module = load_token_value_model(cfg, tokenizer, device)
    if cfg.lora_r > 0:
        module = apply_lora(module, cfg)
    model = ValueModel(module)
    return parallel.distribute(model, model.hf_model, parallel_mode)


def value_checkpoint_files(model: ValueModel, tokenizer, lora: bool):
    """``write_extra`` of a value model's checkpoints: the tokenizer, and without LoRA the model config, so
    that model.safetensors + config.json load with ``from_pretrained``."""

    def write(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        if not lora:
            model.hf_model.config.save_pretrained(folder)

    return write


# --- training --------------------------------------------------------------------------------

class GVMStep:
    """One training step on a batch of examples: targets from a no-grad pass, then
    ``epochs_per_batch`` shuffled passes of optimizer updates over mini-batches, each
    accumulated over micro-batches."""

    def __init__(self, cfg: GVMStageConfig, model: ValueModel, optimizer, scheduler, examples: list[ValueExample],
                 pad_token_id: int, device: torch.device, bf16: bool):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.examples, self.pad_token_id, self.device, self.bf16 = examples, pad_token_id, device, bf16
        self.params = trainable_parameters(model)

    def values(self, batch) -> torch.Tensor:
        """V of each state ``[B, L-1]`` (the last position is the state after the final token)."""
        with autocast(self.device, self.bf16):
            return self.model(batch.input_ids, batch.attention_mask)[:, :-1]

    def __call__(self, indices: list[int], step: int) -> dict:
        g, t = self.cfg.gvm, self.cfg.train
        batch = collate_values([self.examples[i] for i in indices], self.pad_token_id).to(self.device)
        n = batch.num_examples
        mini = max(1, (g.mini_batch_size or t.batch_size) // distributed.world_size())
        micro = t.micro_batch_size or mini

        # Targets from a no-grad pass of the current model, in micro-batches.
        example_tokens = batch.example_tokens()
        self.model.eval()
        old_values = torch.zeros(batch.mask.shape, device=self.device)
        with torch.no_grad():
            for group in micro_batches(n, micro, tokens=example_tokens, max_tokens=t.micro_batch_tokens):
                (part,) = batch.select(group)
                old_values[batch.rows(group), :part.mask.shape[1]] = self.values(part)
        targets = value_targets(old_values, batch.rewards, batch.mask, target=g.target, gamma=g.gamma, lam=g.lam)
        self.model.train()

        generator = step_generator(t.seed, step)
        sums = {"loss": 0.0, "value_loss": 0.0, "pairwise_loss": 0.0, "grad_norm": 0.0}
        updates = 0
        for _ in range(g.epochs_per_batch):
            order = torch.randperm(n, generator=generator).tolist()
            for start in range(0, n, mini):
                group = order[start:start + mini]
                tokens = batch.mask[batch.rows(group)].sum().clamp(min=1)
                pairs = max(1, sum(len(batch.example_rows[e]) == 2 for e in group))
                groups = micro_batches(len(group), micro, tokens=[example_tokens[e] for e in group],
                                       max_tokens=t.micro_batch_tokens)
                for rows in micro_steps(groups):
                    part, part_targets = batch.select([group[r] for r in rows], targets)
                    values = self.values(part)
                    v_loss = value_loss(values, part_targets, part.mask, tokens)
                    loss = v_loss
                    if g.pairwise_coef > 0 and part.pairs.numel():
                        p_loss = pairwise_loss(last_values(values, part.mask), part.pairs) / pairs
                        loss = loss + g.pairwise_coef * p_loss
                        sums["pairwise_loss"] += p_loss.detach()
                    loss.backward()
                    sums["loss"] += loss.detach()
                    sums["value_loss"] += v_loss.detach()
                sums["grad_norm"] += apply_update(self.params, self.optimizer, self.scheduler, t.max_grad_norm)
                updates += 1
        shown = ("loss", "grad_norm") + (("value_loss", "pairwise_loss") if g.pairwise_coef > 0 else ())
        metrics = {f"train/{k}": sums[k] / updates for k in shown}
        count = batch.mask.sum().clamp(min=1)
        metrics["train/values"] = torch.where(batch.mask, old_values, 0.0).sum() / count
        metrics["train/returns"] = targets.sum() / count
        if batch.pairs.numel():
            metrics["train/pair_acc_last"] = pair_wins(last_values(old_values, batch.mask), batch.pairs).mean()
        return metrics


def pair_weights(batch, weights: list[float], device: torch.device) -> torch.Tensor:
    """``[P]``: the weight of each pair's example (0 for :func:`distributed.padded_shard`'s padding)."""
    return torch.tensor([w for w, rows in zip(weights, batch.example_rows) if len(rows) == 2], device=device)


@torch.no_grad()
def evaluate_pairs(model: ValueModel, examples: list[ValueExample], *, batch_size: int, pad_token_id: int,
                   device: torch.device, bf16: bool) -> dict[str, torch.Tensor]:
    """Pairwise accuracy of the last-state value and of the mean value over the response (ties count
    one half), and the mean last-state margin V_chosen - V_rejected; each rank scores its share of
    ``examples`` and the counts are summed over ranks."""
    model.eval()
    shard, weights = distributed.padded_shard(examples)  # as many forwards on every rank (FSDP2)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # wins_last, wins_mean, margin, pairs
    for start in range(0, len(shard), batch_size):
        batch = collate_values(shard[start:start + batch_size], pad_token_id).to(device)
        w = pair_weights(batch, weights[start:start + batch_size], device)
        with autocast(device, bf16):
            values = model(batch.input_ids, batch.attention_mask)[:, :-1]
        last, mean = last_values(values, batch.mask), mean_values(values, batch.mask)
        totals += torch.stack([(w * pair_wins(last, batch.pairs)).sum(), (w * pair_wins(mean, batch.pairs)).sum(),
                               (w * (last[batch.pairs[:, 0]] - last[batch.pairs[:, 1]])).sum(), w.sum()]).double()
    model.train()
    distributed.all_reduce_(totals)
    n = totals[3].clamp(min=1)
    return {"eval/pair_acc_last": totals[0] / n, "eval/pair_acc_mean": totals[1] / n, "eval/margin_last": totals[2] / n,
            "eval/pairs": totals[3]}


@register_stage("gvm", GVMStageConfig, "pretrain a Global Value Model on preference pairs", __doc__.split("\n\n", 1)[1])
def run(cfg: GVMStageConfig) -> dict[str, float]:
    """Train and export a GVM; returns the final held-out metrics (empty without held-out pairs)."""
    device = start_run(cfg.train, cfg)
    bf16 = use_bf16(cfg.train.precision, device)
    resume_from = resolve_resume(cfg.train.resume, cfg.train.output_dir)
    data = prepare_data(cfg.data, cfg.model, cfg.train, resume_from)
    tokenizer = data.tokenizer
    model = trainable_value_model(cfg.model, tokenizer, device, cfg.train.parallel)
    model.kind = "gvm"  # saved with it: scorers read a GVM at its last trained state, not at EOS

    t = cfg.train
    batches = EpochBatches(len(data.train), t.batch_size, seed=t.seed)
    total_steps = t.max_steps or batches.steps_for(t.epochs)
    per_rank = t.batch_size // distributed.world_size()
    mini = max(1, (cfg.gvm.mini_batch_size or t.batch_size) // distributed.world_size())
    updates = total_steps * cfg.gvm.epochs_per_batch * math.ceil(per_rank / mini)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, updates)
    log.info("gvm: %d training examples, %d held-out pairs, %d steps (%d optimizer updates), device %s%s",
             len(data.train), len(data.eval), total_steps, updates, device, ", bf16 autocast" if bf16 else "")

    trainer = Trainer(t, model=model.module, optimizer=optimizer, scheduler=scheduler, batches=batches,
                      total_steps=total_steps)
    trainer.restore()
    step = GVMStep(cfg, model, optimizer, scheduler, data.train, tokenizer.pad_token_id, device, bf16)

    eval_fn = None
    if data.eval:
        def eval_fn():
            return evaluate_pairs(model, data.eval, batch_size=per_rank, pad_token_id=tokenizer.pad_token_id,
                                  device=device, bf16=bf16)

    return trainer.fit(step, eval_fn=eval_fn, export_fn=lambda folder, state: model.export(folder, tokenizer, state),
                       write_extra=value_checkpoint_files(model, tokenizer, cfg.model.lora_r > 0))
