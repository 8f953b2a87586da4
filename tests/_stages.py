"""Running stages from the ``examples/`` YAML files with small overrides, as the CLI would."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dvpo.config import load_config
from dvpo.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")

# Shrinks any example to a few seconds on a CPU: tiny model, short sequences, few records.
TINY = {"model.hidden_size": "32", "model.num_heads": "2", "model.num_kv_heads": "1", "model.vocab_size": "300",
        "data.max_length": "128", "data.truncation": "prompt_left", "train.progress_bar": "false", "train.device": "cpu"}


def stage_config(stage: str, example: str | None, out: Path, **overrides):
    """The config ``dvpo <stage> examples/<example>.yaml`` would run, with ``overrides`` on top."""
    items = {"train.output_dir": str(out), **overrides}
    path = EXAMPLES / f"{example}.yaml" if example else None
    return load_config(STAGES[stage].config_cls, str(path) if path else None, list(items.items()))


def run_stage(stage: str, example: str | None, out: Path, **overrides):
    return STAGES[stage].run(stage_config(stage, example, out, **overrides))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def kill_after(run_dir: Path, step: int) -> None:
    """Leave ``run_dir`` as a run killed right after the checkpoint of ``step``: later checkpoints, the
    export and later metric lines are removed."""
    run_dir = Path(run_dir)
    for child in run_dir.iterdir():
        if child.name == "final" or (child.name.startswith("global_step_") and int(child.name.split("_")[-1]) > step):
            shutil.rmtree(child)
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
