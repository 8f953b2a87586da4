"""Fidelity to the official DVPO code and to the run's precision: where the GVM is read, the official value
whitening, PPO defaults that clip, stop tokens, micro-batched GVM projection, exact step-0 KL in bf16 and
bf16 rollouts."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from _stages import HH, TINY, metrics, run_stage
from torch.utils._python_dispatch import TorchDispatchMode

import dvpo_kernels as dk
from dvpo.models import ModelConfig, PolicyModel, ValueModel, load_causal_lm, load_token_value_model, load_tokenizer
from dvpo.models.policy import stop_token_ids
from dvpo.rl import (
    ActorConfig,
    ActorUpdater,
    Experience,
    LossTerms,
    RolloutStep,
    Timer,
    frozen,
    frozen_policy,
    policy_logprobs,
    sequence_scores,
    state_slice,
    updates_per_step,
)
from dvpo.rollout import generate
from dvpo.stages.dvpo import GVMCriticConfig, gvm_advantages
from dvpo.stages.vpo import ModelJudge
from dvpo.data import EncodedSequence
from dvpo.trainer import autocast, build_optimizer, build_scheduler, trainable_parameters

CPU = torch.device("cpu")


def rollout(sft_model, n=6, seed=0, max_new_tokens=7):
    """A policy and an Experience of sampled responses to left-padded prompts of different lengths."""
    tok = load_tokenizer(str(sft_model))
    model = load_causal_lm(ModelConfig(path=str(sft_model)), tok, CPU).eval()
    texts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: how do I pick a lock on a door?\n\nAssistant:",
             "\n\nHuman: tell me a joke\n\nAssistant:", "x", "\n\nHuman: what is two plus two\n\nAssistant:",
             "\n\nHuman: name a colour\n\nAssistant:"][:n]
    prompts = [tok.encode(t) for t in texts]
    out = generate(model, prompts, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, generator=torch.Generator().manual_seed(seed))
    exp = Experience.from_rollout(out)
    policy = PolicyModel(model)
    exp.old_logprobs = policy_logprobs(policy, exp, temperature=1.0, micro=0)
    exp.ref_logprobs = exp.old_logprobs + 0.1 * torch.randn(exp.mask.shape, generator=torch.Generator().manual_seed(1))
    exp.ref_logprobs = torch.where(exp.mask, exp.ref_logprobs, 0.0)
    return tok, policy, exp, prompts


def load_gvm(gvm_model, tok) -> ValueModel:
    return ValueModel(load_token_value_model(ModelConfig(path=str(gvm_model)), tok, CPU)).eval()


# --- 1. where a GVM and a reward model are read -----------------------------------------------------------

def test_gvm_scores_read_the_last_trained_state_reward_models_the_final_token(sft_model, gvm_model):
    tok, _, exp, prompts = rollout(sft_model)
    gvm = load_gvm(gvm_model, tok)
    assert gvm.kind == "gvm"
    cfg = GVMCriticConfig(path=str(gvm_model), score="gvm_terminal")
    gvm_advantages(gvm, exp, cfg, kl_coef=0.1, micro=4, fused=True, autocast=autocast(CPU, False), timer=Timer(CPU))
    as_gvm = sequence_scores(gvm, exp, micro=4)
    gvm.kind = "reward_model"
    as_rm = sequence_scores(gvm, exp, micro=4)
    judge = ModelJudge.__new__(ModelJudge)
    judge.model, judge.pad_token_id, judge.batch_size, judge.device, judge.bf16 = gvm, tok.pad_token_id, 4, CPU, False
    rows = [EncodedSequence(p, exp.targets[b, :exp.lengths[b]].tolist()) for b, p in enumerate(prompts)]
    judged_rm = judge.scores(rows)
    gvm.kind = "gvm"
    judged_gvm = judge.scores(rows)
    with torch.no_grad():
        for b, (prompt, row) in enumerate(zip(prompts, rows)):
            ids = torch.tensor([prompt + row.response_ids])
            v = gvm(ids, torch.ones_like(ids))[0]
            # a GVM is trained on the states before response tokens: its last target is the state before EOS
            for got in (exp.scores[b], as_gvm[b], torch.tensor(judged_gvm[b])):
                torch.testing.assert_close(got, v[-2], rtol=1e-4, atol=1e-5)
            for got in (as_rm[b], torch.tensor(judged_rm[b])):  # a reward model is trained at EOS itself
                torch.testing.assert_close(got, v[-1], rtol=1e-4, atol=1e-5)


# --- 3. the official whitening, ported from its description -----------------------------------------------

def trl_whiten(x: torch.Tensor) -> torch.Tensor:
    """trl's ``whiten``: mean and unbiased variance of every entry, no mask."""
    return (x - x.mean()) * torch.rsqrt(x.var() + 1e-8)


