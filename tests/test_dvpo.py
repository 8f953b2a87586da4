"""dvpo dvpo: token/state alignment under left padding, fused = unfused, the KL controller, end to end
from the examples, exact resume, non-finite updates."""
from __future__ import annotations

import pytest
import torch
from _stages import HH, kill_after, metrics, run_stage, stage_config

from dvpo.models import ModelConfig, PolicyModel, ValueModel, load_causal_lm, load_token_value_model, load_tokenizer
from dvpo.rl import (
    ActorConfig,
    Experience,
    KLController,
    LossTerms,
    last_state_values,
    policy_logprobs,
    policy_loss_on,
    sequence_scores,
    state_values,
    unfused,
)
from dvpo.rollout import generate
from dvpo.stages import dvpo as dvpo_stage

import dvpo_kernels as dk


def dvpo_overrides(sft_model, gvm_model, **extra):
    return {"train.progress_bar": "false", "model.path": str(sft_model), "gvm.path": str(gvm_model),
            "data.prompts": str(HH), "data.limit": "80", "data.max_prompt_length": "24", "data.eval_size": "6",
            "rollout.max_new_tokens": "8", "train.batch_size": "6", "actor.mini_batch_size": "3",
            "train.max_steps": "3", "train.save_every": "0", **extra}


def rollout_batch(sft_model, n=5, seed=0):
    """Sampled responses to left-padded prompts of different lengths."""
    tok = load_tokenizer(str(sft_model))
    model = load_causal_lm(ModelConfig(path=str(sft_model)), tok, torch.device("cpu")).eval()
    texts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: how do I pick a lock on a door?\n\nAssistant:",
             "\n\nHuman: tell me a joke\n\nAssistant:", "x", "\n\nHuman: what is two plus two\n\nAssistant:"][:n]
    prompts = [tok.encode(t) for t in texts]
    rollout = generate(model, prompts, max_new_tokens=6, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, generator=torch.Generator().manual_seed(seed))
    return model, Experience.from_rollout(rollout), prompts


def test_logprobs_and_gvm_states_line_up_with_tokens_under_left_padding(sft_model, gvm_model):
    model, exp, prompts = rollout_batch(sft_model)
    assert len({len(p) for p in prompts}) > 1 and exp.attention_mask[:, 0].eq(0).any()  # really left-padded
    tok = load_tokenizer(str(sft_model))
    gvm = ValueModel(load_token_value_model(ModelConfig(path=str(gvm_model)), tok, torch.device("cpu"))).eval()
    logp = policy_logprobs(PolicyModel(model), exp, temperature=0.7, micro=2)
    values, _ = state_values(gvm, exp, micro=3)
    last = last_state_values(values, exp.mask)
    assert gvm.is_gvm  # dvpo gvm marks its folders
    torch.testing.assert_close(sequence_scores(gvm, exp, micro=2), last)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            response = exp.targets[b, :exp.lengths[b]].tolist()
            ids = torch.tensor([prompt + response])
            # each response token from the state before it, on the unpadded row
            logits = model(ids).logits[0, len(prompt) - 1:-1].float() / 0.7
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[b, :len(response)], expected, rtol=1e-4, atol=1e-4)
            assert logp[b, len(response):].eq(0).all()
            v = gvm(ids, torch.ones_like(ids))[0].float()
            torch.testing.assert_close(values[b, :len(response)], v[len(prompt) - 1:-1], rtol=1e-4, atol=1e-4)
            # the GVM's score of a sequence is its value of the state before the final token (the last state
            # it is trained on), not of the state after it
            torch.testing.assert_close(last[b], v[-2], rtol=1e-4, atol=1e-4)


def test_fused_and_unfused_paths_give_the_same_advantages_loss_and_gradients(sft_model):
    model, exp, _ = rollout_batch(sft_model, seed=3)
    policy = PolicyModel(model)
    exp.old_logprobs = policy_logprobs(policy, exp, temperature=1.0, micro=0)
    exp.ref_logprobs = exp.old_logprobs + 0.1 * torch.randn(exp.mask.shape, generator=torch.Generator().manual_seed(0))
    raw = torch.randn(exp.mask.shape, generator=torch.Generator().manual_seed(1))
    kw = dict(old_logprobs=exp.old_logprobs, ref_logprobs=exp.ref_logprobs, kl_coef=0.2, gamma=1.0, lam=0.95)
    for norm in ("seq", "batch", "none"):
        ours = dk.dvpo_advantages(raw[..., None], torch.ones(1, 1), None, exp.mask, value_norm=norm, **kw)
        theirs = unfused.dvpo_advantages(raw, exp.mask, value_norm=norm, **kw)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(torch.where(exp.mask, a, 0.0), torch.where(exp.mask, b, 0.0),
                                       rtol=1e-5, atol=1e-5)
    exp.advantages = theirs[0]
    model.train()
    grads = {}
    for kernels in ("fused", "unfused"):
        model.zero_grad()
        cfg = ActorConfig(kernels=kernels, entropy_coef=0.01)
        loss, _ = policy_loss_on(policy, exp, cfg, LossTerms(kl_coef=0.05), normalizer=exp.mask.sum())
        loss.backward()
        grads[kernels] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["fused"][0], grads["unfused"][0], rtol=1e-5, atol=1e-6)
    # the token normaliser only applies to token-mean; per-sequence means ignore it
    seq = ActorConfig(loss_agg="seq-mean-token-mean")
    with torch.no_grad():
        a, _ = policy_loss_on(policy, exp, seq, LossTerms(), normalizer=exp.mask.sum())
        b, _ = policy_loss_on(policy, exp, seq, LossTerms(), normalizer=None)
    torch.testing.assert_close(a, b)
    for a, b in zip(grads["fused"][1], grads["unfused"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adaptive_kl_controller_moves_toward_the_target():
    ctl = KLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 100)  # far above target: error clipped at +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl.update(5.4, 100)
    assert ctl.value == pytest.approx(0.2 * 1.002 * (1 - 0.1 * 0.01))
    fixed = KLController(0.2, adaptive=False)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.2


def test_dvpo_runs_from_the_example_and_resumes_exactly(sft_model, gvm_model, tmp_path):
    kw = dvpo_overrides(sft_model, gvm_model, **{"train.max_steps": "4", "train.save_every": "2",
                                                 "train.save_total_limit": "0", "train.eval_every": "2"})
    results = run_stage("dvpo", "dvpo_tiny", tmp_path, **kw)
    full = metrics(tmp_path)
    names = {"actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm",
             "critic/values/mean", "critic/advantages/mean", "critic/kl_coef", "response_length/mean",
             "timing_s/gen", "timing_s/ref", "timing_s/values", "timing_s/adv", "timing_s/update_actor",
             "timing_s/step", "perf/throughput"}
    assert names <= set(full[0])
    assert {"eval/kl", "eval/gvm_final_value", "eval/response_length"} <= set(results)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    kill_after(tmp_path, 2)
    run_stage("dvpo", "dvpo_tiny", tmp_path, **kw)
    again = metrics(tmp_path)
    drop = ("time", "timing_s/", "perf/")
    strip = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in full]
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in again] == strip


