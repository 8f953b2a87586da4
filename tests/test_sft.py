"""dvpo sft: response-only NLL through the fused log-prob op, export/reload, resume."""
from __future__ import annotations

import pytest
import torch
from _stages import HH, TINY, kill_after, metrics, needs_hh, run_stage
from transformers import AutoModelForCausalLM

from dvpo.data import EncodedSequence, ValueExample, collate_values
from dvpo.models import PolicyModel, load_tokenizer
from dvpo.stages.common import sequence_logprobs


def test_response_logprobs_match_log_softmax_of_hf_logits_on_response_tokens_only(sft_model):
    hf = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    ex = [ValueExample((EncodedSequence([1, 40, 41], [50, 51, 2]),), (0.0,)),
          ValueExample((EncodedSequence([1, 60], [70, 2]),), (0.0,))]
    batch = collate_values(ex, pad_token_id=0)
    with torch.no_grad():
        ours = -sequence_logprobs(PolicyModel(hf), batch).sum()
        logp = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].log_softmax(-1)
        picked = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    # row 0 trains tokens 50, 51, 2 (positions 3..5), row 1 tokens 70, 2 (positions 2..3)
    expected = -(picked[0, 2:5].sum() + picked[1, 1:3].sum())
    assert batch.mask.sum() == 5
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@needs_hh
def test_sft_learns_and_exports_a_causal_lm(sft_model):
    rows = metrics(sft_model.parent)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert "eval/nll" in rows[-1] and rows[-1]["eval/ppl"] == pytest.approx(torch.tensor(rows[-1]["eval/nll"]).exp().item(), rel=1e-4)
    tok = load_tokenizer(str(sft_model))
    hf = AutoModelForCausalLM.from_pretrained(sft_model)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == len(tok)


@needs_hh
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_sft_resume_continues_with_identical_metrics(tmp_path, async_save):
    kw = {**TINY, "data.train": str(HH), "data.limit": "64", "train.batch_size": "8", "train.lr": "3e-3",
          "train.save_every": "2", "train.save_total_limit": "0", "data.eval_fraction": "0", "train.max_steps": "4",
          "train.async_save": async_save}
    run_stage("sft", "sft_tiny", tmp_path, **kw)
    full = [r["train/loss"] for r in metrics(tmp_path)]
    kill_after(tmp_path, 2)
    run_stage("sft", "sft_tiny", tmp_path, **kw)
    assert [r["train/loss"] for r in metrics(tmp_path)] == full