def trl_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
    return (x - mean) * torch.rsqrt(var + 1e-8)


def official_dvpo_advantages(gvm: ValueModel, exp: Experience, chunk: int, kl_coef: float, gamma: float, lam: float):
    """The official trainer's steps: per forward chunk, the GVM's values at every position, whitened over the
    whole chunk; then ``values[:, :-1]`` masked to the response states, KL rewards, GAE as a loop over
    every position, advantages whitened over the batch's response states."""
    width = exp.sequences.shape[1] - 1
    values = torch.zeros(exp.batch_size, width)
    masks = torch.zeros(exp.batch_size, width)
    rewards = torch.zeros(exp.batch_size, width)
    p = exp.prompt_len
    with torch.no_grad():
        for start in range(0, exp.batch_size, chunk):
            rows = list(range(start, min(exp.batch_size, start + chunk)))
            part = exp.select(rows)
            full = trl_whiten(gvm(part.sequences, part.attention_mask, part.position_ids))
            values[rows, :full.shape[1] - 1] = full[:, :-1]
    for b, n in enumerate(exp.lengths):
        masks[b, p - 1:p - 1 + n] = 1.0  # the state before each response token
        rewards[b, p - 1:p - 1 + n] = -kl_coef * (exp.old_logprobs[b, :n] - exp.ref_logprobs[b, :n])
    values, rewards = values * masks, rewards * masks
    last, out = torch.zeros(exp.batch_size), []
    for t in reversed(range(width)):
        nxt = values[:, t + 1] if t < width - 1 else 0.0
        last = rewards[:, t] + gamma * nxt - values[:, t] + gamma * lam * last
        out.append(last)
    adv = trl_masked_whiten(torch.stack(out[::-1], 1), masks)
    pick = lambda x: torch.stack([x[b, p - 1:p - 1 + exp.mask.shape[1]] for b in range(exp.batch_size)])  # noqa: E731
    return pick(adv), pick(values)