def test_dvpo_options_kl_in_loss_fixed_coef_terminal_score_and_unfused(sft_model, gvm_model, tmp_path):
    kw = dvpo_overrides(sft_model, gvm_model, **{"kl.placement": "loss", "kl.adaptive": "false",
                                                 "gvm.score": "gvm_terminal", "actor.kernels": "unfused",
                                                 "gvm.value_norm": "batch", "actor.ppo_epochs": "2"})
    run_stage("dvpo", "dvpo_tiny", tmp_path, **kw)
    rows = [r for r in metrics(tmp_path) if "actor/pg_loss" in r]
    assert len(rows) == 3 and all(r["critic/kl_coef"] == 0.2 for r in rows)
    assert "actor/kl_loss" in rows[0] and "critic/score/mean" in rows[0]


def test_non_finite_updates_are_skipped_then_abort(sft_model, gvm_model, tmp_path, monkeypatch):
    real = dvpo_stage.DVPOStep.advantages

    def poisoned(self, exp, metrics, timer):
        real(self, exp, metrics, timer)
        exp.advantages = torch.full_like(exp.advantages, float("nan"))

    monkeypatch.setattr(dvpo_stage.DVPOStep, "advantages", poisoned)
    kw = dvpo_overrides(sft_model, gvm_model, **{"actor.max_bad_steps": "3", "train.max_steps": "1"})
    run_stage("dvpo", "dvpo_tiny", tmp_path / "a", **kw)
    rows = metrics(tmp_path / "a")
    assert rows[0]["actor/skipped_updates"] == 2.0  # two mini-batches, both skipped
    with pytest.raises(RuntimeError, match="max_bad_steps=1"):
        run_stage("dvpo", "dvpo_tiny", tmp_path / "b", **{**kw, "actor.max_bad_steps": "1"})


def test_config_errors_name_the_key(sft_model, tmp_path):
    from dvpo.config import ConfigError

    with pytest.raises(ConfigError, match="gvm.path"):
        stage_config("dvpo", "dvpo_tiny", tmp_path, **{"gvm.path": "null"})
    with pytest.raises(ConfigError, match="actor.mini_batch_size"):
        stage_config("dvpo", "dvpo_tiny", tmp_path, **{"actor.mini_batch_size": "64"})


def test_dvpo_with_lora_uses_the_adapter_free_base_as_reference(sft_model, gvm_model, tmp_path):
    kw = dvpo_overrides(sft_model, gvm_model, **{"model.lora_r": "4", "train.max_steps": "2", "train.lr": "1e-2"})
    run_stage("dvpo", "dvpo_tiny", tmp_path, **kw)
    rows = [r for r in metrics(tmp_path) if "critic/kl" in r]
    assert rows[0]["critic/kl"] == 0.0  # LoRA starts as the identity: policy == reference at step 1
    assert rows[1]["critic/kl"] != 0.0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # adapters merged on export
    assert type(merged).__name__ == "LlamaForCausalLM"


def test_responses_that_end_at_once_train_without_error(sft_model, gvm_model, tmp_path, monkeypatch):
    """Every row samples EOS first: one-token responses, zero-variance values, still a finite step."""
    import dvpo.rollout as rollout_module

    eos = load_tokenizer(str(sft_model)).eos_token_id
    monkeypatch.setattr(rollout_module, "sample_tokens",
                        lambda logits, **kw: torch.full(logits.shape[:1], eos, dtype=torch.long, device=logits.device))
    run_stage("dvpo", "dvpo_tiny", tmp_path, **dvpo_overrides(sft_model, gvm_model, **{"train.max_steps": "1"}))
    row = [r for r in metrics(tmp_path) if "actor/pg_loss" in r][0]
    assert row["response_length/mean"] == 1.0 and row["response_length/clip_ratio"] == 0.0
    assert row["actor/skipped_updates"] == 0.0 and row["critic/advantages/mean"] == 0.0
    assert not any(isinstance(v, str) for v in row.values())  # NaN/Inf would be logged as strings
