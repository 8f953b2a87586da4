import random

import pytest

from dvpo.tasks import OracleTask


def test_deterministic_and_token_level():
    a, b = OracleTask(seed=3), OracleTask(seed=3)
    assert a.prompts(5) == b.prompts(5) and a.sft_corpus(4) == b.sft_corpus(4)
    p = a.prompts(1)[0]
    terms = a.reward_terms(p, "w1 w2 w3 <eos> w4")
    assert len(terms) == 3 and a.reward(p, "w1 w2 w3") == pytest.approx(sum(terms))
    assert a.reward_terms(p, "") == []
    assert OracleTask(seed=4).reward(p, "w1 w2") != a.reward(p, "w1 w2")


def test_teacher_is_below_optimum_and_labels_follow_reward():
    task = OracleTask(seed=0)
    corpus = task.sft_corpus(300)
    gap = [task.optimum(r["prompt"]) - task.reward(r["prompt"], r["response"]) for r in corpus]
    assert min(gap) >= -1e-9 and sum(gap) / len(gap) > 2.0
    rng = random.Random(0)
    agree = 0
    for r in corpus[:200]:
        other = task.teacher_response(r["prompt"], rng)
        pair = task.label(r["prompt"], r["response"], other, rng)
        agree += task.reward(r["prompt"], pair["chosen"]) >= task.reward(r["prompt"], pair["rejected"])
    assert agree / 200 > 0.65


def test_tokenizer_round_trip():
    task = OracleTask()
    tok = task.tokenizer()
    text = task.prompts(1)[0] + " w3 w7 <eos>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and tok.eos_token_id == task.vocabulary().index("<eos>")
    assert len(ids) == len(text.split())


def test_bad_prompt_is_rejected():
    with pytest.raises(ValueError, match="topic"):
        OracleTask().reward("w1 w2", "w3")
