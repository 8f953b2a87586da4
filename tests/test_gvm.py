"""dvpo gvm: lambda-return targets, training on the HH pairs, export and reload, resume, LoRA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dvpo.config import load_config
from dvpo.data import EncodedSequence, ValueExample, collate_values
from dvpo.models import ModelConfig, ValueModel, load_token_value_model, load_tokenizer
from dvpo.objectives import last_values, mean_values, pair_wins, value_loss, value_targets
from dvpo.stages import gvm

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")


def tiny_config(out: Path, **overrides):
    base = {"data.pairs": str(HH), "data.limit": "64", "data.max_length": "128", "data.truncation": "prompt_left",
            "data.eval_fraction": "0.25",
            "model.hidden_size": "32", "model.num_heads": "2", "model.vocab_size": "320",
            "train.batch_size": "8", "train.max_steps": "30", "train.lr": "3e-3", "train.device": "cpu",
            "train.progress_bar": "false", "train.output_dir": str(out)}
    base.update(overrides)
    return load_config(gvm.GVMStageConfig, None, list(base.items()))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# --- targets and metrics on a hand-made batch ------------------------------------------------

def two_pair_batch():
    pair1 = ValueExample((EncodedSequence([1, 4], [5, 6, 2]), EncodedSequence([1, 4], [7, 2])), (1.0, -1.0))
    pair2 = ValueExample((EncodedSequence([1], [8, 2]), EncodedSequence([1], [9, 10, 11, 2])), (1.0, -1.0))
    return collate_values([pair1, pair2], pad_token_id=0)


def test_lambda_return_targets_match_a_hand_computation():
    batch = two_pair_batch()
    # states (columns) per row: [1,2,3], [1,2], [0,1], [0,1,2,3]; other columns are padding/prompt
    values = torch.tensor([[9.0, 0.2, -0.4, 0.5],
                           [9.0, 0.3, 0.1, 9.0],
                           [0.6, -0.2, 9.0, 9.0],
                           [0.1, 0.0, 0.4, -0.3]])
    targets = value_targets(values, batch.rewards, batch.mask, target="td_lambda", gamma=1.0, lam=0.95)
    # R_t = r_t + (1 - lam) * V_{t+1} + lam * R_{t+1}, with R = r at the last state (gamma = 1)
    expected = torch.tensor([
        [0.0, 0.05 * -0.4 + 0.95 * (0.05 * 0.5 + 0.95 * 1.0), 0.05 * 0.5 + 0.95 * 1.0, 1.0],
        [0.0, 0.05 * 0.1 + 0.95 * -1.0, -1.0, 0.0],
        [0.05 * -0.2 + 0.95 * 1.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ])
    r3 = [0.0, 0.0, 0.0, -1.0]
    r3[2] = 0.05 * -0.3 + 0.95 * r3[3]
    r3[1] = 0.05 * 0.4 + 0.95 * r3[2]
    r3[0] = 0.05 * 0.0 + 0.95 * r3[1]
    expected[3] = torch.tensor(r3)
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-6)
    assert targets[1, 1].item() == pytest.approx(-0.945)

    mc = value_targets(values, batch.rewards, batch.mask, target="mc")
    torch.testing.assert_close(mc, torch.where(batch.mask, batch.rewards.sum(1, keepdim=True), 0.0))

    loss = value_loss(values, targets, batch.mask, batch.mask.sum())
    err = torch.where(batch.mask, values - targets, 0.0)
    assert loss.item() == pytest.approx(0.5 * (err ** 2).sum().item() / 11)

    last = last_values(values, batch.mask)
    assert last.tolist() == pytest.approx([0.5, 0.1, -0.2, -0.3])
    assert pair_wins(last, batch.pairs).tolist() == [1.0, 1.0]
    assert mean_values(values, batch.mask).tolist() == pytest.approx([0.1, 0.2, 0.2, 0.05])
    assert pair_wins(torch.tensor([1.0, 1.0, 0.0, 2.0]), batch.pairs).tolist() == [0.5, 0.0]


# --- training runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not HH.is_file():
        pytest.skip("shared HH data not present")
    out = tmp_path_factory.mktemp("gvm") / "run"
    cfg = tiny_config(out)
    results = gvm.run(cfg)
    return cfg, out, results


def test_loss_goes_down_and_eval_is_written(trained):
    _, out, results = trained
    curve = losses(out)
    assert len(curve) == 30
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < 0.8 * first, curve
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_acc = [r["train/pair_acc_last"] for r in rows if "train/pair_acc_last" in r]
    assert train_acc[0] == 0.5  # the zero head ties every pair
    assert sum(train_acc[-5:]) / 5 > 0.7
    saved = json.loads((out / "eval.json").read_text())
    stats = json.loads((out / "data_stats.json").read_text())
    assert saved["step"] == 30 and saved["eval/pairs"] == stats["eval pairs"]["kept"] > 0
    assert 0.0 <= saved["eval/pair_acc_last"] <= 1.0 and saved["eval/pair_acc_mean"] == results["eval/pair_acc_mean"]
    assert stats["train pairs"]["read"] == 48 and stats["eval pairs"]["read"] == 16


def test_export_reloads_with_identical_values(trained):
    from transformers import AutoModelForTokenClassification

    _, out, _ = trained
    final = out / "final"
    tokenizer = load_tokenizer(str(final))
    encoded = [tokenizer.encode(t) for t in ("\n\nHuman: hi\n\nAssistant: hello there",
                                             "\n\nHuman: how do I steal a car?\n\nAssistant: no")]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    hf = AutoModelForTokenClassification.from_pretrained(final).eval()
    assert type(hf).__name__ == "LlamaForTokenClassification" and hf.config.num_labels == 1
    ours = ValueModel(load_token_value_model(ModelConfig(path=str(final)), tokenizer, torch.device("cpu"))).eval()
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask).logits[..., 0]
        values = ours(ids, mask)
    assert reference.abs().max() > 0  # the head was trained away from its zero init
    real = mask.bool()
    torch.testing.assert_close(values[real], reference[real], rtol=1e-5, atol=1e-6)


def test_resume_gives_the_same_next_step(tmp_path, monkeypatch):
    if not HH.is_file():
        pytest.skip("shared HH data not present")
    kw = {"train.max_steps": "4", "train.save_every": "1", "data.limit": "40", "data.max_length": "128"}
    gvm.run(tiny_config(tmp_path / "straight", **kw))
    straight = losses(tmp_path / "straight")

    class Preempted(RuntimeError):
        pass

    original = gvm.GVMStep.__call__

    def stop_at_3(self, indices, step):
        if step == 3:
            raise Preempted
        return original(self, indices, step)

    monkeypatch.setattr(gvm.GVMStep, "__call__", stop_at_3)
    with pytest.raises(Preempted):
        gvm.run(tiny_config(tmp_path / "resumed", **kw))
    monkeypatch.setattr(gvm.GVMStep, "__call__", original)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("global_step_*")) == ["global_step_1", "global_step_2"]
    gvm.run(tiny_config(tmp_path / "resumed", **kw))
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-9)
    # save_total_limit=2 keeps the two newest checkpoints, each loadable as a Hugging Face folder
    assert sorted(p.name for p in (tmp_path / "resumed").glob("global_step_*")) == ["global_step_3", "global_step_4"]
    from transformers import AutoModelForTokenClassification

    AutoModelForTokenClassification.from_pretrained(tmp_path / "resumed" / "global_step_4")


def test_backbone_initialised_from_a_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    from dvpo.models import config_from_fields, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["hello world, hello there"] * 5, 270)
    small = ModelConfig(arch="qwen2", hidden_size=32, num_heads=2, num_layers=1)
    lm = AutoModelForCausalLM.from_config(config_from_fields(small, tokenizer))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    model = load_token_value_model(ModelConfig(path=str(tmp_path / "lm")), tokenizer, torch.device("cpu"))
    assert type(model).__name__ == "Qwen2ForTokenClassification"
    assert model.score.weight.abs().sum() == 0 and model.score.bias.abs().sum() == 0
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(model.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_lora_pairwise_term_and_scored_data(tmp_path):
    pytest.importorskip("peft")
    if not HH.is_file():
        pytest.skip("shared HH data not present")
    from transformers import AutoModelForTokenClassification

    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"question {i}"}],
                                          "response": "an answer" * (i % 3 + 1), "reward": i / 10 - 0.3}) + "\n"
                              for i in range(8)))
    cfg = tiny_config(tmp_path / "lora", **{"model.lora_r": "4", "gvm.pairwise_coef": "0.5", "train.max_steps": "3",
                                            "data.limit": "24", "data.max_length": "32", "train.micro_batch_size": "3",
                                            "gvm.mini_batch_size": "4", "data.scored": str(scored)})
    gvm.run(cfg)
    stats = json.loads((tmp_path / "lora" / "data_stats.json").read_text())
    assert stats["scored"]["kept"] == 8 and stats["train pairs"]["read"] == 18
    rows = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/pairwise_loss" in r for r in rows if "train/loss" in r)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "lora" / "final")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.score.weight.abs().sum() > 0