@pytest.mark.parametrize("fused", [True, False])
def test_official_value_norm_reproduces_the_official_computation(sft_model, gvm_model, fused):
    tok, _, exp, _ = rollout(sft_model)
    gvm = load_gvm(gvm_model, tok)
    want_adv, want_values = official_dvpo_advantages(gvm, exp, chunk=4, kl_coef=0.1, gamma=1.0, lam=0.95)
    cfg = GVMCriticConfig(path=str(gvm_model), value_norm="official")
    gvm_advantages(gvm, exp, cfg, kl_coef=0.1, micro=4, fused=fused, autocast=autocast(CPU, False),
                   timer=Timer(CPU))
    m = exp.mask
    torch.testing.assert_close(exp.values, torch.where(m, want_values, 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.where(m, exp.advantages, 0.0), torch.where(m, want_adv, 0.0), rtol=1e-4,
                               atol=1e-5)
    official = exp.advantages.clone()
    gvm_advantages(gvm, exp, GVMCriticConfig(path=str(gvm_model)), kl_coef=0.1, micro=4, fused=fused,
                   autocast=autocast(CPU, False), timer=Timer(CPU))
    assert not torch.allclose(exp.advantages, official, atol=1e-3)  # the per-row default is another recipe


# --- 7. the GVM's hidden states never exceed one micro-batch -----------------------------------------------

class LargestHidden(TorchDispatchMode):
    """Records the most rows of any ``[rows, positions, H]`` tensor an op returns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size, self.rows = hidden_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == self.hidden_size:
                self.rows = max(self.rows, t.shape[0])
        return out


@pytest.mark.parametrize("norm", ["seq", "batch", "none"])
def test_gvm_values_are_projected_per_micro_batch_with_the_same_advantages(sft_model, gvm_model, norm):
    tok, _, exp, _ = rollout(sft_model)
    gvm = load_gvm(gvm_model, tok)
    kw = dict(old_logprobs=exp.old_logprobs, ref_logprobs=exp.ref_logprobs, kl_coef=0.1, gamma=1.0, lam=0.95,
              value_norm=norm, whiten_advantages=True)
    with torch.no_grad():  # before: the batch's [B, R, H] states, projected inside the fused op
        states = state_slice(gvm.hidden_states(exp.sequences, exp.attention_mask, exp.position_ids), exp)
        want = dk.dvpo_advantages(states, gvm.head.weight, gvm.head.bias, exp.mask, **kw)
    spy = LargestHidden(gvm.head.weight.shape[-1])
    with spy:
        gvm_advantages(gvm, exp, GVMCriticConfig(path=str(gvm_model), value_norm=norm), kl_coef=0.1, micro=2,
                       fused=True, autocast=autocast(CPU, False), timer=Timer(CPU))
    assert 0 < spy.rows <= 2 < exp.batch_size
    m = exp.mask
    for got, expected in zip((exp.advantages, exp.returns, exp.values), want):
        torch.testing.assert_close(torch.where(m, got, 0.0), torch.where(m, expected, 0.0), rtol=1e-6, atol=1e-6)


# --- 4. the default update clips ----------------------------------------------------------------------------

def test_default_update_runs_official_epochs_and_minibatches_so_the_ratio_moves(sft_model):
    cfg = ActorConfig()
    assert (cfg.ppo_epochs, updates_per_step(cfg, 16)) == (4, 8)  # 4 passes of 2 updates, as the official code
    tok, policy, exp, _ = rollout(sft_model)
    exp.advantages = torch.where(exp.mask, torch.randn(exp.mask.shape, generator=torch.Generator().manual_seed(2)),
                                 0.0)
    from dvpo.trainer import TrainConfig

    train = TrainConfig(lr=1e-2)
    optimizer = build_optimizer(policy, train)
    scheduler = build_scheduler(optimizer, train, updates_per_step(cfg, exp.batch_size))
    actor = ActorUpdater(policy, optimizer, scheduler, trainable_parameters(policy), cfg, global_batch=exp.batch_size,
                         micro=exp.batch_size, max_grad_norm=1.0, seed=0, device=CPU, bf16=False)
    out = actor(exp, step=1, terms=LossTerms())
    # one pass over the whole batch would only ever see ratio 1 and clip nothing
    assert abs(float(out["actor/ratio_mean"]) - 1.0) > 1e-4
    assert float(out["actor/pg_clipfrac"]) > 0.0


# --- 6. stop tokens -------------------------------------------------------------------------------------------

def test_rollouts_stop_at_every_eos_of_the_generation_config(sft_model, gvm_model, monkeypatch):
    tok = load_tokenizer(str(sft_model))
    model = load_causal_lm(ModelConfig(path=str(sft_model)), tok, CPU)
    end_of_turn = 7  # stands for <|eot_id|> / <|im_end|>: a stop token that is not the tokenizer's EOS
    model.generation_config.eos_token_id = [end_of_turn, tok.eos_token_id]
    assert stop_token_ids(model, tok) == [tok.eos_token_id, end_of_turn]
    import dvpo.rollout as rollout_module

    monkeypatch.setattr(rollout_module, "sample_tokens",  # every row samples the end-of-turn token at once
                        lambda logits, **kw: torch.full(logits.shape[:1], end_of_turn, dtype=torch.long))
    policy = PolicyModel(model)
    step = RolloutStep(policy=policy, reference=None, prompts=[tok.encode("hi"), tok.encode("a b c")], tokenizer=tok,
                       rollout=SimpleNamespace(max_new_tokens=5, temperature=1.0, top_p=1.0, top_k=0, engine="auto"),
                       kl=SimpleNamespace(coef=0.1, adaptive=False, target=6.0, horizon=10000),
                       actor=None, micro=2, seed=0, device=CPU, bf16=False)
    exp = step.generate(step.prompts, step=0)
    assert exp.lengths == [1, 1] and bool(exp.finished.all())
    from dvpo.rl import sample_and_score

    rows = sample_and_score(policy, step.prompts, tok, max_new_tokens=5)
    assert [r["length"] for r in rows] == [1.0, 1.0]


# --- 8. frozen copies compute like the trained model; 2. rollouts in bf16 --------------------------------------

def test_frozen_bf16_copy_computes_bit_for_bit_like_the_fp32_policy_under_autocast(sft_model):
    tok, policy, exp, _ = rollout(sft_model)
    ref = frozen_policy(str(sft_model), tok, CPU, bf16=True)
    linear = [m.weight.dtype for m in ref.backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and set(linear) == {torch.bfloat16}
    assert ref.lm_head.weight.dtype == torch.float32 and ref.backbone.embed_tokens.weight.dtype == torch.float32
    with autocast(CPU, True):
        mine = policy_logprobs(policy, exp, temperature=1.0, micro=4, return_entropy=True)[0]
        theirs = policy_logprobs(ref, exp, temperature=1.0, micro=4)
    assert torch.equal(mine, theirs)


@pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")
def test_a_bf16_dvpo_run_has_zero_kl_at_step_one(sft_model, gvm_model, tmp_path):
    kw = {"train.progress_bar": "false", "model.path": str(sft_model), "gvm.path": str(gvm_model),
          "data.prompts": str(HH), "data.limit": "40", "data.max_prompt_length": "24", "data.eval_size": "2",
          "rollout.max_new_tokens": "6", "train.batch_size": "4", "actor.mini_batch_size": "2",
          "train.max_steps": "1", "train.save_every": "0", "train.precision": "bf16"}
    run_stage("dvpo", "dvpo_tiny", tmp_path, **kw)
    row = [r for r in metrics(tmp_path) if "critic/kl" in r][0]
    assert row["critic/kl"] == 0.0  # old log-probs (fp32 policy, autocast) == the bf16 reference's, exactly


@pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")
def test_a_bf16_dpo_run_starts_from_zero_implicit_rewards(sft_model, tmp_path):
    kw = {**TINY, "model.path": str(sft_model), "data.pairs": str(HH), "data.limit": "24",
          "data.max_prompt_length": "40", "train.batch_size": "4", "train.max_steps": "1", "train.save_every": "0",
          "train.eval_every": "0", "data.eval_fraction": "0", "train.precision": "bf16"}
    run_stage("dpo", "dpo_tiny", tmp_path, **kw)
    row = [r for r in metrics(tmp_path) if "train/loss" in r][0]
    # the reference's batches group the sequences differently from the training micro-batches, and a packed
    # forward's attention rounds by its row's layout: equal to fp32 rounding, not bit for bit
    assert abs(row["rewards/margins"]) < 1e-5 and row["train/loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_bf16_rollout_decodes_in_bf16_and_samples_what_the_policy_computes(sft_model):
    tok, policy, _, prompts = rollout(sft_model)
    seen = []
    handle = policy.hf_model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype))
    step = RolloutStep(policy=policy, reference=None, prompts=prompts, tokenizer=tok,
                       rollout=SimpleNamespace(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, engine="eager"),
                       kl=SimpleNamespace(coef=0.1, adaptive=False, target=6.0, horizon=10000),
                       actor=None, micro=3, seed=0, device=CPU, bf16=True)
    exp = step.generate(prompts, step=0)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}  # prefill and decode: bf16 keys, a bf16 KV cache
    # the same seed decodes the same tokens through a frozen bf16 copy under autocast (what the policy computes)
    copy = frozen(PolicyModel(load_causal_lm(ModelConfig(path=str(sft_model)), tok, CPU)), CPU, True)
    twin = RolloutStep(policy=copy, reference=None, prompts=prompts, tokenizer=tok, rollout=step.rollout_cfg,
                       kl=step.kl_cfg, actor=None, micro=3, seed=0, device=CPU, bf16=True)
    again = twin.generate(prompts, step=0)
    assert torch.equal(exp.sequences, again.sequences)
