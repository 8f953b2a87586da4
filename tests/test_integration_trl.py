"""dvpo_kernels.integrations.trl against TRL itself: GRPO's train() step with TRL's chunked log-prob kernel and
with ours gives the same loss and gradients; DVPOTrainer trains a tiny policy from a frozen GVM."""
from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (.ci/install_frameworks)")
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification, PreTrainedTokenizerFast  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import dvpo_kernels.integrations.trl as dk_trl  # noqa: E402

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(46)]


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def config():
    return LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, eos_token_id=1, bos_token_id=None)


def policy():
    torch.manual_seed(0)
    return LlamaForCausalLM(config())


def prompts(n=4):
    return Dataset.from_dict({"prompt": [" ".join(f"w{(3 * i + j) % 40 + 2}" for j in range(4)) for i in range(n)]})


def length_reward(completions, **_):
    return [float(len(c.split())) for c in completions]


class Grads(TrainerCallback):
    """Records the gradients just before the optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grpo_args(tmp_path, cls=trl.GRPOConfig, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                seed=0, bf16=False, temperature=1.0)
    return cls(**{**base, **kw})


def run_grpo(tmp_path, loss_type):
    grads = Grads()
    policy().save_pretrained(tmp_path / "policy")  # the reference model (beta > 0) loads from the path
    trainer = trl.GRPOTrainer(str(tmp_path / "policy"), length_reward, args=grpo_args(tmp_path, loss_type=loss_type, beta=0.04),
                              train_dataset=prompts(), processing_class=tokenizer(), callbacks=[grads])
    trainer.train()
    return trainer.state.log_history[0]["loss"], grads.grads


@pytest.mark.parametrize("loss_type", ["dapo"])
def test_grpo_step_same_with_our_kernel(tmp_path, loss_type, monkeypatch):
    loss_trl, g_trl = run_grpo(tmp_path / "trl", loss_type)
    calls = []
    kernel = dk_trl.F.linear_logprobs
    monkeypatch.setattr(dk_trl.F, "linear_logprobs", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    previous = dk_trl.use_dvpo_kernels()
    try:
        loss_ours, g_ours = run_grpo(tmp_path / "ours", loss_type)
    finally:
        trl.trainer.utils._ChunkedLogProbFunction = previous
    assert calls  # TRL's fused head ran our kernel
    assert loss_ours == pytest.approx(loss_trl, rel=1e-5, abs=1e-7)
    assert g_ours.keys() == g_trl.keys() and g_ours
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_trl[n], rtol=1e-5, atol=1e-6, msg=n)


def test_chunked_logprobs_reject_outputs_it_does_not_compute():
    h, w, t = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 4, 2])
    with pytest.raises(ValueError, match="outputs"):
        dk_trl.ChunkedLogProbs.apply(h, w, None, t, 1.0, 4, None, 1.0, ("log_probs", "is_top1"))


def gvm():
    torch.manual_seed(1)
    return LlamaForTokenClassification(LlamaConfig(**{**config().to_dict(), "num_labels": 1}))


def test_dvpo_trainer_trains_from_a_frozen_gvm(tmp_path):
    model, value_model = policy(), gvm()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gvm_start = {n: p.detach().clone() for n, p in value_model.named_parameters()}
    args = grpo_args(tmp_path, cls=dk_trl.DVPOConfig, max_steps=3, loss_type="bnpo", kl_coef=0.1)
    trainer = dk_trl.DVPOTrainer(model, value_model, args=args, train_dataset=prompts(8),
                                 processing_class=tokenizer())
    seen = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: seen.append(generate(inputs)) or seen[-1]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert {"objective/kl", "objective/kl_coef", "objective/values_mean", "clip_ratio/region_mean"} <= logs[0].keys()
    adv, mask = seen[0]["advantages"], seen[0]["completion_mask"].bool()
    assert adv.shape == mask.shape  # token-level, not one value per completion
    assert (adv[mask].std() > 0) and (adv[~mask] == 0).all()
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())  # the policy trained
    assert all(torch.equal(p, gvm_start[n]) for n, p in value_model.named_parameters())  # the GVM did not


def test_dvpo_config_checks(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        dk_trl.DVPOTrainer(policy(), gvm(), args=grpo_args(tmp_path, cls=dk_trl.DVPOConfig, loss_type="sapo"),
                           train_dataset=prompts(), processing_class=tokenizer())
