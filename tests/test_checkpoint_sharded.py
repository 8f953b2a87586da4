"""Sharded checkpoints (torch.distributed.checkpoint): written by 2 FSDP2 ranks in the background
(``train.async_save``), resumed on 1 and on 2 with the same next-step metrics as the run that was never
interrupted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _stages import HH, TINY, kill_after, metrics, run_stage
from safetensors.torch import load_file
from test_distributed import torchrun_stage

STEP3 = ("train/loss", "train/grad_norm", "train/tokens", "train/lr")


def _sft(sft_model: Path, **kw) -> dict:
    return {**TINY, "model.path": str(sft_model), "data.train": str(HH), "data.limit": "48",
            "data.eval_fraction": "0", "train.batch_size": "4", "train.max_steps": "3", "train.save_every": "2",
            "train.lr": "1e-3", "train.save_total_limit": "0", **kw}


def _step(run: Path, step: int) -> dict:
    row = next(r for r in metrics(run) if r["step"] == step and "train/loss" in r)
    return {k: row[k] for k in STEP3 if k in row}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_sharded_checkpoint_resumes_on_one_and_two_ranks(sft_model, tmp_path):
    whole = tmp_path / "whole"
    assert torchrun_stage(whole, "sft", "sft_tiny", **_sft(sft_model, **{"train.async_save": "true"})) == \
        {"world_size": 2, "parallel": "fsdp"}
    assert not [p for p in whole.iterdir() if p.name.startswith(".tmp")]
    shards = whole / "global_step_2" / "shards"
    assert sorted(p.name for p in shards.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    assert not (whole / "global_step_2" / "model.safetensors").exists()
    expected = _step(whole, 3)
    assert "train/loss" in expected
    for ranks in (1, 2):
        run = tmp_path / f"resumed_on_{ranks}"
        shutil.copytree(whole, run)
        kill_after(run, 2)
        if ranks == 1:
            run_stage("sft", "sft_tiny", run, **_sft(sft_model))
        else:
            torchrun_stage(run, "sft", "sft_tiny", **_sft(sft_model))
        got = _step(run, 3)
        # the loss and token metrics are rank means; the gradient norm is global whatever the rank count
        for key in STEP3 if ranks == 2 else ("train/grad_norm", "train/lr"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (ranks, key)
        assert json.loads((run / "global_step_3" / "trainer_state.json").read_text())["step"] == 3
        a = load_file(str(run / "final" / "model.safetensors"))
        b = load_file(str(whole / "final" / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
