"""dvpo rm: last-token scores and the Bradley-Terry loss by hand, a run from the example with held-out
accuracy, export that reloads as a token-classification model with identical scores."""
from __future__ import annotations

import json
import math

import pytest
import torch
from _stages import HH, TINY, metrics, needs_hh, run_stage, stage_config
from transformers import AutoModelForTokenClassification

from dvpo.config import ConfigError
from dvpo.data import EncodedSequence, ValueExample, collate_values
from dvpo.models import ModelConfig, ValueModel, load_token_value_model, load_tokenizer
from dvpo.stages import rm
from dvpo.stages.gvm import prepare_data


def two_pairs():
    prompt = [1, 40, 41]
    pair1 = ValueExample((EncodedSequence(prompt, [50, 51, 2]), EncodedSequence(prompt, [52, 2])), (1.0, -1.0))
    pair2 = ValueExample((EncodedSequence([1, 60], [70, 2]), EncodedSequence([1, 60], [71, 72, 73, 2])), (1.0, -1.0))
    return collate_values([pair1, pair2], pad_token_id=0)


def test_scores_and_loss_match_a_hand_computation(sft_model):
    tokenizer = load_tokenizer(str(sft_model))
    model = ValueModel(load_token_value_model(ModelConfig(path=str(sft_model)), tokenizer, torch.device("cpu"))).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    batch = two_pairs()
    with torch.no_grad():
        scores = rm.sequence_scores(model, batch)
        logits = model.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., 0]
    # the last real token of each row: the EOS at columns 5, 4, 3, 5
    expected = torch.stack([logits[0, 5], logits[1, 4], logits[2, 3], logits[3, 5]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)

    s = [float(x) for x in scores]
    nll = [math.log1p(math.exp(-(s[0] - s[1]))), math.log1p(math.exp(-(s[2] - s[3])))]
    plain = rm.reward_loss(scores, batch.pairs, 2)
    assert plain.item() == pytest.approx(sum(nll) / 2, rel=1e-5)
    with_l2 = rm.reward_loss(scores, batch.pairs, 2, score_l2=0.3)
    assert with_l2.item() == pytest.approx(sum(nll) / 2 + 0.3 * sum(x * x for x in s) / 4, rel=1e-5)
    # micro-batches normalised by the whole batch's pair count add up to the full loss
    halves = [rm.reward_loss(scores[r], torch.tensor([[0, 1]]), 2, score_l2=0.3) for r in ([0, 1], [2, 3])]
    assert sum(halves).item() == pytest.approx(with_l2.item(), rel=1e-6)
    assert rm.margins(scores, batch.pairs).tolist() == pytest.approx([s[0] - s[1], s[2] - s[3]], rel=1e-6)


def test_bad_score_l2_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="rm.score_l2"):
        stage_config("rm", "rm_tiny", tmp_path, **{"rm.score_l2": "-1"})
    with pytest.raises(ConfigError, match="data.pairs"):
        stage_config("rm", None, tmp_path)


@needs_hh
def test_rm_runs_from_the_example_reports_held_out_accuracy_and_exports(sft_model, tmp_path):
    kw = {**TINY, "model.path": str(sft_model), "data.pairs": str(HH), "data.limit": "64", "data.eval_fraction": "0.25",
          "train.batch_size": "8", "train.max_steps": "12", "train.lr": "3e-3", "train.save_every": "0",
          "train.eval_every": "0", "rm.score_l2": "0.01"}
    results = run_stage("rm", "rm_tiny", tmp_path, **kw)
    rows = [r for r in metrics(tmp_path) if "train/loss" in r]
    assert len(rows) == 12
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-6)  # the zero head ties every pair
    assert sum(r["train/loss"] for r in rows[-4:]) / 4 < math.log(2)
    saved = json.loads((tmp_path / "eval.json").read_text())
    kept = json.loads((tmp_path / "data_stats.json").read_text())["eval pairs"]["kept"]
    assert saved["step"] == 12 and saved["eval/pairs"] == kept > 0 and 0.0 <= saved["eval/pair_acc"] <= 1.0
    assert saved["eval/pair_acc"] == results["eval/pair_acc"]

    final = tmp_path / "final"
    hf = AutoModelForTokenClassification.from_pretrained(final).eval()
    assert type(hf).__name__ == "LlamaForTokenClassification" and hf.config.num_labels == 1
    assert hf.score.weight.abs().sum() > 0
    tokenizer = load_tokenizer(str(final))
    ours = ValueModel(load_token_value_model(ModelConfig(path=str(final)), tokenizer, torch.device("cpu")))
    cfg = stage_config("rm", "rm_tiny", tmp_path, **kw)
    held_out = prepare_data(cfg.data, cfg.model, cfg.train).eval
    again = rm.evaluate_rewards(ours, held_out, batch_size=8, pad_token_id=tokenizer.pad_token_id,
                                device=torch.device("cpu"), bf16=False)
    assert {k: float(v) for k, v in again.items()} == pytest.approx({k: saved[k] for k in again}, rel=1e-5)
    batch = collate_values(held_out[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        reference = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., 0]
        scores = rm.sequence_scores(ours, batch)
    last = batch.attention_mask.sum(-1) - 1
    torch.testing.assert_close(scores, reference[torch.arange(len(last)), last], rtol=1e-5, atol=1e-6)
