"""dvpo dpo and dvpo vpo: the DPO / IPO / VPO losses by hand, sequence log-probs against HF logits,
gradient accumulation, runs from the examples (offline and online VPO), rising reward accuracy, resume."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from _stages import HH, TINY, kill_after, metrics, needs_hh, run_stage, stage_config
from transformers import AutoModelForCausalLM

from dvpo.config import ConfigError
from dvpo.data import EncodedSequence
from dvpo.models import ModelConfig, PolicyModel, load_causal_lm, load_tokenizer
from dvpo.objectives import implicit_rewards, preference_loss, value_incentive
from dvpo.stages.dpo import (
    DPOObjectiveConfig,
    PreferenceExample,
    PreferenceStep,
    ValueTerm,
    collate_rows,
)
from dvpo.stages.common import sequence_logprobs
from dvpo.tasks import OracleTask
from dvpo.trainer import TrainConfig, build_optimizer, build_scheduler

CPU = torch.device("cpu")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- the objectives on fixed numbers -----------------------------------------------------------

PC, PR = torch.tensor([-10.0, -4.0, -7.0]), torch.tensor([-12.0, -3.0, -6.5])
RC, RR = torch.tensor([-11.0, -5.0, -6.0]), torch.tensor([-11.5, -2.0, -8.0])
H = [1.5, 2.0, -2.5]  # (pc - rc) - (pr - rr)


def test_dpo_ipo_and_vpo_terms_match_hand_computations():
    beta = 0.1
    dpo = preference_loss(PC, PR, RC, RR, beta=beta)
    assert dpo.tolist() == pytest.approx([-log_sigmoid(beta * h) for h in H], rel=1e-6)
    eps = 0.2
    smooth = preference_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    assert smooth.tolist() == pytest.approx(
        [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H], rel=1e-6)
    ipo = preference_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(h - 2.0) ** 2 for h in H], rel=1e-6)
    assert implicit_rewards(PC, RC, beta).tolist() == pytest.approx([0.1, 0.1, -0.1], rel=1e-6)
    offline = value_incentive(PC, RC, alpha=0.5, beta=beta, sign=-1)
    online = value_incentive(PC, RC, alpha=0.5, beta=beta, sign=1)
    assert offline.tolist() == pytest.approx([-0.05, -0.05, 0.05], rel=1e-6)
    assert online.tolist() == pytest.approx([0.05, 0.05, -0.05], rel=1e-6)


def test_objectives_reject_bad_arguments_by_name():
    with pytest.raises(ValueError, match="beta"):
        preference_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="shape"):
        preference_loss(PC, PR[:2], RC, RR, beta=0.1)
    with pytest.raises(ValueError, match="sign"):
        value_incentive(PC, RC, alpha=0.1, beta=0.1, sign=0)
    with pytest.raises(ValueError, match="alpha"):
        value_incentive(PC, RC, alpha=-1.0, beta=0.1, sign=1)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dpo.beta"):
        stage_config("dpo", "dpo_tiny", tmp_path, **{"dpo.beta": "0"})
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        stage_config("dpo", "dpo_tiny", tmp_path, **{"dpo.loss": "ipo", "dpo.label_smoothing": "0.1"})
    with pytest.raises(ConfigError, match="model.path"):
        stage_config("dpo", "dpo_tiny", tmp_path, **{"model.path": "null"})
    with pytest.raises(ConfigError, match="vpo.alpha"):
        stage_config("vpo", "vpo_tiny", tmp_path, **{"vpo.alpha": "-0.1"})
    with pytest.raises(ConfigError, match="vpo.judge"):
        stage_config("vpo", "vpo_tiny", tmp_path, **{"vpo.mode": "online", "vpo.judge": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="train.max_steps"):
        stage_config("vpo", "vpo_tiny", tmp_path, **{"vpo.mode": "online", "train.max_steps": "7"})


# --- the stage's log-probs and step --------------------------------------------------------------

def test_sequence_logprobs_match_log_softmax_of_hf_logits(sft_model):
    hf = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    seqs = [EncodedSequence([1, 40, 41], [50, 51, 2]), EncodedSequence([1, 60], [70, 2])]
    batch = collate_rows(seqs, pad_token_id=0)
    with torch.no_grad():
        ours = sequence_logprobs(PolicyModel(hf), batch)
        logp = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].log_softmax(-1)
        picked = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    # row 0 scores tokens 50, 51, 2 (predicted at positions 2..4), row 1 tokens 70, 2 (positions 1..2)
    torch.testing.assert_close(ours, torch.stack([picked[0, 2:5].sum(), picked[1, 1:3].sum()]), rtol=1e-5, atol=1e-5)


def toy_pairs(n: int) -> list[PreferenceExample]:
    g = random.Random(0)
    out = []
    for i in range(n):
        prompt = [1] + [g.randrange(10, 200) for _ in range(2 + i % 3)]
        out.append(PreferenceExample(EncodedSequence(prompt, [g.randrange(10, 200) for _ in range(1 + i % 4)] + [2]),
                                     EncodedSequence(prompt, [g.randrange(10, 200) for _ in range(2 + i % 2)] + [2]),
                                     -20.0 - i, -21.0 + i))
    return out


def make_step(sft_model, examples, objective, micro, value_term=None):
    tokenizer = load_tokenizer(str(sft_model))
    policy = PolicyModel(load_causal_lm(ModelConfig(path=str(sft_model)), tokenizer, CPU))
    t = TrainConfig(lr=1e-3)
    optimizer = build_optimizer(policy, t)
    return PreferenceStep(policy, optimizer, build_scheduler(optimizer, t, 1), examples, objective, pad_token_id=0,
                          micro=micro, max_grad_norm=1.0, device=CPU, bf16=False, value_term=value_term)


def test_step_terms_sum_log_probs_for_dpo_and_average_them_for_ipo(sft_model):
    examples = toy_pairs(3)
    step = make_step(sft_model, examples, DPOObjectiveConfig(beta=0.2), micro=3, value_term=ValueTerm(-1, 0.5))
    with torch.no_grad():
        terms = step.forward(examples, with_value_term=True)
        logps = sequence_logprobs(step.policy, collate_rows([e.chosen for e in examples] +
                                                           [e.rejected for e in examples], 0))
    pc, pr = logps[:3], logps[3:]
    rc = torch.tensor([e.ref_chosen for e in examples])
    rr = torch.tensor([e.ref_rejected for e in examples])
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(terms["preference_loss"], -torch.nn.functional.logsigmoid(0.2 * h))
    torch.testing.assert_close(terms["value_term"], -0.5 * 0.2 * (pc - rc))  # offline sign, chosen calibration
    torch.testing.assert_close(terms["loss"], terms["preference_loss"] + terms["value_term"])
    torch.testing.assert_close(terms["rewards/chosen"], 0.2 * (pc - rc))

    step.objective = DPOObjectiveConfig(loss="ipo", beta=0.2)
    with torch.no_grad():
        terms = step.forward(examples, with_value_term=True)
    nc = torch.tensor([len(e.chosen.response_ids) for e in examples], dtype=torch.float32)
    nr = torch.tensor([len(e.rejected.response_ids) for e in examples], dtype=torch.float32)
    h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
    torch.testing.assert_close(terms["preference_loss"], (h - 2.5) ** 2)
    torch.testing.assert_close(terms["value_term"], -0.5 * 0.2 * (pc - rc))  # sequence sums, whatever the loss


@pytest.mark.parametrize("calibration", ["chosen", "samples"])
def test_micro_batches_accumulate_the_full_batch_gradient(sft_model, calibration):
    examples = toy_pairs(5)
    samples = None
    if calibration == "samples":
        samples = {tuple(e.prompt_ids): (EncodedSequence(e.prompt_ids, [30 + i, 31, 2]), -9.0 - i)
                   for i, e in enumerate(examples)}
    grads = []
    for micro in (5, 2):
        step = make_step(sft_model, examples, DPOObjectiveConfig(beta=0.1), micro, ValueTerm(1, 0.3, samples))
        sums = step.accumulate([4, 0, 3, 1, 2])
        grads.append(([p.grad.clone() for p in step.params], sums))
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert grads[0][1].keys() == grads[1][1].keys() >= {"train/loss", "train/value_term", "rewards/accuracies"}
    for k in grads[0][1]:
        assert float(grads[0][1][k]) == pytest.approx(float(grads[1][1][k]), rel=1e-5, abs=1e-7)


# --- runs from the examples ----------------------------------------------------------------------

def hh_overrides(sft_model, **extra) -> dict:
    return {**TINY, "model.path": str(sft_model), "data.pairs": str(HH), "data.limit": "40",
            "data.eval_fraction": "0.2", "data.max_prompt_length": "40", "data.max_length": "192",
            "train.batch_size": "8", "train.lr": "2e-3",
            "train.warmup_steps": "0", "train.eval_every": "0", "train.save_every": "0", **extra}


@needs_hh
def test_dpo_runs_from_the_example_and_its_reward_accuracy_rises(sft_model, tmp_path):
    kw = hh_overrides(sft_model, **{"data.limit": "20", "train.max_steps": "10", "train.lr": "3e-3"})
    results = run_stage("dpo", "dpo_tiny", tmp_path, **kw)
    rows = [r for r in metrics(tmp_path) if "train/loss" in r]
    assert len(rows) == 10 and rows[0]["rewards/accuracies"] == 0.0  # policy == reference: every reward is 0
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-6)
    late = [r["rewards/accuracies"] for r in rows[-4:]]
    assert sum(late) / 4 > 0.75, late
    assert sum(r["train/loss"] for r in rows[-4:]) / 4 < math.log(2) - 0.05
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= results.keys()
    assert results["eval/pairs"] == json.loads((tmp_path / "data_stats.json").read_text())["eval pairs"]["kept"] > 0
    tokenizer = load_tokenizer(str(tmp_path / "final"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert hf.config.vocab_size == len(tokenizer)
    start = AutoModelForCausalLM.from_pretrained(sft_model)
    assert not torch.equal(hf.lm_head.weight, start.lm_head.weight)


@needs_hh
def test_dpo_ipo_resume_gives_identical_metrics(sft_model, tmp_path):
    kw = hh_overrides(sft_model, **{"dpo.loss": "ipo", "train.max_steps": "4", "train.save_every": "2",
                                    "train.save_total_limit": "0", "train.micro_batch_size": "3"})
    run_stage("dpo", "dpo_tiny", tmp_path, **kw)
    full = [{k: v for k, v in r.items() if k != "time"} for r in metrics(tmp_path)]
    kill_after(tmp_path, 2)
    run_stage("dpo", "dpo_tiny", tmp_path, **kw)
    assert [{k: v for k, v in r.items() if k != "time"} for r in metrics(tmp_path)] == full


@needs_hh
@pytest.mark.parametrize("calibration", ["chosen", "reference"])
def test_offline_vpo_runs_from_the_example(sft_model, tmp_path, calibration):
    kw = hh_overrides(sft_model, **{"vpo.calibration": calibration, "vpo.alpha": "0.5", "train.max_steps": "3",
                                    "rollout.max_new_tokens": "6"})
    results = run_stage("vpo", "vpo_tiny", tmp_path, **kw)
    rows = [r for r in metrics(tmp_path) if "train/loss" in r]
    # policy == reference at the first step (up to rounding: the two passes pad their batches differently)
    assert len(rows) == 3 and rows[0]["train/value_term"] == pytest.approx(0.0, abs=1e-6)
    for r in rows:
        assert r["train/loss"] == pytest.approx(r["train/preference_loss"] + r["train/value_term"], rel=1e-5)
        if calibration == "chosen":  # the term is -alpha * beta * (log pi - log ref) of the chosen responses
            assert r["train/value_term"] == pytest.approx(-0.5 * r["rewards/chosen"], rel=1e-5, abs=1e-9)
    assert any(r["train/value_term"] != 0.0 for r in rows[1:])
    assert "eval/rewards/accuracies" in results
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def oracle_setup(tmp_path_factory):
    """A tiny SFT policy on the oracle task (word-level tokenizer) and oracle-labelled preference pairs."""
    root = tmp_path_factory.mktemp("oracle")
    task = OracleTask(seed=0)
    task.tokenizer().save_pretrained(root / "tok")
    corpus = task.sft_corpus(256)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    rng = random.Random(0)
    pairs = [task.label(r["prompt"], r["response"], task.teacher_response(r["prompt"], rng), rng) for r in corpus[:48]]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs if p["chosen"] != p["rejected"]))
    run_stage("sft", None, root / "sft", **{"model.tokenizer": str(root / "tok"), "model.hidden_size": "32",
                                            "model.num_heads": "2", "data.train": str(root / "sft.jsonl"),
                                            "data.max_length": "24", "train.batch_size": "32", "train.max_steps": "15",
                                            "train.lr": "3e-3", "train.progress_bar": "false", "train.device": "cpu"})
    return root


def online_overrides(root, **extra) -> dict:
    return {"model.path": str(root / "sft" / "final"), "data.pairs": str(root / "pairs.jsonl"),
            "data.max_length": "24", "data.eval_fraction": "0.1", "vpo.mode": "online", "vpo.judge": "oracle",
            "vpo.rounds": "2", "vpo.prompts_per_round": "8", "vpo.steps_per_round": "2", "vpo.alpha": "0.1",
            "rollout.max_new_tokens": "9", "train.max_steps": "0", "train.batch_size": "8", "train.lr": "2e-3",
            "train.warmup_steps": "0", "train.eval_every": "0", "train.save_every": "0",
            "train.progress_bar": "false", "train.device": "cpu", **extra}


def test_online_vpo_with_the_oracle_judge_grows_the_data_and_resumes_exactly(oracle_setup, tmp_path):
    kw = online_overrides(oracle_setup, **{"train.save_every": "1", "train.save_total_limit": "0"})
    run_stage("vpo", "vpo_tiny", tmp_path, **kw)
    full = [{k: v for k, v in r.items() if k != "time"} for r in metrics(tmp_path)]
    rounds = [r for r in full if "online/pairs_added" in r]
    assert [r["step"] for r in rounds] == [1, 3]
    base = rounds[0]["online/train_pairs"] - rounds[0]["online/pairs_added"]
    assert rounds[1]["online/train_pairs"] == base + rounds[0]["online/pairs_added"] + rounds[1]["online/pairs_added"]
    assert all(r["online/pairs_added"] + r["online/pairs_dropped"] == 8 for r in rounds)
    assert rounds[0]["online/pairs_added"] > 0
    train = [r for r in full if "train/loss" in r]
    assert len(train) == 4 and train[0]["train/value_term"] == 0.0
    saved = json.loads((tmp_path / "global_step_3" / "trainer_state.json").read_text())
    assert len(saved["online"]["pairs"]) == rounds[1]["online/train_pairs"] - base

    kill_after(tmp_path, 2)  # resumes at a round boundary: the next round is sampled from the restored policy
    run_stage("vpo", "vpo_tiny", tmp_path, **kw)
    assert [{k: v for k, v in r.items() if k != "time"} for r in metrics(tmp_path)] == full
    kill_after(tmp_path, 3)  # mid-round: the collected pairs come back from the checkpoint
    run_stage("vpo", "vpo_tiny", tmp_path, **kw)
    assert [{k: v for k, v in r.items() if k != "time"} for r in metrics(tmp_path)] == full


@needs_hh
def test_oracle_judge_rejects_prompts_of_another_task(sft_model, tmp_path):
    kw = hh_overrides(sft_model, **{"vpo.mode": "online", "vpo.prompts_per_round": "4", "vpo.steps_per_round": "1",
                                    "vpo.rounds": "1", "rollout.max_new_tokens": "6",
                                    "train.max_steps": "0"})
    with pytest.raises(ValueError, match="vpo.judge=oracle"):
        run_stage("vpo", "vpo_tiny", tmp_path, **kw)


@needs_hh
def test_lora_policies_use_the_adapter_disabled_model_as_reference_and_a_reward_model_judges(sft_model, tmp_path):
    pytest.importorskip("peft")
    run_stage("rm", "rm_tiny", tmp_path / "rm", **hh_overrides(sft_model, **{"train.max_steps": "2"}))
    kw = hh_overrides(sft_model, **{"model.lora_r": "4", "train.lr": "1e-2", "vpo.mode": "online",
                                    "vpo.judge": str(tmp_path / "rm" / "final"), "vpo.rounds": "2",
                                    "vpo.prompts_per_round": "4", "vpo.steps_per_round": "1",
                                    "rollout.max_new_tokens": "6", "train.max_steps": "0"})
    run_stage("vpo", "vpo_tiny", tmp_path / "vpo", **kw)
    rows = metrics(tmp_path / "vpo")
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2  # the first step's policy is the reference (up to the rounding of different padding)
    assert train[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5) == train[0]["rewards/rejected"]
    assert train[1]["rewards/margins"] != 0.0
    assert [r["online/pairs_added"] + r["online/pairs_dropped"] for r in rows if "online/pairs_added" in r] == [4, 4]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "vpo" / "final")
    assert not any("lora" in name for name, _ in hf.named_parameters())
