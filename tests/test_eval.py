"""dvpo eval: KL to a reference, reward-model scores, the oracle column, the files it writes."""
from __future__ import annotations

import json

import pytest
from _stages import HH

from dvpo.tasks import OracleTask


def test_eval_scores_a_policy_against_itself_with_a_judge_and_the_oracle(sft_model, gvm_model, tmp_path):
    task = OracleTask(seed=3, n_topics=4, n_words=16)
    prompts = tmp_path / "oracle_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task.prompts(10)))
    kw = {"model.path": str(sft_model), "ref.path": str(sft_model), "judge.reward_models": f"[{gvm_model}]",
          "judge.oracle": "true", "judge.oracle_seed": "3", "judge.oracle_n_topics": "4", "judge.oracle_n_words": "16",
          "data.prompts": f"[{prompts}]", "rollout.max_new_tokens": "6", "eval.batch_size": "4",
          "eval.output_dir": str(tmp_path / "out"), "eval.device": "cpu"}
    results = _run(kw)
    assert results["eval/prompts"] == 10 and results["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"eval/length", "eval/score/run", "eval/oracle_reward"} <= set(results)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["oracle_reward"] == task.reward(r["prompt"], r["response"]) for r in rows)
    assert results["eval/oracle_reward"] == pytest.approx(sum(r["oracle_reward"] for r in rows) / 10)
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == results


def _run(overrides):
    from dvpo.config import load_config
    from dvpo.stages import STAGES

    stage = STAGES["eval"]
    return stage.run(load_config(stage.config_cls, None, list(overrides.items())))


def test_eval_needs_a_policy_and_prompts(tmp_path):
    from dvpo.config import ConfigError, load_config
    from dvpo.stages.eval import EvalStageConfig

    with pytest.raises(ConfigError, match="model.path"):
        load_config(EvalStageConfig, None, [("data.prompts", f"[{HH}]")])
    with pytest.raises(ConfigError, match="data.prompts"):
        load_config(EvalStageConfig, None, [("model.path", str(tmp_path))])
