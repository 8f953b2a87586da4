"""Every input path of every stage is checked when the config is loaded: one line naming the field and
the missing path, exit code 2, no traceback."""
from __future__ import annotations

import pytest

from dvpo.cli import main

# (stage, field under test, whether it is a list) -- every input path field of every stage.
FIELDS = [
    ("sft", "model.path", False), ("sft", "model.tokenizer", False), ("sft", "data.train", True),
    ("sft", "data.eval", True), ("sft", "train.resume", False),
    ("gvm", "model.path", False), ("gvm", "data.pairs", True), ("gvm", "data.eval_pairs", True),
    ("gvm", "data.scored", True),
    ("rm", "model.path", False), ("rm", "data.pairs", True), ("rm", "data.eval_pairs", True),
    ("dpo", "model.path", False), ("dpo", "data.pairs", True), ("dpo", "data.eval_pairs", True),
    ("vpo", "model.path", False), ("vpo", "data.pairs", True), ("vpo", "vpo.judge", False),
    ("dvpo", "model.path", False), ("dvpo", "model.tokenizer", False), ("dvpo", "ref.path", False),
    ("dvpo", "gvm.path", False), ("dvpo", "data.prompts", True), ("dvpo", "data.eval_prompts", True),
    ("dvpo", "train.resume", False),
    ("ppo", "model.path", False), ("ppo", "ref.path", False), ("ppo", "reward.path", False),
    ("ppo", "critic.init", False), ("ppo", "data.prompts", True), ("ppo", "data.eval_prompts", True),
    ("eval", "model.path", False), ("eval", "ref.path", False), ("eval", "judge.reward_models", True),
    ("eval", "data.prompts", True),
]


def valid_overrides(stage: str, folder: str, data: str) -> dict[str, str]:
    """Overrides that make ``stage``'s config valid, every path pointing at something that exists."""
    base = {"train.output_dir": f"{folder}/out"}
    return {
        "sft": {**base, "data.train": data},
        "gvm": {**base, "data.pairs": data},
        "rm": {**base, "data.pairs": data},
        "dpo": {**base, "data.pairs": data, "model.path": folder},
        "vpo": {**base, "data.pairs": data, "model.path": folder, "vpo.mode": "online", "vpo.judge": folder},
        "dvpo": {**base, "data.prompts": data, "model.path": folder, "gvm.path": folder},
        "ppo": {**base, "data.prompts": data, "model.path": folder, "reward.path": folder},
        "eval": {"eval.output_dir": f"{folder}/out", "data.prompts": data, "model.path": folder},
    }[stage]


@pytest.mark.parametrize("stage,field,is_list", FIELDS, ids=[f"{s}:{f}" for s, f, _ in FIELDS])
def test_a_missing_path_is_one_line_naming_the_field(stage, field, is_list, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b", "response": "a"}\n')
    overrides = valid_overrides(stage, str(tmp_path), str(data))
    argv = [stage, *(f"{k}={v}" for k, v in overrides.items())]
    assert main(argv + ["--print-config"]) == 0  # the valid config loads
    capsys.readouterr()
    missing = tmp_path / "nope" / "missing"
    assert main(argv + [f"{field}={missing}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    named = f"{field}[0]" if is_list else field
    assert named in err and str(missing) in err, err
